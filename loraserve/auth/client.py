"""The client side: send `authorization: Bearer <token>` on every call of a channel or a stub."""

from __future__ import annotations

import grpc

from loraserve.auth.tokens import AUTHORIZATION


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != AUTHORIZATION]
    metadata.append((AUTHORIZATION, f"Bearer {token}"))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _Bearer:
    def __init__(self, token: str):
        self.token = token

    async def _call(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _Bearer._call


class BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _Bearer._call


class BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


def bearer_interceptors(token: str) -> list:
    """grpc.aio client interceptors that send `authorization: Bearer <token>` on every call."""
    return [
        cls(token) for cls in (BearerUnaryUnary, BearerUnaryStream, BearerStreamUnary, BearerStreamStream)
    ]


def token_metadata(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying `token`, for synchronous stubs: `stub.X(req, metadata=...)`."""
    return ((AUTHORIZATION, f"Bearer {token}"),)
