"""Typed errors -> gRPC status codes, in one place (DESIGN.md section 5).

`loraserve.grpc_errors.ErrorInterceptor(status_for)` applies this mapping to every handler of the
server: a `LoraServeError` ends the call with the status code of its family and its message; any
other exception is a bug and ends it with INTERNAL, its traceback logged. Servicers just raise.
"""

from __future__ import annotations

import grpc

from inference_svc import errors

# (error family, code) pairs; the first family an error belongs to decides its code.
StatusTable = tuple[tuple[type[Exception], grpc.StatusCode], ...]

# Most specific first.
STATUS_BY_FAMILY: StatusTable = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AdapterAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.RequestAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: Exception, families: StatusTable = STATUS_BY_FAMILY) -> grpc.StatusCode:
    """The status code a raised error ends its call with: its first family's in `families`
    (INTERNAL for anything unexpected)."""
    for family, code in families:
        if isinstance(error, family):
            return code
    return grpc.StatusCode.INTERNAL
