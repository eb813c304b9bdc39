"""Typed errors of the data plane. The gRPC layer maps each family to one status code.

The base families (`LoraServeError`, `InvalidArgument`) and the adapter-format and model errors
the engine also raises live in `loraserve.errors`, shared with the adapter manager.
"""

from __future__ import annotations

from loraserve.errors import ChatTemplateError as ChatTemplateError  # chat prompts (loraserve.chat_template)
from loraserve.errors import InvalidArgument, LoraServeError, unknown_adapter_message

# --- INVALID_ARGUMENT --------------------------------------------------------------------------


class InvalidRequest(InvalidArgument):
    """A generation request has a bad field; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# --- NOT_FOUND / ALREADY_EXISTS ----------------------------------------------------------------


class AdapterNotFound(LoraServeError):
    """No adapter with that id is known to this engine (maps to NOT_FOUND)."""

    def __init__(self, adapter_id: str):
        super().__init__(unknown_adapter_message(adapter_id))
        self.adapter_id = adapter_id


class AdapterAlreadyExists(LoraServeError):
    """An adapter id is taken by a different source (maps to ALREADY_EXISTS)."""


class RequestAlreadyExists(LoraServeError):
    """A request id is already in flight (maps to ALREADY_EXISTS)."""


# --- RESOURCE_EXHAUSTED / FAILED_PRECONDITION ---------------------------------------------------


class ResourceExhausted(LoraServeError):
    """A capacity limit refused the operation (maps to RESOURCE_EXHAUSTED)."""


class NoEvictableSlot(ResourceExhausted):
    """Every candidate slot or cache entry is pinned or in use."""


class HostCacheFull(NoEvictableSlot):
    """A managed replica's host cache is full and the adapter manager has not named what to evict."""


class QueueFull(ResourceExhausted):
    """The waiting queue is at its limit."""


class PromptTooLong(InvalidRequest):
    """The prompt (plus max_tokens) cannot fit the sequence limit."""


class FailedPrecondition(LoraServeError):
    """The current state forbids the operation (maps to FAILED_PRECONDITION)."""


class AdapterInUse(FailedPrecondition):
    """The adapter has running requests or is pinned, so it cannot be evicted."""


# --- UNAVAILABLE -------------------------------------------------------------------------------


class Unavailable(LoraServeError):
    """The service cannot take the request now; retrying later or elsewhere may work (UNAVAILABLE)."""


class Draining(Unavailable):
    """The server is starting or shutting down and accepts no new requests."""
