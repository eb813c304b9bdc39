"""Typed errors of the control plane, and their one mapping to gRPC status codes.

Domain code raises these; `loraserve.grpc_errors.ErrorInterceptor` ends the call with the status code of the error's
family and its message. Redis connection loss (after the client's retries) maps to UNAVAILABLE;
anything else unexpected is a bug: INTERNAL, with its traceback logged.
"""

from __future__ import annotations

import grpc
import redis.exceptions

from loraserve import errors as shared


class ManagerError(shared.LoraServeError):
    """Base class of every error the adapter manager raises on purpose."""


# --- INVALID_ARGUMENT --------------------------------------------------------------------------


class InvalidArgument(ManagerError, shared.InvalidArgument):
    """A request field is malformed. The shared layer's errors (adapter format, model config,
    routing rules, adapter paths: `loraserve.errors`) are of the same family."""


class InvalidAdapter(InvalidArgument):
    """The adapter's files fail validation (rank, target modules, shapes, format ...)."""


class ChecksumMismatch(InvalidArgument):
    """Uploaded bytes do not hash to the sha256 the client declared."""


# --- NOT_FOUND / ALREADY_EXISTS ----------------------------------------------------------------


class NotFound(ManagerError):
    """Something named by the request does not exist."""


class AdapterNotFound(NotFound):
    def __init__(self, adapter_id: str):
        super().__init__(shared.unknown_adapter_message(adapter_id))
        self.adapter_id = adapter_id


class ReplicaNotFound(NotFound):
    def __init__(self, replica_id: str):
        super().__init__(f"replica {replica_id!r} has never joined")
        self.replica_id = replica_id


class AliasNotFound(NotFound):
    def __init__(self, name: str):
        super().__init__(f"alias {name!r} does not exist")


class AlreadyExists(ManagerError):
    """The id is taken (by other content, or by an alias / adapter in the shared namespace)."""


class AddressTaken(AlreadyExists):
    """JoinReplica with the address of another live replica, or as a live replica from elsewhere."""

    def __init__(self, replica_id: str, address: str, holder: str, held: str):
        if holder == replica_id:
            message = (
                f"replica {replica_id!r} is live at {held!r}: it may join from {address!r} once that "
                "one has left or its heartbeat has lapsed"
            )
        else:
            message = f"address {address!r} belongs to live replica {holder!r}: a replica joins with its own"
        super().__init__(message)


# --- FAILED_PRECONDITION -----------------------------------------------------------------------


class FailedPrecondition(ManagerError):
    """The current state forbids the operation."""


class AdapterPinned(FailedPrecondition):
    """The adapter is pinned; unpin it or use --force."""


class AdapterInUse(FailedPrecondition):
    """The adapter is in a slot, or an alias or routing rule names it."""


class NoValidationContext(FailedPrecondition):
    """No replica has joined and the manager has no --model-config to validate against."""


class StoredCopyCorrupt(FailedPrecondition):
    """The store's copy of an adapter no longer hashes to its registered sha256 (never served)."""


# --- ABORTED ----------------------------------------------------------------------------------


class StaleReplica(ManagerError):
    """A replica's call carries an epoch that is not its current one (or it was marked down):
    the replica must join again with a snapshot, then retry (ABORTED: retry at a higher level)."""


# --- RESOURCE_EXHAUSTED ------------------------------------------------------------------------


class ResourceExhausted(ManagerError):
    """A capacity limit refused the operation."""


class NoEvictableAdapter(ResourceExhausted):
    """Every host-cache entry of the replica is pinned (or being loaded)."""


class UploadTooLarge(ResourceExhausted):
    """An upload exceeds max_upload_bytes."""


# --- UNAVAILABLE -------------------------------------------------------------------------------


class Unavailable(ManagerError):
    """A dependency is down or no replica can take the work; retrying later may succeed."""


class NoReplicaAvailable(Unavailable):
    """No live replica can hold the adapter."""


class ReplicaCommandFailed(ManagerError):
    """A replica refused or failed a command; carries the replica's own status code."""

    def __init__(self, replica_id: str, code: grpc.StatusCode, details: str):
        super().__init__(f"replica {replica_id!r}: {details}")
        self.replica_id = replica_id
        self.code = code


# Most specific first: the first family an error belongs to decides its code.
STATUS_BY_FAMILY: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (shared.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (StaleReplica, grpc.StatusCode.ABORTED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (redis.exceptions.ConnectionError, grpc.StatusCode.UNAVAILABLE),
    (redis.exceptions.TimeoutError, grpc.StatusCode.UNAVAILABLE),
    (redis.exceptions.BusyLoadingError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code a raised error ends its call with (INTERNAL for anything unexpected)."""
    if isinstance(error, ReplicaCommandFailed):
        return error.code
    for family, code in STATUS_BY_FAMILY:
        if isinstance(error, family):
            return code
    return grpc.StatusCode.INTERNAL


def message_for(error: BaseException) -> str:
    if isinstance(error, redis.exceptions.RedisError):
        return f"the registry store (Redis) is unavailable: {error}"
    return str(error)
