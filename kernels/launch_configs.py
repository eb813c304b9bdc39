"""Launch parameters for the Triton LoRA kernels, from a table keyed by shape class.

No autotuning happens on the serving path: every launch looks its parameters up here.

Key: `(op, shape_class, rank_bucket)`
  - `op`: "shrink" or "expand";
  - `shape_class`: "decode" when every active slot has at most `DECODE_MAX_TOKENS` tokens in the
    step (one token block per slot), "prefill" otherwise;
  - `rank_bucket`: the smallest of `RANK_BUCKETS` >= the slot rank R (`lora_a.shape[1]`).

`DEFAULT_CONFIGS` holds untuned starting points that are valid on any GPU. Tuned entries for a
GPU live in `kernels/configs/<device>.json`, where `<device>` is `config_file_stem(name)` of
`torch.cuda.get_device_name()` (e.g. "NVIDIA H100 80GB HBM3" -> `NVIDIA_H100_80GB_HBM3.json`).
A file may hold any subset of keys; missing keys fall back to the defaults. Its layout:

    {"shrink": {"decode": {"16": {"block_m": 16, "block_n": 16, "block_k": 256,
                                  "split_k": 8, "num_warps": 4, "num_stages": 2}, ...}, ...},
     "expand": {...}}

Write one with `python -m kernels.tune` on the target GPU (see kernels/README.md).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from pathlib import Path

import torch

OPS = ("shrink", "expand")
SHAPE_CLASSES = ("decode", "prefill")
RANK_BUCKETS = (16, 32, 64, 128, 256, 512)
DECODE_MAX_TOKENS = 16
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one kernel launch.

    Shrink (`[n,K] @ [K,R]`): block_n tiles the rank R, block_k tiles the reduction over K.
    Expand (`[n,R] @ [R,N]`): block_n tiles the output width N, block_k tiles the reduction over R.
    Block sizes are powers of two >= 16 (the minimum of `tl.dot`); host wrappers shrink them to
    the problem size, so a large block never costs more than the problem needs.
    """

    block_m: int  # tokens per program
    block_n: int  # output columns per program
    block_k: int  # reduction step
    split_k: int = 1  # programs sharing one reduction (shrink only; partial sums via atomics)
    num_warps: int = 4  # warps per program
    num_stages: int = 2  # software-pipelining depth of the reduction loop

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} ({value}) must be a power of two >= 16")
        for name in ("split_k", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")


def _cfg(bm: int, bn: int, bk: int, sk: int = 1, warps: int = 4, stages: int = 2) -> LaunchConfig:
    return LaunchConfig(bm, bn, bk, sk, warps, stages)


# Starting points, not measured: decode tiles are thin in M and long in K (memory bound; split K
# to fill the GPU when few adapters are active), prefill tiles reuse each weight tile over 64
# tokens. Every entry compiles without register spills for fp16, bf16 and fp32 on sm_80 and
# sm_90 (`python -m kernels.compile_check --arch 80|90`).
DEFAULT_CONFIGS: dict[tuple[str, str, int], LaunchConfig] = {
    ("shrink", "decode", 16): _cfg(16, 16, 256, 8),
    ("shrink", "decode", 32): _cfg(16, 32, 256, 8),
    ("shrink", "decode", 64): _cfg(16, 64, 128, 4),
    ("shrink", "decode", 128): _cfg(16, 128, 64, 4, stages=3),
    ("shrink", "decode", 256): _cfg(16, 128, 64, 4, stages=3),
    ("shrink", "decode", 512): _cfg(16, 128, 64, 2, stages=3),
    ("shrink", "prefill", 16): _cfg(64, 16, 128, 2, stages=3),
    ("shrink", "prefill", 32): _cfg(64, 32, 128, 2, 8, 3),
    ("shrink", "prefill", 64): _cfg(64, 64, 64, 1, stages=3),
    ("shrink", "prefill", 128): _cfg(64, 128, 64, 1, 8, 3),
    ("shrink", "prefill", 256): _cfg(64, 128, 64, 1, 8, 3),
    ("shrink", "prefill", 512): _cfg(64, 128, 64, 1, 8, 3),
    ("expand", "decode", 16): _cfg(16, 128, 16),
    ("expand", "decode", 32): _cfg(16, 128, 32),
    ("expand", "decode", 64): _cfg(16, 64, 64),
    ("expand", "decode", 128): _cfg(16, 64, 64, stages=3),
    ("expand", "decode", 256): _cfg(16, 64, 64, stages=3),
    ("expand", "decode", 512): _cfg(16, 64, 64, stages=3),
    ("expand", "prefill", 16): _cfg(64, 128, 16, 1, 8),
    ("expand", "prefill", 32): _cfg(64, 128, 32, 1, 8),
    ("expand", "prefill", 64): _cfg(64, 128, 32, 1, 8, 3),
    ("expand", "prefill", 128): _cfg(64, 128, 32, 1, 8, 3),
    ("expand", "prefill", 256): _cfg(64, 128, 32, 1, 8, 3),
    ("expand", "prefill", 512): _cfg(64, 128, 32, 1, 8, 3),
}


def shape_class(max_tokens_per_slot: int) -> str:
    """Return "decode" if every active slot fits one thin token block, else "prefill"."""
    return "decode" if max_tokens_per_slot <= DECODE_MAX_TOKENS else "prefill"


def rank_bucket(rank: int) -> int:
    """Smallest bucket >= rank (ranks above 512 use the 512 entry)."""
    return next((b for b in RANK_BUCKETS if rank <= b), RANK_BUCKETS[-1])


def config_file_stem(name: str) -> str:
    """File name (without .json) of the tuned table for a device name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def parse_config_table(table: dict, source: str) -> dict[tuple[str, str, int], LaunchConfig]:
    """Validate a JSON-style table (`{op: {class: {bucket: {field: int}}}}`) into config entries.

    Raises:
        ValueError: naming `source` and the offending key on any unknown op, class, bucket or
            field, or an invalid value.
    """
    known_fields = {f.name for f in fields(LaunchConfig)}
    entries = {}
    for op, classes in table.items():
        if op not in OPS:
            raise ValueError(f"{source}: op {op!r} must be one of {OPS}")
        for cls, buckets in classes.items():
            if cls not in SHAPE_CLASSES:
                raise ValueError(f"{source}: shape class {cls!r} must be one of {SHAPE_CLASSES}")
            for bucket, params in buckets.items():
                if not str(bucket).isdigit() or int(bucket) not in RANK_BUCKETS:
                    raise ValueError(f"{source}: rank bucket {bucket!r} must be one of {RANK_BUCKETS}")
                unknown = set(params) - known_fields
                if unknown:
                    raise ValueError(f"{source}: {op}/{cls}/{bucket} has unknown fields {sorted(unknown)}")
                try:
                    entries[(op, cls, int(bucket))] = LaunchConfig(**params)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{source}: {op}/{cls}/{bucket}: {e}") from e
    return entries


def config_table_to_json(entries: dict[tuple[str, str, int], LaunchConfig]) -> dict:
    """Inverse of `parse_config_table`: the nested JSON layout of a tuned file."""
    table: dict = {}
    for (op, cls, bucket), cfg in sorted(entries.items()):
        table.setdefault(op, {}).setdefault(cls, {})[str(bucket)] = asdict(cfg)
    return table


@cache
def device_table(name: str) -> dict[tuple[str, str, int], LaunchConfig]:
    """Defaults overlaid with `kernels/configs/<device>.json` when that file exists."""
    table = dict(DEFAULT_CONFIGS)
    path = CONFIG_DIR / f"{config_file_stem(name)}.json"
    if path.is_file():
        table.update(parse_config_table(json.loads(path.read_text()), str(path)))
    return table


@cache
def device_name(device: torch.device) -> str:
    """The name tuned tables are keyed by: the CUDA device name, or the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@contextlib.contextmanager
def overridden(device: torch.device, key: tuple[str, str, int], cfg: LaunchConfig) -> Iterator[None]:
    """Use `cfg` for `key` on `device` inside the block (for `kernels.tune`; not thread-safe)."""
    table = device_table(device_name(device))
    previous = table[key]
    table[key] = cfg
    try:
        yield
    finally:
        table[key] = previous


def for_dtype(cfg: LaunchConfig, itemsize: int) -> LaunchConfig:
    """`cfg` for operands of `itemsize` bytes: 4-byte (fp32) operands get half the reduction
    block, so one pipeline stage holds the same bytes as with fp16/bf16 (and fits registers)."""
    return replace(cfg, block_k=max(16, cfg.block_k // 2)) if itemsize >= 4 else cfg


def get_config(
    op: str, max_tokens_per_slot: int, rank: int, device: torch.device, itemsize: int
) -> LaunchConfig:
    """Launch parameters for `op` on `device` for this step's shape class, rank bucket and the
    byte size of the dot operands (see `for_dtype`)."""
    key = (op, shape_class(max_tokens_per_slot), rank_bucket(rank))
    return for_dtype(device_table(device_name(device))[key], itemsize)
