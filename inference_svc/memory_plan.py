"""The memory plan: what an engine configuration will allocate, computed before allocating it.

Everything here derives from `config.json` and the `EngineConfig` alone, so `plan` can run on a
laptop for a model that only fits a big accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from inference_svc.config import EngineConfig
from inference_svc.lora_slots import workspace_shape
from kernels import attention
from loraserve.engine_limits import serves
from loraserve.model_summary import ModelConfig

# A rank this many times the largest adapter rank wastes most of every slot.
RANK_WASTE_FACTOR = 4


@dataclass(frozen=True)
class MemoryPlan:
    model_dtype: str
    lora_dtype: str
    bytes_per_slot: int  # one adapter at max_lora_rank, every layer and target module
    slots_bytes: int  # max_loras slots on the accelerator
    lora_workspace_bytes: int  # the LoRA ops' scratch memory for the largest step
    attention_workspace_bytes: int  # attention output, block tables and scratch of the largest step
    host_cache_bytes: int  # max_cpu_loras adapters in host memory, at most
    weights_bytes: int  # base model parameters
    kv_cache_bytes: int  # KV cache as allocated (whole blocks)
    kv_cache_blocks: int
    kv_cache_tokens: int
    max_model_len: int
    warnings: tuple[str, ...]

    @property
    def device_total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.kv_cache_bytes
            + self.slots_bytes
            + self.lora_workspace_bytes
            + self.attention_workspace_bytes
        )

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["device_total_bytes"] = self.device_total_bytes
        d["warnings"] = list(self.warnings)
        return d

    def render(self) -> str:
        rows = [
            ("model dtype / lora dtype", f"{self.model_dtype} / {self.lora_dtype}"),
            ("bytes per slot", human_bytes(self.bytes_per_slot)),
            ("slots (max_loras)", human_bytes(self.slots_bytes)),
            ("LoRA workspace (max_num_batched_tokens)", human_bytes(self.lora_workspace_bytes)),
            ("attention workspace (largest step)", human_bytes(self.attention_workspace_bytes)),
            ("host cache (max_cpu_loras), at most", human_bytes(self.host_cache_bytes)),
            ("base model weights", human_bytes(self.weights_bytes)),
            (
                f"KV cache ({self.kv_cache_blocks} blocks, {self.kv_cache_tokens} tokens)",
                human_bytes(self.kv_cache_bytes),
            ),
            ("accelerator total", human_bytes(self.device_total_bytes)),
            ("max_model_len", str(self.max_model_len)),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bytes_per_slot(model: ModelConfig, config: EngineConfig, lora_dtype: torch.dtype) -> int:
    """sum over layers and the model's served modules (fused ones as one) of
    max_lora_rank * (in + out) * dtype_size."""
    shapes = model.module_shapes()
    per_layer = sum(sum(shapes[m]) for m in shapes if serves(config.lora_target_modules, m))
    return model.num_layers * config.max_lora_rank * per_layer * lora_dtype.itemsize


def compute_plan(
    model: ModelConfig, config: EngineConfig, adapter_ranks: list[int] | None = None
) -> MemoryPlan:
    """Plan the engine's allocations; `adapter_ranks` (of known adapters) sharpen the warnings."""
    model_dtype = config.model_dtype(model.torch_dtype)
    lora_dtype = config.slot_dtype(model_dtype)
    per_slot = bytes_per_slot(model, config, lora_dtype)
    kv_per_token = model.kv_bytes_per_token(model_dtype.itemsize)
    block_bytes = kv_per_token * config.kv_block_size
    blocks = config.kv_cache_bytes // block_bytes
    max_len = config.max_model_len or model.max_context_len
    warnings = []
    if config.max_cpu_loras <= config.max_loras:
        warnings.append(
            f"max_cpu_loras ({config.max_cpu_loras}) <= max_loras ({config.max_loras}): no host "
            "room to swap adapters; every new adapter reloads from disk"
        )
    if adapter_ranks and max(adapter_ranks) * RANK_WASTE_FACTOR <= config.max_lora_rank:
        used = max(adapter_ranks) / config.max_lora_rank
        warnings.append(
            f"max_lora_rank ({config.max_lora_rank}) is far above the largest adapter rank "
            f"({max(adapter_ranks)}): {100 * (1 - used):.0f}% of every slot stays zero"
        )
    if lora_dtype != model_dtype:
        warnings.append(
            f"lora_dtype ({dtype_name(lora_dtype)}) differs from the model dtype "
            f"({dtype_name(model_dtype)}): every LoRA op converts between them"
        )
    if blocks * config.kv_block_size < max_len:
        warnings.append(
            f"KV cache holds {blocks * config.kv_block_size} tokens, fewer than max_model_len "
            f"({max_len}): the longest sequences cannot run"
        )
    return MemoryPlan(
        model_dtype=dtype_name(model_dtype),
        lora_dtype=dtype_name(lora_dtype),
        bytes_per_slot=per_slot,
        slots_bytes=config.max_loras * per_slot,
        lora_workspace_bytes=kernels.workspace_bytes(
            workspace_shape(
                model, config.max_lora_rank, config.lora_target_modules, config.max_num_batched_tokens
            ),
            model_dtype,
            lora_dtype,
            torch_backend=kernels.select_backend(config.lora_backend, config.resolved_device()) == "torch",
        ),
        attention_workspace_bytes=attention_workspace_bytes(model, config, model_dtype, max_len),
        host_cache_bytes=config.max_cpu_loras * per_slot,
        weights_bytes=model.num_parameters() * model_dtype.itemsize,
        kv_cache_bytes=blocks * block_bytes,
        kv_cache_blocks=blocks,
        kv_cache_tokens=blocks * config.kv_block_size,
        max_model_len=max_len,
        warnings=tuple(warnings),
    )


def attention_workspace_bytes(
    model: ModelConfig, config: EngineConfig, dtype: torch.dtype, max_len: int
) -> int:
    """The attention output of the largest step, the block-table array (twice on an accelerator:
    host and device copies), and on the torch backend its per-sequence scratch."""
    output = config.max_num_batched_tokens * model.num_heads * model.head_dim * dtype.itemsize
    tables = config.max_num_seqs * -(-max_len // config.kv_block_size) * 4
    if kernels.select_backend(config.attention_backend, config.resolved_device()) == "torch":
        return (
            output
            + tables
            + attention.torch_scratch_bytes(
                max_len,
                model.num_kv_heads,
                model.head_dim,
                dtype,
                model.num_heads if model.attn_softcap else 0,
            )
        )
    return output + 2 * tables


def human_bytes(n: int) -> str:
    """Exact byte count and a binary-unit figure, e.g. '1572864 B (1.50 MiB)'."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B ({value:.2f} {unit})"
        value /= 1024
    return f"{n} B ({value:.2f} TiB)"
