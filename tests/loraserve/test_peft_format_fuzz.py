"""Property-based fuzzing of the PEFT format (`loraserve.peft_format`): whatever the bytes, only the project's own
validation errors come out (never a KeyError, TypeError, struct.error, ...); and whatever valid
adapter is generated, it is accepted with the values it was written with."""

import json
import math
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraserve import errors
from loraserve.engine_limits import ALL_TARGET_MODULES, AdapterLimits
from loraserve.model_summary import ModelConfig
from loraserve.peft_format import (
    SAFETENSORS_DTYPE_SIZES,
    TensorInfo,
    check_adapter_config,
    inspect_adapter,
    parse_safetensors_header,
)

MODEL = ModelConfig.from_dict(
    {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
)
LIMITS = AdapterLimits(max_lora_rank=16)
VALID_CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
    max_leaves=12,
)
config_keys = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "target_modules",
        "use_dora",
        "modules_to_save",
        "bias",
        "lora_bias",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "peft_type",
    ]
)
tensor_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "F64"]), json_values),
        "shape": st.one_of(st.lists(st.integers(-2, 70), max_size=3), json_values),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 5000), min_size=2, max_size=2), json_values),
    }
)
tensor_names = st.one_of(
    st.sampled_from(
        [
            f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
            for i in (0, 1, 5)
            for m in ("q_proj", "v_proj", "lm_head")
            for ab in "AB"
        ]
    ),
    st.text(max_size=20),
)


@FUZZ
@given(st.dictionaries(config_keys, json_values, max_size=8))
def test_adapter_config_fuzz_raises_only_validation_errors(cfg):
    try:
        check_adapter_config({**VALID_CONFIG, **cfg}, LIMITS, "fuzz")
    except errors.InvalidAdapter:
        pass


@FUZZ
@given(st.binary(max_size=256), st.integers(0, 10_000))
def test_random_bytes_as_safetensors_raise_only_validation_errors(data, claimed_size):
    try:
        parse_safetensors_header(data, max(claimed_size, len(data)), "fuzz")
    except errors.InvalidAdapter:
        pass


@FUZZ
@given(st.dictionaries(tensor_names, st.one_of(tensor_entry, json_values), max_size=5), st.integers(0, 4096))
def test_structured_headers_raise_only_validation_errors(header, data_size):
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw
    try:
        parse_safetensors_header(data, len(data) + data_size, "fuzz")
    except errors.InvalidAdapter:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cfg=st.dictionaries(config_keys, json_values, max_size=6),
    header=st.dictionaries(tensor_names, tensor_entry, max_size=4),
    payload=st.binary(max_size=512),
)
def test_whole_adapter_directories_raise_only_validation_errors(tmp_path_factory, cfg, header, payload):
    path = tmp_path_factory.mktemp("fuzz")
    (path / "adapter_config.json").write_text(json.dumps({**VALID_CONFIG, **cfg}))
    raw = json.dumps(header).encode()
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    try:
        inspect_adapter(path, MODEL, LIMITS)
    except errors.InvalidAdapter:
        pass


# --- valid inputs are accepted, with their values --------------------------------------------------

ranks = st.integers(1, LIMITS.max_lora_rank)
alphas = st.one_of(st.integers(1, 64), st.floats(0.125, 64.0, allow_nan=False, allow_infinity=False))
modules = st.lists(st.sampled_from(ALL_TARGET_MODULES), min_size=1, max_size=7, unique=True)
tensor_specs = st.lists(
    st.tuples(
        st.text("abcdefghij._", min_size=1, max_size=12),
        st.sampled_from(sorted(SAFETENSORS_DTYPE_SIZES)),
        st.lists(st.integers(0, 6), max_size=3),
    ),
    max_size=6,
    unique_by=lambda t: t[0],
)


def safetensors_bytes(header: dict, data_size: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_size)


@FUZZ
@given(r=ranks, alpha=alphas, targets=modules, rslora=st.booleans(), extras=st.booleans())
def test_valid_adapter_configs_are_accepted(r, alpha, targets, rslora, extras):
    cfg = {"r": r, "lora_alpha": alpha, "target_modules": targets, "use_rslora": rslora}
    if extras:  # what PEFT writes by default
        cfg.update(peft_type="LORA", bias="none", use_dora=False, modules_to_save=None, fan_in_fan_out=False)
    check_adapter_config(cfg, LIMITS, "fuzz")


@FUZZ
@given(tensor_specs, st.randoms(use_true_random=False), st.booleans())
def test_valid_headers_parse_to_their_tensors(specs, rng, with_metadata):
    order = list(specs)
    rng.shuffle(order)  # the data section need not follow the header's order
    offsets, at = {}, 0
    for name, dtype, shape in order:
        size = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
        offsets[name] = (at, at + size)
        at += size
    header = {"__metadata__": {"format": "pt"}} if with_metadata else {}
    header.update(
        {
            name: {"dtype": dtype, "shape": shape, "data_offsets": list(offsets[name])}
            for name, dtype, shape in specs
        }
    )
    data = safetensors_bytes(header, at)
    expected = tuple(TensorInfo(name, dtype, tuple(shape), *offsets[name]) for name, dtype, shape in specs)
    assert parse_safetensors_header(data, len(data), "fuzz") == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    r=ranks,
    alpha=alphas,
    targets=modules,
    layers=st.lists(st.sampled_from([0, 1]), min_size=1, max_size=2, unique=True),
    rslora=st.booleans(),
)
def test_valid_adapter_directories_inspect_to_their_config(
    tmp_path_factory, r, alpha, targets, layers, rslora
):
    path = tmp_path_factory.mktemp("valid")
    cfg = {"r": r, "lora_alpha": alpha, "target_modules": targets, "use_rslora": rslora}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    shapes, header, at = MODEL.module_shapes(), {}, 0
    for layer in layers:
        for module in targets:
            fan_in, fan_out = shapes[module]
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            for kind, shape in (("A", [r, fan_in]), ("B", [fan_out, r])):
                size = math.prod(shape) * 4
                name = f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{kind}.weight"
                header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + size]}
                at += size
    (path / "adapter_model.safetensors").write_bytes(safetensors_bytes(header, at))

    manifest = inspect_adapter(path, MODEL, LIMITS)
    assert (manifest.rank, manifest.lora_alpha, manifest.use_rslora) == (r, float(alpha), rslora)
    assert manifest.target_modules == tuple(m for m in ALL_TARGET_MODULES if m in targets)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    assert manifest.module_scales == {(layer, m): scale for layer in layers for m in targets}
    assert len(manifest.tensors) == len(header)
