"""Typed errors of the data plane. The gRPC layer maps each family to one status code."""

from __future__ import annotations


class LoraServeError(Exception):
    """Base class of every error the inference service raises on purpose."""


# --- INVALID_ARGUMENT --------------------------------------------------------------------------


class InvalidArgument(LoraServeError):
    """A request or setting is malformed (maps to INVALID_ARGUMENT)."""


class InvalidModel(InvalidArgument):
    """The model directory cannot be served (missing files, unsupported architecture)."""


class InvalidAdapter(InvalidArgument):
    """An adapter cannot be loaded; subclasses name the exact problem."""


class AdapterFilesMissing(InvalidAdapter):
    """adapter_config.json or adapter_model.safetensors is absent."""


class AdapterConfigInvalid(InvalidAdapter):
    """adapter_config.json is not valid JSON or lacks a required field."""


class RankTooLarge(InvalidAdapter):
    """The adapter's rank exceeds the engine's max_lora_rank."""


class RankInvalid(InvalidAdapter):
    """r <= 0 (or a non-integer rank)."""


class UnsupportedTargetModule(InvalidAdapter):
    """The adapter targets a module the engine cannot carry LoRA on."""


class ShapeMismatch(InvalidAdapter):
    """A tensor's shape does not match the base model."""


class DoraNotSupported(InvalidAdapter):
    """use_dora is set."""


class ModulesToSaveNotSupported(InvalidAdapter):
    """modules_to_save is set (full-weight copies of base modules)."""


class BiasNotSupported(InvalidAdapter):
    """bias is not "none"."""


class NonFiniteWeights(InvalidAdapter):
    """A tensor holds NaN or Inf."""


class CorruptSafetensors(InvalidAdapter):
    """The safetensors file is truncated, has a bad header, or lies about offsets/dtypes."""


class UnsupportedTensorDtype(InvalidAdapter):
    """A LoRA tensor is not a floating-point dtype the engine reads."""


class PickleWeightsNotAllowed(InvalidAdapter):
    """Only pickle weights (.bin) are present and they were not explicitly allowed."""


class InvalidRequest(InvalidArgument):
    """A generation request has a bad field; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# --- NOT_FOUND / ALREADY_EXISTS ----------------------------------------------------------------


class AdapterNotFound(LoraServeError):
    """No adapter with that id is known to this engine (maps to NOT_FOUND)."""

    def __init__(self, adapter_id: str):
        super().__init__(f"adapter {adapter_id!r} not found")
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
