"""Envoy's ext_proc protocol: read each request's adapter, pick its replica, set the header.

Envoy opens one `Process` stream per request and sends the request headers and then, without
waiting for their answer, the whole request body (BUFFERED mode); it holds the stream open until
the request is over (so its end is when the request ends). The picker answers the
headers with "continue", reads the adapter id from the body (a gRPC-framed `GenerateRequest`, or
the `model` of an OpenAI-style JSON body; the `x-adapter-id` header when the body names none),
resolves aliases and routing rules with `loraserve.routing` exactly as a replica does, and answers
the body with header mutations:
  x-gateway-destination-endpoint  ip:port of the chosen replica, then the others (Envoy's retries)
  x-adapter-id                     the concrete adapter (Envoy's Maglev fallback hashes it)
  x-request-key                    a random key when an alias is drawn without one, so the replica
                                   draws the same variant
A request counts as in flight on its replica until its stream ends. A replica the picker just sent
an adapter to counts as holding it for RECENT_S, until its residency report reaches Redis.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import NamedTuple

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf.message import DecodeError

from endpoint_picker.metrics import PickerMetrics
from endpoint_picker.policy import Pick, Thresholds, pick
from endpoint_picker.view import ClusterState
from loraserve.auth import TokenTable, bearer_token, headers_for_routing
from loraserve.front_door import PICKED_PATHS, split_address
from loraserve.names import ADAPTER_HEADER, DESTINATION_HEADER, REQUEST_KEY_HEADER, TENANT_HEADER
from loraserve.routing import resolve
from loraserve.v1 import inference_pb2

log = logging.getLogger(__name__)

GENERATE_PATH = PICKED_PATHS["grpc"][0]
# How long a resolved host name is trusted (replicas behind DNS may move).
DNS_TTL_S = 30.0
# How long the picker counts a replica it sent an adapter to as holding it, until the replica's
# residency report reaches Redis: a burst of requests for a cold adapter then loads it once.
RECENT_S = 5.0


@dataclass
class Request:
    headers: dict[str, str]
    replica_id: str = ""
    adapter_id: str = ""


class Requested(NamedTuple):
    """What a request's body and headers ask for."""

    adapter_id: str  # "" = none (the base model)
    user: str  # an OpenAI-style body's `user`: the replica's sticky key for it ("" = none)


def read_request(headers: dict[str, str], body: bytes) -> Requested:
    """The adapter a request names: in its body (gRPC Generate, or JSON `model`), else the
    x-adapter-id header; and a JSON body's `user`, which the replica draws alias variants with."""
    content_type = headers.get("content-type", "")
    if content_type.startswith("application/grpc") and headers.get(":path") == GENERATE_PATH:
        # One length-prefixed message: compressed flag (1 byte), length (4 bytes, big-endian).
        if len(body) >= 5 and body[0] == 0:
            length = int.from_bytes(body[1:5], "big")
            try:
                adapter = inference_pb2.GenerateRequest.FromString(body[5 : 5 + length]).adapter_id
            except DecodeError:
                adapter = ""
            if adapter:
                return Requested(adapter, "")
    elif content_type.startswith("application/json") and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            model, user = parsed.get("model"), parsed.get("user")
            user = user if isinstance(user, str) else ""
            return Requested(
                model if isinstance(model, str) and model else headers.get(ADAPTER_HEADER, ""), user
            )
    return Requested(headers.get(ADAPTER_HEADER, ""), "")


def _header_value(h: base_pb2.HeaderValue) -> str:
    return h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class Resolver:
    """host -> IP (Envoy's override_host takes IP:port only), cached for DNS_TTL_S."""

    def __init__(self):
        self._cache: dict[str, tuple[str, float]] = {}

    def ip_port(self, address: str) -> str:
        host, port = split_address(address)
        ip, at = self._cache.get(host, ("", 0.0))
        if not ip or time.monotonic() - at > DNS_TTL_S:
            ip = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
            self._cache[host] = (ip, time.monotonic())
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    """The ext_proc service Envoy calls once per request."""

    def __init__(
        self,
        state: ClusterState,
        limits: Thresholds,
        metrics: PickerMetrics,
        http_by_grpc: dict[str, str] | None = None,
        http_port: int = 0,
        tokens: TokenTable | None = None,
    ):
        self.state = state
        self.limits = limits
        self.metrics = metrics
        self.http_by_grpc = dict(http_by_grpc or {})
        self.http_port = http_port  # every replica's HTTP API on this port of its gRPC host (0: map only)
        self.in_flight: Counter[str] = Counter()  # replica id -> requests in flight
        self.adapter_in_flight: Counter[tuple[str, str]] = Counter()  # (replica id, adapter) -> same
        self.recent: dict[str, tuple[str, float]] = {}  # adapter id -> (replica id, when sent)
        self.resolver = Resolver()
        self.tokens = tokens

    def _routing_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """The request's headers as its replica will route it: without the token, and x-tenant the
        tenant of the request's token when the picker knows the stack's tokens (else as sent,
        which is what replicas without authentication use too)."""
        principal = self.tokens.authenticate(bearer_token(headers.items())) if self.tokens else None
        return headers_for_routing(headers.items(), principal)

    async def Process(self, request_iterator, context) -> AsyncIterator[ep.ProcessingResponse]:
        request = Request({})
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    request.headers = {
                        h.key: _header_value(h) for h in message.request_headers.headers.headers
                    }
                    if message.request_headers.end_of_stream:  # no body will follow
                        mutation = await self._decide(request, b"")
                        yield ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=mutation))
                    else:
                        yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
                elif kind == "request_body":
                    mutation = await self._decide(request, message.request_body.body)
                    yield ep.ProcessingResponse(request_body=ep.BodyResponse(response=mutation))
                elif kind == "response_headers":
                    yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
                elif kind == "response_body":
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse())
                elif kind == "request_trailers":
                    yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
                elif kind == "response_trailers":
                    yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
        finally:
            if request.replica_id:
                self.in_flight[request.replica_id] -= 1
                self.metrics.in_flight(request.replica_id, self.in_flight[request.replica_id])
                key = (request.replica_id, request.adapter_id)
                self.adapter_in_flight[key] -= 1
                if self.adapter_in_flight[key] <= 0:
                    del self.adapter_in_flight[key]

    async def _decide(self, request: Request, body: bytes) -> ep.CommonResponse:
        started = time.perf_counter()
        view = await self.state.view()
        requested, user = read_request(request.headers, body)
        headers = self._routing_headers(request.headers)
        sets = []
        key, tenant = user or headers.get(REQUEST_KEY_HEADER, ""), headers.get(TENANT_HEADER, "")
        resolution = resolve(view.routing, requested, key, tenant, headers)
        if resolution.alias and not key:  # the replica must draw the variant drawn here
            key = uuid.uuid4().hex
            sets.append(_set(REQUEST_KEY_HEADER, key))
            resolution = resolve(view.routing, requested, key, tenant, headers)
        adapter = resolution.adapter_id
        if adapter:
            sets.append(_set(ADAPTER_HEADER, adapter))
        replicas = self._with_recent(view.replicas, adapter)
        queued = {r.replica_id: self.adapter_in_flight.get((r.replica_id, adapter), 0) for r in replicas}
        chosen = pick(replicas, adapter, self.in_flight, self.limits, queued)
        if chosen is None:
            self.metrics.fallback("no_replica")
        else:
            destination = self._destination(chosen, headers.get(":path", ""))
            if destination:
                sets.append(_set(DESTINATION_HEADER, destination))
                request.replica_id, request.adapter_id = chosen.replicas[0].replica_id, adapter
                self.adapter_in_flight[request.replica_id, adapter] += 1
                if adapter:
                    self.recent[adapter] = (request.replica_id, time.monotonic())
                self.in_flight[request.replica_id] += 1
                self.metrics.in_flight(request.replica_id, self.in_flight[request.replica_id])
                self.metrics.picked(chosen.reason)
            else:
                self.metrics.fallback("no_endpoint")
        self.metrics.decided(time.perf_counter() - started)
        return ep.CommonResponse(header_mutation=ep.HeaderMutation(set_headers=sets))

    def _with_recent(self, replicas, adapter: str):
        """The replicas, the one the adapter was last sent to counted as holding it (RECENT_S)."""
        replica_id, at = self.recent.get(adapter, ("", 0.0))
        if not replica_id or time.monotonic() - at > RECENT_S:
            self.recent.pop(adapter, None)
            return replicas
        return [
            replace(r, cached=r.cached | {adapter}) if r.replica_id == replica_id else r for r in replicas
        ]

    def _http_address(self, grpc_address: str) -> str | None:
        """Where the replica at `grpc_address` serves its HTTP API, if known."""
        if grpc_address in self.http_by_grpc:
            return self.http_by_grpc[grpc_address]
        if self.http_port:
            return f"{grpc_address.rpartition(':')[0]}:{self.http_port}"
        return None

    def _destination(self, chosen: Pick, path: str) -> str:
        """ip:port of each chosen replica, best first, on the listener the request came to."""
        addresses = [r.address for r in chosen.replicas]
        if path.startswith("/v1/"):  # the HTTP API
            addresses = [h for h in map(self._http_address, addresses) if h]
        out = []
        for address in addresses:
            try:
                out.append(self.resolver.ip_port(address))
            except OSError as e:
                log.warning("cannot resolve replica address %s: %s", address, e)
        return ",".join(out)
