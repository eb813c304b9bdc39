"""Error types raised by the shared layer, and the base families both services build on.

The PEFT format (`loraserve.peft_format`), the model summary (`loraserve.model_summary`), routing
rules (`loraserve.routing`), the adapter-root allow-list (`loraserve.adapter_paths`) and chat
rendering (`loraserve.chat_template`) raise these.
Each service maps them to gRPC status codes in its own one place (`inference_svc.errors_grpc`,
`adapter_svc.errors`): every `InvalidArgument` is INVALID_ARGUMENT.
"""

from __future__ import annotations


class LoraServeError(Exception):
    """Base class of every error loraserve raises on purpose."""


def unknown_adapter_message(adapter_id: str) -> str:
    """The one message for an adapter id that is not registered, or that the caller may not see
    (a hidden adapter reads exactly like an unknown one), with what to do."""
    return f"adapter {adapter_id!r} is not registered (`loraserve list` shows what is; `loraserve register` adds one)"


class AddressUnavailable(LoraServeError):
    """A server cannot listen on its address (the port is taken, or the host is not this machine's)."""

    def __init__(self, address: str, flag: str = "--port"):
        super().__init__(
            f"cannot listen on {address}: the port is in use or the address is not this machine's; "
            f"stop what holds it or choose another with {flag} (0 = any free port)"
        )
        self.address = address


class InvalidArgument(LoraServeError):
    """A request, setting or file is malformed (maps to INVALID_ARGUMENT)."""


class InvalidModel(InvalidArgument):
    """The model directory cannot be served (missing files, unsupported architecture)."""


class ChatTemplateError(InvalidArgument):
    """A chat prompt cannot be rendered: no template, a template error or `raise_exception`.

    The message is the template's own, after "chat template: ".
    """

    def __init__(self, message: str):
        super().__init__(f"chat template: {message}")
        self.template_message = message


class PathNotAllowed(InvalidArgument):
    """An adapter path is not under an allow-listed adapter root (or escapes one)."""


# --- the adapter format: each names the exact problem -----------------------------------------


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


class TooManyTensors(CorruptSafetensors):
    """The safetensors header lists (or is long enough to list) more tensors than a LoRA adapter
    of the base model can have: layers x LoRA-capable modules x 2."""
