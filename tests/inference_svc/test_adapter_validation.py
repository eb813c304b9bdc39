"""Every adapter rejection of DESIGN.md section 3, each caused by a real malformed file."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_svc.adapters import TORCH_DTYPES, inspect_adapter
from inference_svc.config import EngineConfig
from inference_svc.demo_model import TINY_SHAPE, write_demo_adapter, write_demo_model
from inference_svc.engine import LLMEngine
from inference_svc.sampling import SamplingParams
from loraserve import errors
from loraserve.model_summary import ModelConfig
from loraserve.peft_format import SAFETENSORS_DTYPE_SIZES, AdapterFiles

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("model"), **TINY_SHAPE)


@pytest.fixture
def good(tmp_path, model_dir):
    return write_demo_adapter(tmp_path / "good", ModelConfig.from_dir(model_dir), rank=8, seed=1)


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    tensors = load_file(str(path / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS))


def first_key(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


def rewrite_header(path, fn):
    data = (path / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (path / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _rank_too_large(p):
    edit_config(p, r=64)


def _rank_zero(p):
    edit_config(p, r=0)


def _rank_pattern_negative(p):
    edit_config(p, rank_pattern={"q_proj": -1})


def _unknown_target(p):
    edit_config(p, target_modules=["q_proj", "embed_tokens"])


def _tensor_for_unsupported_module(p):
    def add(t):
        t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)

    edit_tensors(p, add)


def _shape_mismatch(p):
    def shrink(t):
        k = first_key(t, "q_proj.lora_A")
        t[k] = t[k][:, :32].contiguous()

    edit_tensors(p, shrink)


def _layer_out_of_range(p):
    def add(t):
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 8)

    edit_tensors(p, add)


def _missing_b(p):
    edit_tensors(p, lambda t: t.pop(first_key(t, "v_proj.lora_B")))


def _dora(p):
    edit_config(p, use_dora=True)


def _dora_tensor(p):
    def add(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)

    edit_tensors(p, add)


def _modules_to_save(p):
    edit_config(p, modules_to_save=["lm_head"])


def _bias(p):
    edit_config(p, bias="lora_only")


def _lora_bias(p):
    edit_config(p, lora_bias=True)


def _nan(p):
    def poison(t):
        t[first_key(t, "o_proj.lora_B")][0, 0] = float("nan")

    edit_tensors(p, poison)


def _inf(p):
    def poison(t):
        t[first_key(t, "down_proj.lora_A")][1, 2] = float("inf")

    edit_tensors(p, poison)


def _truncated(p):
    data = (p / WEIGHTS).read_bytes()
    (p / WEIGHTS).write_bytes(data[: len(data) // 2])


def _bitflip_header(p):
    data = bytearray((p / WEIGHTS).read_bytes())
    data[12] ^= 0xFF  # inside the JSON header
    (p / WEIGHTS).write_bytes(bytes(data))


def _header_lies_about_shape(p):
    def lie(h):
        k = next(k for k in h if "q_proj.lora_A" in k)
        h[k]["shape"] = [8, 128]

    rewrite_header(p, lie)


def _header_offsets_out_of_file(p):
    def lie(h):
        k = next(k for k in h if "q_proj.lora_A" in k)
        h[k]["data_offsets"] = [0, 10**9]

    rewrite_header(p, lie)


def _int_dtype(p):
    def to_int(t):
        k = first_key(t, "k_proj.lora_A")
        t[k] = t[k].to(torch.int32)

    edit_tensors(p, to_int)


def _missing_config(p):
    (p / "adapter_config.json").unlink()


def _config_not_json(p):
    (p / "adapter_config.json").write_text("{not json")


def _config_lacks_r(p):
    cfg = json.loads((p / "adapter_config.json").read_text())
    del cfg["r"]
    (p / "adapter_config.json").write_text(json.dumps(cfg))


def _missing_weights(p):
    (p / WEIGHTS).unlink()


def _pickle_only(p):
    tensors = load_file(str(p / WEIGHTS))
    torch.save(tensors, p / "adapter_model.bin")
    (p / WEIGHTS).unlink()


CORPUS = {
    "rank above max_lora_rank": (_rank_too_large, errors.RankTooLarge, "exceeds max_lora_rank (16)"),
    "rank zero": (_rank_zero, errors.RankInvalid, "must be a positive integer"),
    "negative rank_pattern": (_rank_pattern_negative, errors.RankInvalid, "rank -1"),
    "unknown target module": (_unknown_target, errors.UnsupportedTargetModule, "['embed_tokens']"),
    "tensor on lm_head": (_tensor_for_unsupported_module, errors.UnsupportedTargetModule, "lm_head"),
    "shape mismatch": (_shape_mismatch, errors.ShapeMismatch, "do not match the base model"),
    "layer out of range": (_layer_out_of_range, errors.ShapeMismatch, "the model has 2 layers"),
    "missing lora_B": (_missing_b, errors.ShapeMismatch, "has no lora_B"),
    "DoRA config": (_dora, errors.DoraNotSupported, "DoRA"),
    "DoRA magnitude tensor": (_dora_tensor, errors.DoraNotSupported, "DoRA magnitude"),
    "modules_to_save": (_modules_to_save, errors.ModulesToSaveNotSupported, "modules_to_save"),
    "bias": (_bias, errors.BiasNotSupported, "bias='lora_only'"),
    "lora_bias": (_lora_bias, errors.BiasNotSupported, "lora_bias=True"),
    "NaN weight": (_nan, errors.NonFiniteWeights, "NaN or Inf"),
    "Inf weight": (_inf, errors.NonFiniteWeights, "NaN or Inf"),
    "truncated safetensors": (_truncated, errors.CorruptSafetensors, "data section"),
    "bit-flipped header": (_bitflip_header, errors.CorruptSafetensors, "header"),
    "header lies about shape": (_header_lies_about_shape, errors.CorruptSafetensors, "claims shape [8, 128]"),
    "offsets beyond the file": (_header_offsets_out_of_file, errors.CorruptSafetensors, "outside the"),
    "integer dtype": (_int_dtype, errors.UnsupportedTensorDtype, "dtype I32"),
    "missing adapter_config.json": (
        _missing_config,
        errors.AdapterFilesMissing,
        "adapter_config.json is missing",
    ),
    "config not JSON": (_config_not_json, errors.AdapterConfigInvalid, "not valid JSON"),
    "config lacks r": (_config_lacks_r, errors.AdapterConfigInvalid, "lacks 'r'"),
    "missing weights": (_missing_weights, errors.AdapterFilesMissing, "adapter_model.safetensors is missing"),
    "pickle-only weights": (_pickle_only, errors.PickleWeightsNotAllowed, "pickle"),
}
# Problems visible only in the weights themselves, found when the adapter is read, not inspected.
FOUND_ON_LOAD = {"NaN weight", "Inf weight"}


def slot_snapshot(engine):
    return [t.clone() for layer in (*engine.lora.a, *engine.lora.b) for t in layer.values()]


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    engine = LLMEngine(
        model_dir,
        EngineConfig(max_loras=2, max_cpu_loras=3, max_lora_rank=16, device="cpu", kv_cache_bytes=1 << 20),
    )
    root = tmp_path_factory.mktemp("resident")
    engine.register_adapter("resident", write_demo_adapter(root, engine.model_config, rank=8, seed=7))
    engine.load_adapter("resident", to_slot=True)
    return engine


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_adapter_is_rejected_and_slots_stay(case, good, engine):
    corrupt, error_type, fragment = CORPUS[case]
    corrupt(good)
    before = slot_snapshot(engine)
    resident_before = engine.list_resident_adapters()
    with pytest.raises(error_type) as err:
        engine.register_adapter(f"bad-{case}", good)
        engine.load_adapter(f"bad-{case}", to_slot=True)
    assert fragment in str(err.value), str(err.value)
    assert isinstance(err.value, errors.InvalidAdapter)
    if case not in FOUND_ON_LOAD:  # inspection alone (header + config) catches it
        with pytest.raises(error_type):
            inspect_adapter(good, engine.model_config, engine.config)
    after = slot_snapshot(engine)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert [r.adapter_id for r in engine.list_resident_adapters()] == [r.adapter_id for r in resident_before]


# Cases whose problem lies in the files' contents (not in which files exist).
CONTENT_CASES = sorted(
    set(CORPUS) - {"missing adapter_config.json", "missing weights", "pickle-only weights"}
)


def in_memory(path) -> AdapterFiles:
    return AdapterFiles((path / "adapter_config.json").read_bytes(), bytearray((path / WEIGHTS).read_bytes()))


@pytest.mark.parametrize("case", CONTENT_CASES)
def test_adapter_files_held_in_memory_are_rejected_alike(case, good, tmp_path, engine):
    """Bytes fetched from the adapter manager go through the same validation as a directory."""
    corrupt, error_type, fragment = CORPUS[case]
    corrupt(good)
    before = slot_snapshot(engine)
    with pytest.raises(error_type) as err:
        engine.register_adapter(f"bad-memory-{case}", tmp_path / "not-written-yet", in_memory(good))
        engine.load_adapter(f"bad-memory-{case}", to_slot=True)
    assert fragment in str(err.value), str(err.value)
    assert all(torch.equal(x, y) for x, y in zip(before, slot_snapshot(engine)))


def test_adapter_files_in_memory_serve_until_written(good, tmp_path, engine):
    reference = engine.register_adapter("from-disk", good)
    target = tmp_path / "written-later"
    files = in_memory(good)
    manifest = engine.register_adapter("from-memory", target, files)  # the directory does not exist
    assert manifest.module_ranks == reference.module_ranks
    engine.load_adapter("from-disk", to_slot=True)
    engine.load_adapter("from-memory", to_slot=True)
    prompt = [[1, 2, 3, 4]]
    from_disk = engine.score(prompt, ["from-disk"])[0]
    torch.testing.assert_close(engine.score(prompt, ["from-memory"])[0], from_disk, rtol=0, atol=0)

    # Once written, loads read the directory: evicted and loaded again, it needs the files there.
    engine.evict_adapter("from-memory")
    engine.adapters.files_written("from-memory", files)
    with pytest.raises(errors.AdapterFilesMissing):
        engine.load_adapter("from-memory")
    shutil.copytree(good, target)
    engine.load_adapter("from-memory", to_slot=True)
    torch.testing.assert_close(engine.score(prompt, ["from-memory"])[0], from_disk, rtol=0, atol=0)
    for adapter_id in ("from-disk", "from-memory"):
        engine.unregister_adapter(adapter_id)


def test_generate_with_a_poisoned_adapter_fails_that_request_only(good, engine):
    _nan(good)
    engine.register_adapter("poisoned", good)
    params = SamplingParams(max_tokens=3, temperature=0)
    engine.add_request("ok", [1, 2, 3], params, "resident")
    engine.add_request("bad", [1, 2, 3], params, "poisoned")
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
    assert results["bad"][-1].finish_reason == "error"
    assert isinstance(results["bad"][-1].error, errors.NonFiniteWeights)
    assert results["ok"][-1].finish_reason == "length" and len(results["ok"]) == 3
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_pickle_weights_load_when_explicitly_allowed(good, model_dir, engine):
    reference = inspect_adapter(good, engine.model_config, engine.config)
    _pickle_only(good)
    allowed = LLMEngine(model_dir, engine.config.replace(allow_pickle_adapters=True))
    allowed.register_adapter("pickled", good)
    assert allowed.load_adapter("pickled", to_slot=True).rank == reference.rank


def test_valid_adapter_copy_is_accepted(good, tmp_path, engine):
    copy = tmp_path / "copy"
    shutil.copytree(good, copy)
    manifest = engine.register_adapter("copy", copy)
    assert manifest.rank == 8 and len(manifest.target_modules) == 7


def test_every_safetensors_dtype_the_format_accepts_has_a_torch_dtype_of_its_size():
    assert {code: dtype.itemsize for code, dtype in TORCH_DTYPES.items()} == SAFETENSORS_DTYPE_SIZES
