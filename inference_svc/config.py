"""The engine configuration: fixed before the model is built, validated up front, immutable.

Changing any field means building a new engine (DESIGN.md section 2). Command-line flags and
environment variables are parsed into this object once, in `inference_svc.cli`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kernels import check_backend_ready
from loraserve.engine_limits import ALL_TARGET_MODULES, DTYPE_NAMES, AdapterLimits
from loraserve.env_config import require

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that sizes the engine's preallocated memory and bounds its batches."""

    # Distinct adapters that can run in one batch = accelerator slots preallocated.
    max_loras: int = 4
    # Rank every slot is sized for (1..512); smaller adapters are zero-padded, larger rejected.
    max_lora_rank: int = 16
    # Adapters cached in host memory for fast swap; None means "= max_loras".
    max_cpu_loras: int | None = None
    # dtype of the slot tensors: "auto" (= model dtype), "float32", "bfloat16" or "float16".
    lora_dtype: str = "auto"
    # Linear layers that may carry LoRA; adapters targeting others are rejected.
    lora_target_modules: tuple[str, ...] = ALL_TARGET_MODULES
    # Most sequences in one scheduling step.
    max_num_seqs: int = 64
    # Most tokens (prefill chunks + decodes) in one scheduling step.
    max_num_batched_tokens: int = 2048
    # Longest sequence (prompt + generated); None means the model's max_position_embeddings.
    max_model_len: int | None = None
    # Bytes of KV cache allocated up front (all layers, keys and values).
    kv_cache_bytes: int = 256 * 1024**2
    # Tokens per KV-cache block (the unit of allocation).
    kv_block_size: int = 16
    # Requests allowed to wait for a place in the batch before new ones are refused.
    max_queue_len: int = 1024
    # Longest prompt accepted, in tokens (INVALID_ARGUMENT above it); None = only max_model_len.
    max_prompt_tokens: int | None = None
    # Largest max_tokens a request may ask for (INVALID_ARGUMENT above it); None = only max_model_len.
    max_output_tokens: int | None = None
    # Model weights dtype: "auto" (= config.json's torch_dtype on CUDA, float32 on CPU) or a name.
    dtype: str = "auto"
    # "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # LoRA op backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    lora_backend: str = "auto"
    # Paged-attention backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    attention_backend: str = "auto"
    # Run every step eagerly; False captures decode steps in CUDA graphs on CUDA (ignored on CPU).
    enforce_eager: bool = False
    # Allow pickle (.bin) adapter weights; off by default because unpickling runs code.
    allow_pickle_adapters: bool = False

    def __post_init__(self) -> None:
        limits = self.adapter_limits  # validates the adapter-facing fields
        object.__setattr__(self, "max_cpu_loras", limits.max_cpu_loras)
        object.__setattr__(self, "lora_target_modules", limits.lora_target_modules)
        require(
            self.dtype == "auto" or self.dtype in DTYPES,
            "dtype",
            self.dtype,
            f"must be 'auto' or one of {sorted(DTYPES)}",
        )
        require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        require(
            self.max_num_batched_tokens >= self.max_num_seqs,
            "max_num_batched_tokens",
            self.max_num_batched_tokens,
            f"must be >= max_num_seqs ({self.max_num_seqs})",
        )
        require(
            self.max_model_len is None or self.max_model_len >= 2,
            "max_model_len",
            self.max_model_len,
            "must be >= 2",
        )
        require(self.kv_block_size >= 1, "kv_block_size", self.kv_block_size, "must be >= 1")
        require(self.kv_cache_bytes > 0, "kv_cache_bytes", self.kv_cache_bytes, "must be > 0")
        require(self.max_queue_len >= 1, "max_queue_len", self.max_queue_len, "must be >= 1")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be >= 1 (or unset)")
        require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            self.device,
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )
        for name in ("lora_backend", "attention_backend"):
            require(getattr(self, name) in BACKENDS, name, getattr(self, name), f"must be one of {BACKENDS}")

    @property
    def adapter_limits(self) -> AdapterLimits:
        """The torch-free part of this configuration that decides which adapters it accepts."""
        return AdapterLimits(
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras,
            lora_dtype=self.lora_dtype,
            lora_target_modules=self.lora_target_modules,
            allow_pickle_adapters=self.allow_pickle_adapters,
        )

    def replace(self, **changes) -> EngineConfig:
        """A new, validated config with `changes` applied (the only way to 'change' one)."""
        return dataclasses.replace(self, **changes)

    def resolved_device(self) -> torch.device:
        """The device to run on; a CUDA device this torch build or machine lacks is a ValueError
        that says what to do, not torch's traceback."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            require(
                torch.version.cuda is not None,
                "device",
                self.device,
                f"needs a CUDA build of torch (this one is {torch.__version__}); install one or use --device cpu",
            )
            count = torch.cuda.device_count()
            require(
                device.index is None and count > 0 or device.index is not None and device.index < count,
                "device",
                self.device,
                f"is not on this machine ({count} CUDA devices visible); use --device auto or cpu",
            )
        return device

    def check_runtime(self) -> None:
        """What start-up checks before anything listens: the device exists and the kernel
        backends can run on it (ValueError naming the field and what to do)."""
        device = self.resolved_device()
        for name in ("lora_backend", "attention_backend"):
            check_backend_ready(getattr(self, name), device)

    def model_dtype(self, config_dtype: str | None) -> torch.dtype:
        """Weights dtype: explicit, else config.json's dtype on CUDA, else float32 on CPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.resolved_device().type == "cpu":
            return torch.float32
        return DTYPES.get(config_dtype or "", torch.bfloat16)

    def slot_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """dtype of the LoRA slot tensors ("auto" follows the model)."""
        return model_dtype if self.lora_dtype == "auto" else DTYPES[self.lora_dtype]
