"""The interceptors that turn bad requests and exceptions into gRPC status codes, for both services.

`ErrorInterceptor`: each service passes its own mapping (`status_for`, `message_for`): a typed
error ends the call with its family's code and message. INTERNAL means a bug: its traceback is
logged with a reference id, and the client gets only a generic message with that id (exception
text can carry paths, keys or other tenants' data). Servicers just raise.

`DecodeGuard`: a request that does not parse as its message type (a string field holding invalid
UTF-8, truncated bytes) is INVALID_ARGUMENT naming the type, instead of the UNKNOWN grpc answers
when its own deserialization fails. Place it first, before authentication, so that no other
interceptor ever sees a request that is not a message.

`stream_was_cut`, for clients: a call a proxy reset after its answer had started.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)
HANDLER_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


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
        for kind in HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(method, behavior)})
        return handler

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
        code = self.status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            reference = uuid.uuid4().hex[:12]
            log.error("%s failed with an unexpected error [ref %s]", method, reference, exc_info=error)
            await context.abort(
                code, f"internal error (reference {reference}); the server log has the details"
            )
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


class Undecodable:
    """What `DecodeGuard`'s deserializer returns for bytes that are not a valid message."""

    def __init__(self, error: DecodeError):
        self.error = error


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT for a request (or a client-stream message) that does not parse."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        for kind in HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
                return handler  # a synchronous handler: grpc's own decoding stays
            return handler._replace(
                request_deserializer=_tolerant(handler.request_deserializer),
                **{kind: _guarded(behavior, kind.startswith("stream"))},
            )
        return handler


def _tolerant(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def tolerant(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as e:
            return Undecodable(e)

    return tolerant


async def _refuse(context, request: Undecodable) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request does not parse ({request.error}): string fields must be valid UTF-8",
    )


def _guarded(behavior: Callable, client_streams: bool) -> Callable:
    if client_streams:

        async def checked(messages: AsyncIterator, context) -> AsyncIterator:
            async for message in messages:
                if isinstance(message, Undecodable):
                    await _refuse(context, message)
                yield message

        if inspect.isasyncgenfunction(behavior):

            @functools.wraps(behavior)
            async def stream_in_out(request_iterator, context):
                async for response in behavior(checked(request_iterator, context), context):
                    yield response

            return stream_in_out

        @functools.wraps(behavior)
        async def stream_in(request_iterator, context):
            return await behavior(checked(request_iterator, context), context)

        return stream_in

    if inspect.isasyncgenfunction(behavior):

        @functools.wraps(behavior)
        async def stream_out(request, context):
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for response in behavior(request, context):
                yield response

        return stream_out

    @functools.wraps(behavior)
    async def unary(request, context):
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        return await behavior(request, context)

    return unary


def stream_was_cut(code: grpc.StatusCode, details: str) -> bool:
    """A call that ended because a proxy reset its HTTP/2 stream (the door's Envoy does when the
    replica serving a started stream dies): gRPC reports RST_STREAM as INTERNAL, but it is a lost
    replica to retry on, not a server bug."""
    return code is grpc.StatusCode.INTERNAL and "RST_STREAM" in details
