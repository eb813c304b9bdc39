"""PEFT LoRA adapters into host memory: the weights as tensors, ready for a slot.

The format itself (config checks, the safetensors header, the manifest) is torch-free and shared
with the adapter manager: `loraserve.peft_format`. `load_adapter` reads the weights file once,
validates it with that module from those bytes, and returns per-(layer, module) tensors with the
scaling folded into B; `inspect_adapter` is the format's header-only check that can also read the
pickle weights an engine may be allowed to accept.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from inference_svc.config import EngineConfig
from loraserve import errors, peft_format
from loraserve.model_summary import ModelConfig
from loraserve.peft_format import (
    PICKLE_WEIGHTS_FILE,
    TENSOR_KEY_RE,
    WEIGHTS_FILE,
    AdapterFiles,
    AdapterManifest,
    HeaderLimits,
    TensorInfo,
    build_manifest,
    check_adapter_config,
    header_length,
    parse_safetensors_header,
    read_adapter_config,
    weights_path,
)

# safetensors dtype code -> torch dtype (the codes of `peft_format.SAFETENSORS_DTYPE_SIZES`).
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class LoraAdapter:
    """An adapter in host memory: A and scaled B per (layer, module), in the slot dtype."""

    adapter_id: str
    manifest: AdapterManifest
    sha256: str
    weights: dict  # {(layer, module): (A [r, in], B_scaled [out, r])}

    @property
    def rank(self) -> int:
        return self.manifest.rank

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def inspect_adapter(
    path: str | Path, model: ModelConfig, engine: EngineConfig, files: AdapterFiles | None = None
) -> AdapterManifest:
    """`peft_format.inspect_adapter` against this engine's limits, reading allowed pickle weights."""
    return peft_format.inspect_adapter(
        path,
        model,
        engine.adapter_limits,
        files,
        pickle_tensors=lambda p: _pickle_tensor_infos(_load_pickle(p)),
    )


def load_adapter(
    adapter_id: str,
    path: str | Path,
    model: ModelConfig,
    engine: EngineConfig,
    dtype: torch.dtype,
    files: AdapterFiles | None = None,
) -> LoraAdapter:
    """Read and validate an adapter; B is pre-multiplied by its scaling, all cast to `dtype`.

    The file is read once into a buffer that the returned tensors share where they can (no copy
    for tensors already in `dtype`); its sha256 is computed on another thread meanwhile. With
    `files`, those bytes are the directory's contents and nothing is read.
    """
    path = Path(path)
    if files is None and not path.is_dir():
        raise errors.AdapterFilesMissing(f"{path}: adapter directory does not exist")
    limits = engine.adapter_limits
    header_limits = HeaderLimits.for_model(model)
    cfg = read_adapter_config(path, files)
    check_adapter_config(cfg, limits, str(path))
    if files is not None:
        weights_file, data = path / WEIGHTS_FILE, files.weights
    else:
        weights_file = weights_path(path, limits)
        data = bytearray(weights_file.stat().st_size)
        with weights_file.open("rb") as f, memoryview(data) as view:  # the one read of the weights
            got = f.readinto(view[:8])
            if weights_file.name == WEIGHTS_FILE:  # the header's length is bounded before the read
                header_length(bytes(view[:got]), len(data), str(weights_file), header_limits)
            f.readinto(view[got:])
    sha = _HASHER.submit(lambda: hashlib.sha256(data).hexdigest())  # hashlib releases the GIL
    section = None
    if weights_file.name == PICKLE_WEIGHTS_FILE:
        state = _load_pickle(weights_file)
        tensors = _pickle_tensor_infos(state)
    else:
        tensors = parse_safetensors_header(data, len(data), str(weights_file), header_limits)
        section = _data_section(data, tensors)
        state = _tensors_from_bytes(data, tensors, section)
    manifest = build_manifest(path, cfg, tensors, len(data), model, limits)
    max_abs = _check_finite(state, str(weights_file), section)
    if max_abs * max(manifest.module_scales.values()) >= torch.finfo(dtype).max:
        raise errors.NonFiniteWeights(
            f"{weights_file}: weights up to {max_abs:.3g} overflow {dtype} once scaled by "
            f"{max(manifest.module_scales.values()):.3g}"
        )
    by_name = {}
    for name, tensor in state.items():
        m = TENSOR_KEY_RE.fullmatch(name)
        by_name[(int(m["layer"]), m["module"], m["kind"])] = tensor
    weights = {}
    for key, scale in manifest.module_scales.items():
        a = by_name[(*key, "lora_A")]
        b = by_name[(*key, "lora_B")].to(torch.float32) * scale  # not in place: `data` is being hashed
        weights[key] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return LoraAdapter(adapter_id=adapter_id, manifest=manifest, sha256=sha.result(), weights=weights)


_HASHER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-sha256")


def _data_section(data: bytearray, tensors: tuple[TensorInfo, ...]) -> torch.Tensor | None:
    """The whole data section as one flat tensor, when every tensor shares one aligned dtype."""
    if not tensors or len({t.dtype for t in tensors}) != 1 or tensors[0].end == tensors[0].start == 0:
        return None
    dtype = TORCH_DTYPES[tensors[0].dtype]
    size = dtype.itemsize
    (n,) = struct.unpack("<Q", data[:8])
    span = len(data) - 8 - n
    if (8 + n) % size or span % size or span == 0 or any(t.start % size for t in tensors):
        return None
    return torch.frombuffer(data, dtype=dtype, count=span // size, offset=8 + n)


def _check_finite(state: dict, where: str, section: torch.Tensor | None = None) -> float:
    """Raise NonFiniteWeights naming the first tensor with NaN/Inf; else the largest |value|.

    `section` (all tensors' bytes as one tensor) answers in one pass when every value is finite.
    """
    if section is not None and section.dtype != torch.float64:
        lo, hi = torch.aminmax(section)
        if torch.isfinite(lo) and torch.isfinite(hi):
            return max(-lo.item(), hi.item())
    max_abs = 0.0
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        lo, hi = torch.aminmax(tensor.float() if tensor.dtype == torch.float64 else tensor)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):  # NaN or Inf reach min or max
            raise errors.NonFiniteWeights(f"{where}: tensor {name!r} holds NaN or Inf")
        max_abs = max(max_abs, -lo.item(), hi.item())
    return max_abs


def _tensors_from_bytes(
    data: bytearray, tensors: tuple[TensorInfo, ...], section: torch.Tensor | None
) -> dict:
    """Tensors viewing `data` (copied only where an offset is misaligned for the dtype)."""
    (n,) = struct.unpack("<Q", data[:8])
    base = 8 + n
    out = {}
    for t in tensors:
        dtype = TORCH_DTYPES[t.dtype]
        size = dtype.itemsize
        count = (t.end - t.start) // size
        if section is not None:  # slices of one flat view: cheaper than a frombuffer each
            out[t.name] = section[t.start // size : t.start // size + count].view(t.shape)
        elif count == 0:
            out[t.name] = torch.empty(t.shape, dtype=dtype)
        elif (base + t.start) % size == 0:
            out[t.name] = torch.frombuffer(data, dtype=dtype, count=count, offset=base + t.start).view(
                t.shape
            )
        else:
            raw = bytes(data[base + t.start : base + t.end])
            out[t.name] = torch.frombuffer(bytearray(raw), dtype=dtype).view(t.shape)
    return out


def _pickle_tensor_infos(state: dict) -> tuple[TensorInfo, ...]:
    codes = {dtype: code for code, dtype in TORCH_DTYPES.items()}
    infos = []
    for name, tensor in state.items():
        if tensor.dtype not in codes:
            raise errors.UnsupportedTensorDtype(f"tensor {name!r} has dtype {tensor.dtype}")
        infos.append(TensorInfo(name, codes[tensor.dtype], tuple(tensor.shape), 0, 0))
    return tuple(infos)


def _load_pickle(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise errors.CorruptSafetensors(f"{path}: cannot read pickle weights ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise errors.CorruptSafetensors(f"{path}: pickle does not hold a dict of tensors")
    return state
