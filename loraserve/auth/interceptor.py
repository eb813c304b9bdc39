"""The gRPC server interceptor that authenticates every call (but health and reflection) and admits
it by the served service's policy (`access.admit`)."""

from __future__ import annotations

import functools
import inspect

import grpc

from loraserve.auth.access import NotFound, OnRefusal, admit, audit_refusal
from loraserve.auth.errors import AccessUnknown, AdapterHidden, Hidden, PermissionDenied, Unauthenticated
from loraserve.auth.policy import Policy, TenantOf
from loraserve.auth.tokens import AUTHORIZATION, IssuedCredentials, Principal, TokenTable

# Methods every caller may use without a token.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` header, else None."""
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


async def _no_owner(adapter_id: str) -> str | None:
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call (but health and reflection) and enforces `policy`.

    Args:
        tokens: the token table (or anything with its `authenticate`, e.g. `IssuedCredentials`).
        policy: the served service's rules.
        tenant_of: async adapter id -> owning tenant, for tenant scopes (None: tenants own nothing).
        not_found: the service's unknown-adapter error (its message is reused for hidden adapters).
        on_refusal: told (method, reason) of every refusal, after it is logged; None = log only.
    """

    def __init__(
        self,
        tokens: TokenTable | IssuedCredentials,
        policy: Policy,
        tenant_of: TenantOf | None = None,
        not_found: NotFound = AdapterHidden,
        on_refusal: OnRefusal | None = None,
    ):
        self.tokens = tokens
        self.policy = policy
        self.tenant_of = tenant_of or _no_owner
        self.not_found = not_found
        self.on_refusal = on_refusal

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        token = bearer_token(details.invocation_metadata)
        principal = self.tokens.authenticate(token)
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                admit = functools.partial(
                    self._admit, details.method, principal, token is not None, kind.startswith("stream")
                )
                streams = kind.endswith("_stream") and inspect.isasyncgenfunction(behavior)
                return handler._replace(**{kind: _admitted(admit, behavior, streams)})
        return handler

    def _refused(self, method: str, principal: Principal | None, context, reason: str) -> None:
        peer = context.peer() if context is not None else "-"
        audit_refusal(method, principal, peer, reason, self.on_refusal)

    async def _admit(
        self,
        method: str,
        principal: Principal | None,
        has_token: bool,
        client_streams: bool,
        request,
        context,
    ):
        """Abort the call unless `principal` may make it (`admit`); -> a response to answer with, or None."""
        refused = functools.partial(self._refused, method, principal, context)
        try:
            return await admit(
                self.policy,
                method,
                principal,
                request,
                self.tenant_of,
                self.not_found,
                client_streams,
                has_token=has_token,
                refused=refused,
            )
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except PermissionDenied as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except Hidden as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(self.not_found(e.adapter_id)))
        except AccessUnknown as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


def _admitted(admit, behavior, streams: bool):
    """`behavior` behind `admit`: it runs when `admit` returns None; a response `admit` returns (a
    tenant scope's) answers the call instead. `streams`: `behavior` yields its responses."""
    if streams:

        @functools.wraps(behavior)
        async def stream_wrapper(request, context):
            answer = await admit(request, context)
            responses = behavior(request, context) if answer is None else _only(answer)
            async for response in responses:
                yield response

        return stream_wrapper

    @functools.wraps(behavior)
    async def wrapper(request, context):
        answer = await admit(request, context)
        return await behavior(request, context) if answer is None else answer

    return wrapper


async def _only(response):
    yield response
