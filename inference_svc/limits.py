"""Per-tenant admission limits of the inference service, enforced before a request reaches the engine.

The engine enforces the per-request limits itself (`EngineConfig.max_prompt_tokens`,
`max_output_tokens`, `max_model_len`: INVALID_ARGUMENT) and the shared queue
(`max_queue_len`: RESOURCE_EXHAUSTED). What needs to know the caller is here: at most
`max_concurrent` generation streams in flight per tenant, gRPC Generate and the HTTP API's
completions counted together; one more is refused with RESOURCE_EXHAUSTED (HTTP 429) naming the
limit. The tenant is the token's (`loraserve.auth.caller_tenant`), or the `x-tenant` header when
authentication is off; calls without a tenant (admins, services, anonymous callers) are not counted.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter

import grpc

from inference_svc import errors
from inference_svc.errors_grpc import status_for
from loraserve import auth

GENERATE = "/loraserve.v1.InferenceService/Generate"


class TenantLimit(errors.ResourceExhausted):
    """A tenant already has its `max_concurrent_per_tenant` streams in flight."""


class TenantConcurrencyLimiter(grpc.aio.ServerInterceptor):
    """Refuses a tenant's stream while it already has `max_concurrent` in flight.

    As a gRPC interceptor it guards Generate (place it after the authentication interceptor, which
    tells it the caller's tenant); the HTTP API holds `hold(tenant)` around each stream.
    """

    def __init__(self, max_concurrent: int):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent_per_tenant ({max_concurrent}) must be >= 1")
        self.max_concurrent = max_concurrent
        self.in_flight: Counter[str] = Counter()
        self.refused = 0

    @contextlib.contextmanager
    def hold(self, tenant: str):
        """One stream of `tenant` in flight while inside ("" is not counted); TenantLimit if full."""
        if not tenant:
            yield
            return
        if self.in_flight[tenant] >= self.max_concurrent:
            self.refused += 1
            raise TenantLimit(
                f"tenant {tenant!r} already has {self.in_flight[tenant]} requests in flight "
                f"(max_concurrent_per_tenant={self.max_concurrent})"
            )
        self.in_flight[tenant] += 1
        try:
            yield
        finally:
            self.in_flight[tenant] -= 1
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (
            handler is None
            or details.method != GENERATE
            or not inspect.isasyncgenfunction(handler.unary_stream)
        ):
            return handler
        return handler._replace(unary_stream=self._wrap(handler.unary_stream))

    def _wrap(self, behavior):
        @functools.wraps(behavior)
        async def wrapper(request, context):
            try:
                with self.hold(auth.caller_tenant(context.invocation_metadata())):
                    async for response in behavior(request, context):
                        yield response
            except TenantLimit as e:  # only `hold` raises it: the handler's errors are aborts by now
                await context.abort(status_for(e), str(e))

        return wrapper
