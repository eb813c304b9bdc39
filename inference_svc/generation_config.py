"""What a checkpoint's `generation_config.json` says about stopping and sampling; torch-free.

Like vLLM's `--generation-config auto`: the sampling parameters it sets (`temperature`, `top_p`,
`top_k`, `min_p`, `repetition_penalty`, and `max_new_tokens` as `max_tokens`) become the defaults
of requests that leave them unset; everything else in the file (`do_sample`, `max_length`, beam
settings ...) is ignored. Its `eos_token_id` (an int or a list) adds to the end-of-sequence ids
of `config.json` and the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from loraserve.errors import InvalidModel

# generation_config.json name -> SamplingParams field, and the type it must have
SAMPLING_FIELDS = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "max_new_tokens": ("max_tokens", int),
}


@dataclass(frozen=True)
class GenerationConfig:
    """The parts of `generation_config.json` the engine honours (empty when there is no file)."""

    eos_token_ids: tuple[int, ...] = ()
    # SamplingParams field -> the checkpoint's default, for the fields the file sets
    sampling_defaults: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> GenerationConfig:
        path = Path(model_dir) / "generation_config.json"
        raw = read_json_object(path)
        defaults = {}
        for name, (param, kind) in SAMPLING_FIELDS.items():
            value = raw.get(name)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (kind is int and value != int(value))
            ):
                raise InvalidModel(f"{path}: {name} must be a {kind.__name__}, got {value!r}")
            defaults[param] = kind(value)
        return cls(token_ids(raw.get("eos_token_id"), f"{path}: eos_token_id"), MappingProxyType(defaults))


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file holding one object; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidModel(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise InvalidModel(f"{path} must hold a JSON object")
    return raw


def token_ids(value, what: str) -> tuple[int, ...]:
    """An `eos_token_id` entry (absent, one id or a list of ids) as a tuple."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise InvalidModel(f"{what} must be an int or a list of ints, got {value!r}")
    return tuple(values)
