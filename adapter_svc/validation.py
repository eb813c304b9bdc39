"""Adapter validation against the engine configurations the cluster actually runs.

A `Profile` is one (base model, engine configuration) pair: each live replica brings its own when it
joins; `--model-config` supplies one for a manager with no replica yet. An adapter must pass
`inference_svc.adapters.inspect_adapter` against every live profile, and hold only finite weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adapter_svc import errors
from adapter_svc.config import ManagerConfig
from inference_svc import errors as engine_errors
from inference_svc.adapters import WEIGHTS_FILE, AdapterManifest, inspect_adapter
from inference_svc.config import EngineConfig
from inference_svc.model_config import ModelConfig

# EngineConfig fields a replica reports that matter for validating and placing adapters.
ENGINE_FIELDS = ("max_loras", "max_lora_rank", "max_cpu_loras", "lora_target_modules", "lora_dtype")


@dataclass(frozen=True)
class Profile:
    source: str  # "replica r1" or "--model-config"
    model: ModelConfig
    engine: EngineConfig


def engine_from_dict(raw: dict) -> EngineConfig:
    """The validation-relevant part of a replica's engine configuration (raises ValueError)."""
    return EngineConfig(
        max_loras=int(raw["max_loras"]),
        max_lora_rank=int(raw["max_lora_rank"]),
        max_cpu_loras=int(raw["max_cpu_loras"]),
        lora_target_modules=tuple(raw["lora_target_modules"]),
        lora_dtype=raw.get("lora_dtype") or "auto",
    )


def profile_from_replica(replica_id: str, engine_json: str, model_json: str) -> Profile:
    model = ModelConfig.from_dict(json.loads(model_json))
    return Profile(f"replica {replica_id}", model, engine_from_dict(json.loads(engine_json)))


def profile_from_flags(config: ManagerConfig) -> Profile | None:
    """The --model-config profile, or None when the flag is unset."""
    if config.model_config is None:
        return None
    path = Path(config.model_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model_config ({config.model_config!r}) must be a config.json or a model directory")
    model = ModelConfig.from_dict(json.loads(path.read_text()))
    engine = EngineConfig(max_lora_rank=config.max_lora_rank, lora_target_modules=config.lora_target_modules)
    return Profile("--model-config", model, engine)


def validate(directory: Path, profiles: list[Profile], label: str) -> AdapterManifest:
    """Check staged adapter files against every profile; blocking (reads every tensor once).

    Raises InvalidAdapter naming the problem, with `label` (what the client sent) in place of the
    staging path, and NoValidationContext when there is no profile at all.
    """
    if not profiles:
        raise errors.NoValidationContext(
            "no replica has joined and the manager has no --model-config: cannot validate adapters"
        )
    manifest = None
    for profile in profiles:
        try:
            manifest = inspect_adapter(directory, profile.model, profile.engine)
        except engine_errors.InvalidArgument as e:
            suffix = f" (engine of {profile.source})" if len(profiles) > 1 else ""
            raise errors.InvalidAdapter(str(e).replace(str(directory), label) + suffix) from e
    _check_finite(directory / WEIGHTS_FILE, label)
    return manifest


def _check_finite(weights: Path, label: str) -> None:
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                if not torch.isfinite(f.get_tensor(name)).all():
                    raise errors.InvalidAdapter(f"{label}: tensor {name!r} holds NaN or Inf")
    except SafetensorError as e:
        raise errors.InvalidAdapter(f"{label}: {WEIGHTS_FILE} cannot be read ({e})") from e
