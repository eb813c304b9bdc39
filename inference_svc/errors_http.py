"""Typed errors -> HTTP status and OpenAI's JSON error shape, for the HTTP API, in one place.

The HTTP API refuses what gRPC refuses, for the same reasons: an error's gRPC status code comes from
`errors_grpc.status_for` (or, for a refused token, from the authentication layer), and the table
below turns that code into the HTTP status and the `type` / `code` fields OpenAI clients read:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}
"""

from __future__ import annotations

import grpc

from inference_svc import errors
from inference_svc.errors_grpc import STATUS_BY_FAMILY, StatusTable, status_for
from loraserve import auth

# gRPC status -> (HTTP status, OpenAI error type, OpenAI error code or None)
HTTP_BY_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.INTERNAL: (500, "internal_error", None),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", None),
}
# The authentication layer's refusals, then the engine's errors.
_STATUS_BY_FAMILY: StatusTable = (
    (auth.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (auth.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (auth.Hidden, grpc.StatusCode.NOT_FOUND),
    (auth.AccessUnknown, grpc.StatusCode.UNAVAILABLE),
    *STATUS_BY_FAMILY,
)


def grpc_status_for(error: Exception) -> grpc.StatusCode:
    """The status code gRPC would end the same call with."""
    return status_for(error, _STATUS_BY_FAMILY)


def http_error(error: Exception, params: dict[str, str] | None = None) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for a raised error.

    `params` renames an engine field to the request's parameter that set it (chat's `top_logprobs`
    is the engine's `logprobs`). Unknown adapters name `model`, chat template failures `messages`.
    """
    status, kind, code = HTTP_BY_STATUS[grpc_status_for(error)]
    param, message = None, str(error)
    if isinstance(error, errors.InvalidRequest):
        param = (params or {}).get(error.field, error.field)
        message = param + message.removeprefix(error.field)  # "logprobs: ..." -> "top_logprobs: ..."
    elif isinstance(error, errors.AdapterNotFound | auth.Hidden):
        param = "model"
    elif isinstance(error, errors.ChatTemplateError):
        param = "messages"
    if status == 500:
        message = f"internal error: {type(error).__name__}: {error}"
    elif isinstance(error, auth.Hidden):
        message = str(errors.AdapterNotFound(error.adapter_id))
    return status, error_body(message, kind, param, code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
