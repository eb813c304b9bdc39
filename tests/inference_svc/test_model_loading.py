"""Loading checkpoints: sharded safetensors, dtypes, architectures, tokenizers."""

import json
import shutil

import pytest
import torch

from inference_svc.config import EngineConfig
from inference_svc.engine import LLMEngine
from inference_svc.tokenizer import ByteTokenizer, IncrementalDecoder, load_tokenizer
from loraserve.errors import InvalidModel
from loraserve.model_summary import ModelConfig

from oracles import load_hf_model, write_hf_model

CPU = dict(device="cpu", kv_cache_bytes=1 << 20, max_loras=1)
IDS = [[4, 8, 15, 16, 23, 42]]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_hf_model("llama", tmp_path_factory.mktemp("llama") / "m")


def logits_of(model_dir, **config):
    engine = LLMEngine(model_dir, EngineConfig(**{**CPU, **config}))
    return engine.score(IDS, [None])[0]


def test_sharded_checkpoint_gives_the_same_logits(llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    load_hf_model(llama_dir).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(logits_of(sharded), logits_of(llama_dir), atol=0, rtol=0)


def test_missing_shard_is_named(llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    load_hf_model(llama_dir).save_pretrained(sharded, max_shard_size="40KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(InvalidModel, match=victim.name):
        logits_of(sharded)


@pytest.mark.parametrize("dtype, atol", [("bfloat16", 0.15), ("float16", 0.02)])
def test_half_precision_models_run_close_to_float32(llama_dir, dtype, atol):
    half = logits_of(llama_dir, dtype=dtype)
    full = logits_of(llama_dir, dtype="float32")
    assert half.dtype == torch.float32  # logits are returned in float32
    torch.testing.assert_close(half, full, atol=atol, rtol=0)


def test_mistral_is_served_like_llama(llama_dir, tmp_path):
    mistral = tmp_path / "mistral"
    shutil.copytree(llama_dir, mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    (mistral / "config.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(logits_of(mistral), logits_of(llama_dir), atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architectures=["GPT2LMHeadModel"]), "not supported"),
        (dict(model_type="gemma", architectures=["GemmaForCausalLM"]), "model_type 'gemma'"),
        (dict(model_type="phi", architectures=["PhiForCausalLM"]), "model_type 'phi'"),
        (
            dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
            "multimodal Gemma 3; only its text-only form",
        ),
        (
            dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_activation="silu"),
            "hidden_activation 'silu'",
        ),
        (
            dict(
                model_type="gemma3_text",
                architectures=["Gemma3ForCausalLM"],
                use_bidirectional_attention=True,
            ),
            "use_bidirectional_attention",
        ),
        (
            dict(
                model_type="gemma3_text",
                architectures=["Gemma3ForCausalLM"],
                rope_parameters={"chunked_attention": {"rope_type": "default"}},
            ),
            "rope_parameters keys",
        ),
        (
            dict(model_type="mistral"),
            r"architectures \['LlamaForCausalLM'\] not supported for model_type 'mistral'",
        ),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(rope_scaling={"rope_type": "proportional", "factor": 4.0}), "rope scaling type 'proportional'"),
        (dict(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4}), "rope scaling type 'mrope'"),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            "needs low_freq_factor, high_freq_factor",
        ),
        (dict(rope_scaling={"type": "linear"}), "'linear' needs factor"),
        (
            dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
            "short_factor has 1 values, expected 8",
        ),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
        (dict(quantization_config={"quant_method": "awq"}), r"quantized checkpoints \(awq\)"),
    ],
)
def test_unsupported_models_are_rejected_clearly(llama_dir, tmp_path, change, message):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidModel, match=message):
        ModelConfig.from_dir(tmp_path)


def test_refusal_happens_at_engine_start_up(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(rope_scaling={"rope_type": "proportional", "factor": 2.0})
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidModel, match="'proportional'"):
        logits_of(tmp_path / "m")


def test_missing_config_and_weights(tmp_path, llama_dir):
    with pytest.raises(InvalidModel, match="config.json does not exist"):
        ModelConfig.from_dir(tmp_path)
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(InvalidModel, match="neither model.safetensors"):
        logits_of(tmp_path)


def test_demo_tokenizer_round_trips_and_byte_fallback(tmp_path):
    from inference_svc.demo_model import write_demo_model

    model_dir = write_demo_model(
        tmp_path / "demo",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    tok = load_tokenizer(model_dir)
    text = "Grüße, LoRA! 🚀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 256
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in ids) == text  # multi-byte characters are never split
