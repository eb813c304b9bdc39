"""Logs, request ids and the metrics HTTP endpoint, shared by both services.

- Logs are JSON lines on stderr (`setup_logging`), one object per record: `ts`, `level`,
  `service`, `logger`, `msg`, `request_id` when the record belongs to a request, any `extra`
  fields, and `exc` with the traceback.
- A request id comes from the client's `x-request-id` metadata, or is generated. The server
  interceptor puts it in a context variable for the whole call; client channels built with
  `client_interceptors()` copy it into the metadata of every call made on the request's behalf
  (the replica's calls to the manager, the manager's calls to replicas), so one id is logged by
  every service a request touched.
- The same interceptor logs one line per RPC (method, status code, duration) and reports it to the
  service's metrics.
- `MetricsServer` serves a Prometheus registry over HTTP (`GET /metrics`).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import inspect
import json
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from loraserve.names import REQUEST_ID_HEADER as REQUEST_ID_HEADER  # the header every service reads
from loraserve.names import new_request_id as new_request_id

# Longest request id accepted from a client; longer ones are cut (they are logged on every line).
MAX_REQUEST_ID_CHARS = 128

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("loraserve_request_id", default="")

# LogRecord attributes that are not `extra` fields.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def current_request_id() -> str:
    """The id of the request being served on this task ("" outside a request)."""
    return REQUEST_ID.get()


# --- logs -----------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the keys)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "") or REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(service: str, level: str | int = "INFO") -> None:
    """Route every logger to stderr as JSON lines tagged with `service`, at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


# --- server side ----------------------------------------------------------------------------------

# Status codes that describe the caller's request, not a fault of the server: logged at INFO.
CALLER_OUTCOMES = frozenset(
    {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "INVALID_ARGUMENT"}
    | {"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE"}
)
# Codes that mean a bug or lost data: logged at ERROR (the rest at WARNING).
SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


def log_call(
    log: logging.Logger, method: str, code: str, seconds: float, quiet: bool = False, **extra
) -> None:
    """The one line a finished call gets, at the level its status code (a gRPC code name) calls
    for: ERROR for faults of the server, WARNING for refusals and outages, INFO (DEBUG if `quiet`)
    for the caller's own outcomes. `extra` fields are added to the line (e.g. the HTTP status)."""
    if code in SERVER_FAULTS:
        level = logging.ERROR
    elif code not in CALLER_OUTCOMES:
        level = logging.WARNING
    else:
        level = logging.DEBUG if quiet else logging.INFO
    shown = extra.get("status", code)
    log.log(
        level,
        "%s %s %.1f ms",
        method,
        shown,
        seconds * 1000,
        extra={"method": method, "code": code, "duration_ms": round(seconds * 1000, 3), **extra},
    )


# (method, status code name, seconds, the exception the handler raised or None)
RpcObserver = Callable[[str, str, float, BaseException | None], None]


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request id, logs one line per RPC and reports it to `observe`.

    Put it after the service's error interceptor (`interceptors=[ErrorInterceptor(), this]`), so
    it sees the exceptions handlers raise and names their status code with `status_for`.

    Args:
        status_for: the service's exception -> grpc.StatusCode mapping.
        observe: called once per finished RPC (metrics).
        quiet: method names (e.g. "Heartbeat") logged at DEBUG instead of INFO; health checks and
            reflection always are.
    """

    def __init__(
        self,
        status_for: Callable[[Exception], grpc.StatusCode],
        observe: RpcObserver | None = None,
        quiet: frozenset[str] = frozenset(),
    ):
        self.status_for = status_for
        self.observe = observe or (lambda method, code, seconds, error: None)
        self.quiet = quiet
        self.log = logging.getLogger("loraserve.rpc")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method  # "/package.Service/Method"
        service, _, method = full.rpartition("/")
        quiet = method in self.quiet or not service.startswith("/loraserve.")
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = str(metadata.get(REQUEST_ID_HEADER, ""))[:MAX_REQUEST_ID_CHARS] or None
        for kind in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = self._wrap(behavior, method, request_id, quiet)
                return handler._replace(**{kind: wrapped})
        return handler

    def _wrap(self, behavior, method: str, request_id: str | None, quiet: bool):
        observed = functools.partial(self._observed, method, request_id, quiet)
        if inspect.isasyncgenfunction(behavior):

            @functools.wraps(behavior)
            async def stream_wrapper(request, context):
                with observed(context):
                    async for response in behavior(request, context):
                        yield response

            return stream_wrapper

        @functools.wraps(behavior)
        async def wrapper(request, context):
            with observed(context):
                return await behavior(request, context)

        return wrapper

    @contextlib.contextmanager
    def _observed(self, method: str, request_id: str | None, quiet: bool, context):
        """One call's request id, then its log line and metrics when it ends, however it ends."""
        # Each RPC runs on its own task, so the id is set for this call only.
        REQUEST_ID.set(request_id or new_request_id())
        start, error = time.perf_counter(), None
        try:
            yield
        except BaseException as e:
            error = e
            raise
        finally:
            self._done(method, context, start, error, quiet)

    def _done(self, method: str, context, start: float, error: BaseException | None, quiet: bool) -> None:
        seconds = time.perf_counter() - start
        code = self._code(context, error)
        observed = error if isinstance(error, Exception) else None
        try:
            self.observe(method, code, seconds, observed)
        except Exception:  # metrics must never fail a call
            self.log.exception("recording metrics for %s failed", method)
        log_call(self.log, method, code, seconds, quiet)

    def _code(self, context, error: BaseException | None) -> str:
        if error is None:
            code = context.code()  # set when the handler called context.set_code / abort
            return code.name if isinstance(code, grpc.StatusCode) else "OK"
        if isinstance(error, grpc.aio.AbortError):
            code = context.code()
            return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        if isinstance(error, Exception):
            return self.status_for(error).name
        return "CANCELLED"  # asyncio.CancelledError: the client went away or the deadline passed


# --- client side ----------------------------------------------------------------------------------


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    request_id = REQUEST_ID.get()
    if not request_id:
        return details
    metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
    if REQUEST_ID_HEADER not in metadata:
        metadata.add(REQUEST_ID_HEADER, request_id)
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_request_id(client_call_details), request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a `grpc.aio` channel that forward the current request id."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary()]


# --- metrics ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """One metric as exposed; the README's metrics tables are generated from these."""

    name: str  # exposed name; counters end in _total
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # histograms only


def auth_refusals_spec(prefix: str) -> MetricSpec:
    """The refusals counter both services expose (`loraserve.auth.audit_refusal` feeds it)."""
    return MetricSpec(
        prefix + "auth_refusals_total",
        "counter",
        "Calls refused by authentication or authorization, by method and reason "
        "(no_token, unknown_token, role, other_replica, not_owner).",
        ("method", "reason"),
    )


_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


def build_metrics(specs: Iterable[MetricSpec], registry: CollectorRegistry) -> dict:
    """{spec.name: the prometheus_client metric}, registered in `registry`."""
    out = {}
    for spec in specs:
        kwargs = {"registry": registry}
        if spec.buckets is not None:
            kwargs["buckets"] = spec.buckets
        out[spec.name] = _KINDS[spec.kind](spec.name, spec.help, spec.labels, **kwargs)
    return out


class MetricsServer:
    """`GET http://host:port/metrics` for one registry, on a daemon thread; `close()` stops it.

    `authorize(token)` (the request's bearer token, or None) decides who may read it; None = anyone.
    Refused scrapes get 401 with a `WWW-Authenticate: Bearer` header. `tls` = (cert, key) PEM files
    serves HTTPS. Raises OSError if the port is taken.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        authorize: Callable[[str | None], bool] | None = None,
        tls: tuple[str, str] | None = None,
    ):
        app = make_wsgi_app(registry)
        if authorize is not None:
            app = _bearer_app(app, authorize)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsHTTPServer", (_MetricsHTTPServer,), {"address_family": family})
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.host = host
        self.port = self._server.server_address[1]
        self.scheme = "https" if tls is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        pass


def _bearer_app(app, authorize: Callable[[str | None], bool]):
    """`app` behind `Authorization: Bearer <token>` checked by `authorize`."""

    def guarded(environ, start_response):
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if not authorize(token.strip() if scheme.lower() == "bearer" and token.strip() else None):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"metrics need an admin or metrics bearer token (authorization: Bearer <token>)\n"]
        return app(environ, start_response)

    return guarded
