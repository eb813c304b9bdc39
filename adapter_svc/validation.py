"""What the manager accepts: request ids and labels, and adapters checked against the engine
configurations the cluster actually runs.

A `Profile` is one (base model, engine adapter limits) pair: each live replica brings its own when
it joins; `--model-config` supplies one for a manager with no replica yet. An adapter must pass
`loraserve.peft_format.inspect_adapter` against every live profile, and hold only finite weights.
Nothing here imports torch: the format and the limits come from the shared layer.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter_svc import errors
from adapter_svc.config import ManagerConfig
from loraserve import errors as shared_errors
from loraserve.engine_limits import AdapterLimits
from loraserve.model_summary import ModelConfig
from loraserve.names import ID_RE
from loraserve.peft_format import WEIGHTS_FILE, AdapterManifest, inspect_adapter, non_finite_tensor

MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 4096


def check_id(kind: str, value: str) -> None:
    """InvalidArgument unless `value` is a well-formed id (adapter, replica, tenant, page token)."""
    if not ID_RE.fullmatch(value or ""):
        raise errors.InvalidArgument(f"{kind} {value[:200]!r} must match {ID_RE.pattern}")


def check_labels(tenant: str, metadata: Mapping[str, str]) -> None:
    """InvalidArgument unless the tenant is an id (or empty) and the metadata is within bounds:
    sizes, and no control characters (NUL, ESC of ANSI escapes, newlines) in keys or values."""
    if tenant:
        check_id("tenant", tenant)
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise errors.InvalidArgument(f"metadata has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES}")
    for key, value in metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise errors.InvalidArgument(
                f"metadata {key[:40]!r}: keys must be 1..{MAX_METADATA_KEY} characters and values "
                f"at most {MAX_METADATA_VALUE}"
            )
        for what, text in (("key", key), ("value", value)):
            bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
            if bad is not None:
                raise errors.InvalidArgument(
                    f"metadata {key[:40]!r}: the {what} holds control character U+{ord(bad):04X}; "
                    "control characters (NUL, escape sequences, newlines) are not allowed"
                )


@dataclass(frozen=True)
class Profile:
    source: str  # "replica r1" or "--model-config"
    model: ModelConfig
    limits: AdapterLimits


def profile_from_replica(replica_id: str, engine_json: str, model_json: str) -> Profile:
    model = ModelConfig.from_dict(json.loads(model_json))
    return Profile(f"replica {replica_id}", model, AdapterLimits.from_dict(json.loads(engine_json)))


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
    limits = AdapterLimits(max_lora_rank=config.max_lora_rank, lora_target_modules=config.lora_target_modules)
    return Profile("--model-config", model, limits)


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
            manifest = inspect_adapter(directory, profile.model, profile.limits)
        except shared_errors.InvalidArgument as e:
            suffix = f" (engine of {profile.source})" if len(profiles) > 1 else ""
            raise errors.InvalidAdapter(str(e).replace(str(directory), label) + suffix) from e
    name = non_finite_tensor(directory / WEIGHTS_FILE, manifest.tensors)
    if name is not None:
        raise errors.InvalidAdapter(f"{label}: tensor {name!r} holds NaN or Inf")
    return manifest
