"""Typed errors -> gRPC status codes, in one place (DESIGN.md section 5).

`ErrorInterceptor` wraps every handler of the server: a `LoraServeError` ends the call with the
status code of its family and its message; any other exception is a bug and ends it with INTERNAL,
its traceback logged. Servicers just raise.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable

import grpc

from inference_svc import errors

log = logging.getLogger(__name__)

# Most specific first: the first family an error belongs to decides its code.
STATUS_BY_FAMILY: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AdapterAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.RequestAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: Exception) -> grpc.StatusCode:
    """The status code a raised error ends its call with (INTERNAL for anything unexpected)."""
    for family, code in STATUS_BY_FAMILY:
        if isinstance(error, family):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort_with(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed with an unexpected error", method, exc_info=error)
        await context.abort(code, f"internal error: {type(error).__name__}: {error}")
    await context.abort(code, str(error))


def _wrap_unary(method: str, behavior: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    @functools.wraps(behavior)
    async def wrapper(request_or_iterator, context):
        try:
            return await behavior(request_or_iterator, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort_with(context, method, e)

    return wrapper


def _wrap_stream(method: str, behavior: Callable) -> Callable:
    if not inspect.isasyncgenfunction(behavior):
        return _wrap_unary(method, behavior)  # a handler that streams with `context.write`

    @functools.wraps(behavior)
    async def wrapper(request_or_iterator, context):
        try:
            async for response in behavior(request_or_iterator, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort_with(context, method, e)

    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by any handler to status codes (see STATUS_BY_FAMILY)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(method, handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(method, handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(method, handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(method, handler.stream_stream))
        return handler
