"""The OpenAI-compatible HTTP API of one replica, beside its gRPC server, on the same event loop.

    api = HttpApi(generation, engine, model_name="llama", tokenizer=..., security=..., tenant_of=...)
    server = HttpServer(api.app(), "127.0.0.1", 8000, security)
    port = await server.start()          # listening; requests use the running engine
    await server.stop(grace_s)

Endpoints (Starlette on uvicorn):

| method | path | what |
|---|---|---|
| GET | /v1/models | the base model, then every adapter and alias the caller may use |
| POST | /v1/completions | a completion for `prompt` (text or token ids), streamed as SSE with `stream` |
| POST | /v1/chat/completions | a reply to `messages`, through the checkpoint's chat template |
| GET | /health | 200 while the replica accepts requests, else 503 |

A completion is the gRPC Generate call in other clothes: `openai_protocol` turns the body into a
`GenerateRequest`, `loraserve.auth.admit` applies Generate's rule to the token, the tenant limiter
counts it with the gRPC streams, and `generation.Generation` (the gRPC servicer's own) resolves the
model and runs it on the engine. Errors become OpenAI's JSON error shape through
`errors_http.http_error`, the gRPC status mapping's HTTP twin. Every request gets the id of its
`x-request-id` header (or a new one), in its log line and its `x-request-id` response header.
A client that disconnects cancels its request at once, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable

import anyio
import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from inference_svc import errors
from inference_svc.async_engine import AsyncEngine
from inference_svc.errors_http import grpc_status_for, http_error
from inference_svc.generation import Generation
from inference_svc.limits import TenantConcurrencyLimiter
from inference_svc.manager_client import ManagerClient
from inference_svc.openai_protocol import CHAT_PARAMS, Answer, Options, chat_request, completion_request, sse
from loraserve import auth
from loraserve.routing import RoutingTable
from loraserve.security import SecurityConfig
from loraserve.telemetry import MAX_REQUEST_ID_CHARS, REQUEST_ID, REQUEST_ID_HEADER, log_call, new_request_id
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import inference_pb2

log = logging.getLogger("loraserve.http")

GENERATE = "/loraserve.v1.InferenceService/Generate"  # the gRPC method whose access rule applies
MAX_BODY_BYTES = 8 * 1024 * 1024  # as gRPC's MAX_MESSAGE_BYTES
LIST_PAGE_SIZE = 1000
LIST_TIMEOUT_S = 5.0
OWNER = "loraserve"  # owned_by of the base model and of adapters without a tenant


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class HttpApi:
    """The routes of the HTTP API over one replica's request path.

    Args:
        generation: the request path gRPC Generate uses (servicer's `generation`).
        engine: the engine bridge (standalone adapter listing, health).
        model_name: the base model's name in `model` and /v1/models.
        token_text: a token id -> its text (logprobs).
        security: token table (None inside: authentication off).
        tenant_of: adapter id -> owning tenant (the gRPC auth's).
        limiter: the per-tenant stream limit, shared with gRPC (None: no limit).
        manager: the replica's client of the adapter manager (managed mode), for /v1/models.
        routing: the replica's current routing table (managed mode): aliases for /v1/models.
    """

    def __init__(
        self,
        generation: Generation,
        engine: AsyncEngine,
        model_name: str,
        token_text: Callable[[int], str],
        security: SecurityConfig | None = None,
        tenant_of: auth.TenantOf | None = None,
        limiter: TenantConcurrencyLimiter | None = None,
        manager: ManagerClient | None = None,
        routing: Callable[[], RoutingTable] | None = None,
        on_refusal: auth.OnRefusal | None = None,
    ):
        self.generation = generation
        self.engine = engine
        self.model_name = model_name
        self.token_text = functools.lru_cache(maxsize=1 << 16)(token_text)
        self.tokens = (security or SecurityConfig()).tokens
        self.tenant_of = tenant_of or _no_owner
        self.limiter = limiter
        self.manager = manager
        self.routing = routing
        self.on_refusal = on_refusal
        self.started = int(time.time())

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    # --- endpoints ------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self.engine.accepting else 503)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "POST /v1/completions", completion_request, {})

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "POST /v1/chat/completions", chat_request, CHAT_PARAMS)

    async def models(self, request: Request) -> Response:
        call = _Call(request, "GET /v1/models")
        try:
            principal = await self._admit(request, inference_pb2.GenerateRequest())
            tenant = principal.tenant if principal is not None and principal.role == auth.TENANT else None
            data = [self._model(self.model_name, OWNER, self.started, parent=None)]
            data += await self._adapter_models(tenant)
        except Exception as e:
            return call.failed(e)
        return call.answer(JSONResponse({"object": "list", "data": data}, headers=call.headers))

    # --- generation -----------------------------------------------------------------------------

    async def _generate(self, request: Request, method: str, parse, params: dict) -> Response:
        call = _Call(request, method, params)
        cleanup = contextlib.AsyncExitStack()
        try:
            body = await _json_body(request)
            generate, options = parse(body, self.model_name)
            await self._admit(request, generate)
            if self.limiter is not None:
                cleanup.enter_context(self.limiter.hold(auth.caller_tenant(request.headers.items())))
            headers = {**auth.routing_headers(request.headers.items()), **options.headers}
            stream = (await self.generation.open(generate, headers)).stream
            cleanup.push_async_callback(stream.aclose)  # aborts the request unless it finished
            answer = Answer(options, generate.request_id, self.token_text)
            first = await _unless_disconnected(request, anext(stream))
            if options.stream:
                return _EventStream(_events(answer, first, stream, call), cleanup, call)
            answer.add(first)
            if answer.finish_reason is None:
                await _unless_disconnected(request, _collect(answer, stream))
        except Exception as e:
            await cleanup.aclose()
            return call.failed(e)
        except BaseException:  # cancelled (the server stops): still abort and release
            await cleanup.aclose()
            raise
        await cleanup.aclose()
        return call.answer(JSONResponse(answer.whole(), headers=call.headers))

    async def _admit(
        self, request: Request, generate: inference_pb2.GenerateRequest
    ) -> auth.Principal | None:
        """Generate's access rule for the request's bearer token (nothing when auth is off)."""
        if self.tokens is None:
            return None
        token = auth.bearer_token(request.headers.items())
        principal = self.tokens.authenticate(token)
        peer = f"http:{request.client.host}:{request.client.port}" if request.client else "http:-"
        await auth.admit(
            auth.INFERENCE_POLICY,
            GENERATE,
            principal,
            generate,
            self.tenant_of,
            errors.AdapterNotFound,
            has_token=token is not None,
            refused=lambda reason: auth.audit_refusal(GENERATE, principal, peer, reason, self.on_refusal),
        )
        return principal

    # --- /v1/models -----------------------------------------------------------------------------

    def _model(self, model_id: str, owner: str, created: int, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": owner, "parent": parent}

    async def _adapter_models(self, tenant: str | None) -> list[dict]:
        """Adapters and aliases `tenant` may use (None: every one), from the manager or the engine."""
        if self.manager is None:
            ids = await self.engine.call(lambda engine: sorted(engine.adapters.sources))
            owners = {i: await self.tenant_of(i) or "" for i in ids}
            return [
                self._model(i, owners[i] or OWNER, self.started, self.model_name)
                for i in ids
                if tenant is None or owners[i] == tenant
            ]
        records = await self._registered(tenant or "")
        owners = {r.adapter_id: r.tenant for r in records}
        out = [
            self._model(r.adapter_id, r.tenant or OWNER, r.created_at_ms // 1000, self.model_name)
            for r in records
        ]
        aliases = self.routing().aliases if self.routing is not None else {}
        for name, variants in sorted(aliases.items()):
            tenants = {owners.get(adapter_id) for adapter_id, _ in variants}
            if None in tenants:  # a variant this caller does not see
                continue
            owner = tenants.pop() if len(tenants) == 1 else ""
            out.append(self._model(name, owner or OWNER, self.started, self.model_name))
        return out

    async def _registered(self, tenant: str) -> list:
        records, token = [], ""
        while True:
            request = pb.ListAdaptersRequest(page_size=LIST_PAGE_SIZE, page_token=token, tenant=tenant)
            try:
                page = await self.manager.lookup("ListAdapters", request, LIST_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                raise errors.Unavailable(f"cannot list adapters: adapter manager: {e.details()}") from e
            records += page.adapters
            token = page.next_page_token
            if not token:
                return records


async def _no_owner(adapter_id: str) -> str | None:
    return None


# --- one call: request id, outcome, log line --------------------------------------------------------


class _Call:
    """One HTTP request's id, timing and log line (the same line gRPC calls get)."""

    def __init__(self, request: Request, method: str, params: dict | None = None):
        self.method = method
        self.params = params or {}
        self.start = time.perf_counter()
        given = request.headers.get(REQUEST_ID_HEADER, "")[:MAX_REQUEST_ID_CHARS]
        self.request_id = given or new_request_id()
        REQUEST_ID.set(self.request_id)  # this task's logs, and calls to the manager, carry it
        self.headers = {REQUEST_ID_HEADER: self.request_id}
        self.outcome = (499, "CANCELLED")  # a stream's (HTTP status, code) until it ends otherwise

    def failed(self, error: Exception) -> Response:
        if isinstance(error, ClientGone):
            self.done(499, "CANCELLED")
            return Response(status_code=499, headers=self.headers)
        status, body = http_error(error, self.params)
        code = grpc_status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed with an unexpected error", self.method, exc_info=error)
        self.done(status, code.name)
        return JSONResponse(body, status_code=status, headers=self.headers)

    def answer(self, response: Response) -> Response:
        self.done(response.status_code, "OK")
        return response

    def done(self, status: int, code: str) -> None:
        log_call(log, self.method, code, time.perf_counter() - self.start, status=status)


# --- streams ---------------------------------------------------------------------------------------


async def _json_body(request: Request) -> dict:
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY_BYTES:
        raise errors.InvalidRequest("body", f"{size} bytes exceed the limit of {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise errors.InvalidRequest("body", f"more than the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as e:
        raise errors.InvalidRequest("body", f"not valid JSON: {e}") from e


async def _unless_disconnected(request: Request, awaitable):
    """`awaitable`'s result, unless the client disconnects first: then it is cancelled (ClientGone)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    raise ClientGone()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(answer: Answer, stream: AsyncIterator) -> None:
    async for batch in stream:
        answer.add(batch)


async def _events(answer: Answer, first: list, stream: AsyncIterator, call: _Call) -> AsyncIterator[bytes]:
    """The SSE body: one chunk per engine batch, the usage chunk if asked, then `[DONE]`.

    An error after the first chunk (the server drains, say) is sent as an OpenAI error event.
    """
    options: Options = answer.options
    try:
        batch, is_first = first, True
        while True:
            text, entries = answer.add(batch)
            yield sse(answer.chunk(text, entries, first=is_first))
            if answer.finish_reason is not None:
                break
            batch, is_first = await anext(stream), False
        if options.include_usage:
            yield sse(answer.usage_chunk())
        call.outcome = (200, "OK")
    except Exception as e:
        status, body = http_error(e, call.params)
        call.outcome = (status, grpc_status_for(e).name)
        yield sse(body)
    yield sse("[DONE]")


class _EventStream(StreamingResponse):
    """A server-sent-event response that cancels its body as soon as the client disconnects
    (uvicorn would only notice at the next write) and then runs `cleanup` (closing the engine's
    stream aborts the request and frees its KV blocks), whatever happened."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: contextlib.AsyncExitStack, call: _Call):
        super().__init__(
            body, media_type="text/event-stream", headers={**call.headers, "cache-control": "no-cache"}
        )
        self.cleanup = cleanup
        self.call = call

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.cleanup.aclose()
            self.call.done(*self.call.outcome)


# --- the server ------------------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """None: the replica's own SIGTERM handling drains and stops this server."""
        yield


class HttpServer:
    """uvicorn serving `app` on the running event loop, TLS as `security` says (as gRPC)."""

    def __init__(
        self, app, host: str, port: int, security: SecurityConfig | None = None, grace_s: float = 1.0
    ):
        security = security or SecurityConfig()
        tls = {}
        if security.tls_cert is not None:
            tls = dict(ssl_certfile=security.tls_cert, ssl_keyfile=security.tls_key)
            if security.tls_client_ca is not None:
                tls.update(ssl_ca_certs=security.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # each request gets one JSON line of ours instead
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=grace_s,
            **tls,
        )
        self.host, self.port = host, port
        self.scheme = "https" if tls else "http"
        self._server = _Uvicorn(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and serve; -> the bound port. Raises OSError if the address is taken."""
        family, kind, proto, _, address = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what failed
                raise OSError(f"the HTTP server on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{self.scheme}://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, close idle connections, wait for the rest up to the grace period."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
