"""What an engine accepts in an adapter, without the engine: torch-free, for both services.

`inference_svc.config.EngineConfig` validates its adapter fields with `AdapterLimits` and hands
one (`EngineConfig.adapter_limits`) to the PEFT checks; the adapter manager builds one from each
replica's reported engine configuration (or from its `--model-config` flags) and validates
uploads against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.env_config import require

ALL_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3's fused projections, which its checkpoints and PEFT adapters name as one module each: an
# engine serving LoRA on all of a fused module's parts serves it (or list it by name).
FUSED_TARGET_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
TARGET_MODULE_NAMES = (*ALL_TARGET_MODULES, *FUSED_TARGET_MODULES)


def serves(targets: tuple[str, ...], module: str) -> bool:
    """Whether an engine serving LoRA on `targets` serves an adapter module named `module`."""
    parts = FUSED_TARGET_MODULES.get(module)
    return module in targets or (parts is not None and all(p in targets for p in parts))


MAX_LORA_RANK_LIMIT = 512
# Names of the floating-point dtypes slot tensors and model weights may use.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class AdapterLimits:
    """The adapter-facing fields of an engine configuration; meanings and rules as in EngineConfig."""

    max_loras: int = 4  # accelerator slots
    max_lora_rank: int = 16  # adapters above it are rejected
    max_cpu_loras: int | None = None  # host-cache entries; None = max_loras
    lora_dtype: str = "auto"  # slot dtype: "auto" or one of DTYPE_NAMES
    lora_target_modules: tuple[str, ...] = ALL_TARGET_MODULES  # modules that may carry LoRA
    allow_pickle_adapters: bool = False  # accept .bin weights (only an engine can read them)

    def __post_init__(self) -> None:
        require(self.max_loras >= 1, "max_loras", self.max_loras, "must be >= 1")
        require(
            1 <= self.max_lora_rank <= MAX_LORA_RANK_LIMIT,
            "max_lora_rank",
            self.max_lora_rank,
            f"must be in 1..{MAX_LORA_RANK_LIMIT}",
        )
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        require(
            self.lora_dtype == "auto" or self.lora_dtype in DTYPE_NAMES,
            "lora_dtype",
            self.lora_dtype,
            f"must be 'auto' or one of {sorted(DTYPE_NAMES)}",
        )
        targets = tuple(self.lora_target_modules)
        object.__setattr__(self, "lora_target_modules", targets)
        unknown = sorted(set(targets) - set(TARGET_MODULE_NAMES))
        require(
            not unknown and len(targets) > 0,
            "lora_target_modules",
            list(targets),
            f"must be a non-empty subset of {list(TARGET_MODULE_NAMES)}",
        )

    @classmethod
    def from_dict(cls, raw: dict) -> AdapterLimits:
        """From an engine configuration a replica reports (raises ValueError, KeyError, TypeError)."""
        return cls(
            max_loras=int(raw["max_loras"]),
            max_lora_rank=int(raw["max_lora_rank"]),
            max_cpu_loras=int(raw["max_cpu_loras"]),
            lora_target_modules=tuple(raw["lora_target_modules"]),
            lora_dtype=raw.get("lora_dtype") or "auto",
        )
