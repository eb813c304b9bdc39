"""The one interceptor that turns exceptions into gRPC status codes, for both services.

Each service passes its own mapping (`status_for`, `message_for`): a typed error ends the call
with its family's code and message; INTERNAL means a bug, and its traceback is logged. Servicers
just raise.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call whose handler raised with `status_for(error)` and `message_for(error)`."""

    def __init__(
        self,
        status_for: Callable[[BaseException], grpc.StatusCode],
        message_for: Callable[[BaseException], str] = str,
    ):
        self.status_for = status_for
        self.message_for = message_for

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(method, behavior)})
        return handler

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
        code = self.status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed with an unexpected error", method, exc_info=error)
            await context.abort(code, f"internal error: {type(error).__name__}: {error}")
        await context.abort(code, self.message_for(error))

    def _wrap(self, method: str, behavior: Callable) -> Callable:
        if inspect.isasyncgenfunction(behavior):  # a streaming response written with `yield`

            @functools.wraps(behavior)
            async def stream_wrapper(request_or_iterator, context):
                try:
                    async for response in behavior(request_or_iterator, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await self._abort(context, method, e)

            return stream_wrapper

        @functools.wraps(behavior)
        async def wrapper(request_or_iterator, context):
            try:
                return await behavior(request_or_iterator, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await self._abort(context, method, e)

        return wrapper
