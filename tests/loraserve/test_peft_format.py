"""The torch-free PEFT format checks the manager relies on (`loraserve.peft_format`)."""

import json
import struct

import numpy as np
import pytest

from loraserve.peft_format import TensorInfo, non_finite_tensor, parse_safetensors_header

# A float's bits in each format: (one, +Inf, NaN).
BITS = {
    "F64": ("<f8", 1.0, np.inf, np.nan),
    "F32": ("<f4", 1.0, np.inf, np.nan),
    "F16": ("<f2", 1.0, np.inf, np.nan),
}
BF16 = {"one": 0x3F80, "inf": 0x7F80, "nan": 0x7FC0, "max": 0x7F7F}


def safetensors_bytes(tensors: dict[str, tuple[str, bytes]], pad: int = 0) -> bytes:
    """A safetensors file of 1-D tensors, its header padded by `pad` spaces (to misalign data)."""
    header, data = {}, b""
    for name, (dtype, raw) in tensors.items():
        size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": [len(raw) // size],
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + data


def scan(tmp_path, blob: bytes) -> str | None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(blob)
    tensors: tuple[TensorInfo, ...] = parse_safetensors_header(blob, len(blob), str(path))
    return non_finite_tensor(path, tensors)


@pytest.mark.parametrize("pad", [0, 1, 3])
@pytest.mark.parametrize("dtype", sorted(BITS))
def test_nan_and_inf_are_found_in_every_ieee_dtype(tmp_path, dtype, pad):
    np_dtype, one, inf, nan = BITS[dtype]
    finite = np.array([one, -one, np.finfo(np_dtype).max, 0.0], dtype=np_dtype).tobytes()
    for bad in (inf, -inf, nan):
        poisoned = np.array([one, bad], dtype=np_dtype).tobytes()
        blob = safetensors_bytes({"a": (dtype, finite), "b": (dtype, poisoned)}, pad)
        assert scan(tmp_path, blob) == "b"
    assert scan(tmp_path, safetensors_bytes({"a": (dtype, finite)}, pad)) is None


@pytest.mark.parametrize("pad", [0, 1])
def test_nan_and_inf_are_found_in_bfloat16(tmp_path, pad):
    finite = struct.pack("<3H", BF16["one"], BF16["max"], 0)
    assert scan(tmp_path, safetensors_bytes({"a": ("BF16", finite)}, pad)) is None
    for bad in ("inf", "nan"):
        poisoned = struct.pack("<2H", BF16["one"], BF16[bad])
        assert scan(tmp_path, safetensors_bytes({"a": ("BF16", finite), "b": ("BF16", poisoned)}, pad)) == "b"


def test_empty_tensors_are_skipped(tmp_path):
    assert scan(tmp_path, safetensors_bytes({"empty": ("F32", b"")})) is None


def _manifest(model_type: str, arch: str, tensors: dict, targets=None):
    """The manifest of a one-layer adapter of `tensors` (name -> shape) for a tiny `model_type`."""
    from pathlib import Path

    from loraserve.engine_limits import AdapterLimits
    from loraserve.model_summary import ModelConfig
    from loraserve.peft_format import build_manifest

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = ModelConfig.from_dict(
        dict(shape, num_key_value_heads=2, vocab_size=100, model_type=model_type, architectures=[arch])
    )
    infos = tuple(
        TensorInfo(f"base_model.model.model.layers.0.{name}.weight", "F32", s, 0, 0)
        for name, s in tensors.items()
    )
    limits = AdapterLimits() if targets is None else AdapterLimits(lora_target_modules=targets)
    cfg = dict(r=4, lora_alpha=8, target_modules=sorted({n.split(".")[1] for n in tensors}))
    return build_manifest(Path("a"), cfg, infos, 0, model, limits)


PHI3_QKV = {"self_attn.qkv_proj.lora_A": (4, 64), "self_attn.qkv_proj.lora_B": (128, 4)}


def test_fused_modules_are_one_adapter_module_on_phi3_only():
    from loraserve import errors

    manifest = _manifest("phi3", "Phi3ForCausalLM", PHI3_QKV)  # B spans q (64) + k (32) + v (32)
    assert manifest.target_modules == ("qkv_proj",) and manifest.module_ranks == {(0, "qkv_proj"): 4}
    with pytest.raises(errors.UnsupportedTargetModule, match="'qkv_proj', which llama models do not have"):
        _manifest("llama", "LlamaForCausalLM", PHI3_QKV)
    q = {"self_attn.q_proj.lora_A": (4, 64), "self_attn.q_proj.lora_B": (64, 4)}
    with pytest.raises(errors.UnsupportedTargetModule, match="'q_proj', which phi3 models do not have"):
        _manifest("phi3", "Phi3ForCausalLM", q)
    with pytest.raises(errors.UnsupportedTargetModule, match="this engine serves LoRA on"):
        _manifest("phi3", "Phi3ForCausalLM", PHI3_QKV, targets=("q_proj", "v_proj"))
    assert _manifest("phi3", "Phi3ForCausalLM", PHI3_QKV, targets=("qkv_proj",)).rank == 4
    with pytest.raises(errors.ShapeMismatch, match=r"\[4, 64\] / \[128, 4\]"):
        _manifest("phi3", "Phi3ForCausalLM", {**PHI3_QKV, "self_attn.qkv_proj.lora_B": (64, 4)})
