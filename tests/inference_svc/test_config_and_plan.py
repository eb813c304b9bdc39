"""Engine configuration: validation messages, immutability, and the memory plan."""

import dataclasses
import json
import subprocess
import sys

import pytest

from inference_svc.config import EngineConfig
from inference_svc.memory_plan import compute_plan, human_bytes
from loraserve.model_summary import ModelConfig

from harness import assert_rejected
from helpers import TINY_CONFIG_JSON


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_loras=0), "max_loras (0) must be >= 1"),
        (dict(max_lora_rank=0), "max_lora_rank (0) must be in 1..512"),
        (dict(max_lora_rank=513), "max_lora_rank (513) must be in 1..512"),
        (dict(max_loras=4, max_cpu_loras=2), "max_cpu_loras (2) must be >= max_loras (4)"),
        (dict(lora_dtype="int8"), "lora_dtype ('int8') must be 'auto' or one of"),
        (dict(dtype="float64"), "dtype ('float64') must be 'auto' or one of"),
        (
            dict(lora_target_modules=("q_proj", "lm_head")),
            "lora_target_modules (['q_proj', 'lm_head']) must be",
        ),
        (dict(lora_target_modules=()), "lora_target_modules ([]) must be a non-empty subset"),
        (dict(max_num_seqs=0), "max_num_seqs (0) must be >= 1"),
        (
            dict(max_num_seqs=8, max_num_batched_tokens=4),
            "max_num_batched_tokens (4) must be >= max_num_seqs (8)",
        ),
        (dict(kv_cache_bytes=0), "kv_cache_bytes (0) must be > 0"),
        (dict(device="tpu"), "device ('tpu') must be"),
        (dict(lora_backend="cuda"), "lora_backend ('cuda') must be one of"),
        (dict(max_model_len=1), "max_model_len (1) must be >= 2"),
    ],
)
def test_invalid_settings_name_field_value_and_rule(kwargs, message):
    assert_rejected(EngineConfig, kwargs, message)


def test_defaults_follow_the_anchors():
    config = EngineConfig(max_loras=3)
    assert config.max_cpu_loras == 3  # None -> max_loras, as in vLLM
    assert config.lora_dtype == "auto"
    assert len(config.lora_target_modules) == 7


def test_config_is_immutable_and_replace_revalidates():
    config = EngineConfig(max_loras=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_loras = 8
    assert config.replace(max_loras=8, max_cpu_loras=8).max_loras == 8
    with pytest.raises(ValueError, match="max_cpu_loras"):
        config.replace(max_loras=8)  # max_cpu_loras stays 2 < 8


def test_memory_plan_matches_hand_computed_figures():
    model = ModelConfig.from_dict(TINY_CONFIG_JSON)
    config = EngineConfig(
        max_loras=3, max_lora_rank=8, max_cpu_loras=5, device="cpu", kv_block_size=4, kv_cache_bytes=10_000
    )
    plan = compute_plan(model, config)
    # per layer sum(in + out): q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 1024
    assert plan.bytes_per_slot == 2 * 8 * 1024 * 4 == 65536
    assert plan.slots_bytes == 3 * 65536
    assert plan.host_cache_bytes == 5 * 65536
    # KV: 2 (k, v) * 2 layers * 2 kv heads * 16 head_dim * 4 bytes = 512 B/token; block of 4 = 2048 B
    assert plan.kv_cache_blocks == 10_000 // 2048 == 4
    assert plan.kv_cache_bytes == 4 * 2048
    only_qv = compute_plan(model, config.replace(lora_target_modules=("q_proj", "v_proj")))
    assert only_qv.bytes_per_slot == 2 * 8 * (128 + 96) * 4


def test_memory_plan_uses_the_family_shapes():
    """Qwen3 with head_dim 24 (not 64 / 4): projections, KV and weights follow head_dim; dynamic
    rope stretches the default max_model_len by its factor."""
    raw = {
        **TINY_CONFIG_JSON,
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 24,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    }
    model = ModelConfig.from_dict(raw)
    config = EngineConfig(max_loras=1, max_lora_rank=8, device="cpu", kv_block_size=4, kv_cache_bytes=10_000)
    plan = compute_plan(model, config)
    # per layer sum(in + out): q 64+96, k 64+48, v 64+48, o 96+64, gate 64+128, up 64+128, down 128+64
    assert plan.bytes_per_slot == 2 * 8 * 1120 * 4
    # KV: 2 (k, v) * 2 layers * 2 kv heads * 24 head_dim * 4 bytes = 768 B/token; block of 4 = 3072 B
    assert plan.kv_cache_blocks == 10_000 // 3072
    per_layer = (64 * 96 + 2 * 64 * 48 + 96 * 64 + 3 * 64 * 128) + 2 * 64 + 2 * 24  # + q/k norms
    assert plan.weights_bytes == (2 * per_layer + 2 * 100 * 64 + 64) * 4
    assert plan.max_model_len == 2 * 128


def test_plan_warnings():
    model = ModelConfig.from_dict(TINY_CONFIG_JSON)
    plan = compute_plan(
        model,
        EngineConfig(max_loras=2, max_lora_rank=64, lora_dtype="bfloat16", device="cpu"),
        adapter_ranks=[8],
    )
    text = " ".join(plan.warnings)
    assert "no host room to swap" in text
    assert "far above the largest adapter rank (8)" in text
    assert "lora_dtype (bfloat16) differs from the model dtype (float32)" in text
    quiet = compute_plan(
        model, EngineConfig(max_loras=2, max_cpu_loras=4, max_lora_rank=8, device="cpu"), [8]
    )
    assert quiet.warnings == ()


def test_human_bytes_is_exact_and_binary():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1536 B (1.50 KiB)"
    assert human_bytes(3 * 1024**3) == "3221225472 B (3.00 GiB)"


def run_plan(tmp_path, *flags):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG_JSON))
    return subprocess.run(
        [sys.executable, "-m", "inference_svc", "plan", "--model", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plan_command_reads_only_config_json(tmp_path):
    proc = run_plan(
        tmp_path,
        "--max-loras",
        "3",
        "--max-lora-rank",
        "8",
        "--max-cpu-loras",
        "5",
        "--lora-dtype",
        "auto",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert "65536 B (64.00 KiB)" in proc.stdout  # bytes per slot, exact and in KiB
    assert "196608 B (192.00 KiB)" in proc.stdout  # 3 slots


def test_plan_command_exits_nonzero_with_the_rule(tmp_path):
    proc = run_plan(tmp_path, "--max-loras", "4", "--max-cpu-loras", "2")
    assert proc.returncode == 2
    assert "max_cpu_loras (2) must be >= max_loras (4)" in proc.stderr


def test_env_variables_feed_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASERVE_MAX_LORA_RANK", "8")
    proc = run_plan(tmp_path, "--max-loras", "3", "--max-cpu-loras", "5", "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bytes_per_slot"] == 65536


def test_memory_plan_of_fused_phi3_and_softcapped_gemma2():
    """Phi-3's qkv_proj / gate_up_proj are one LoRA module each: A [r, hidden], B [q+k+v, r]."""
    phi3 = ModelConfig.from_dict(
        {**TINY_CONFIG_JSON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    )
    config = EngineConfig(max_loras=1, max_lora_rank=8, device="cpu", kv_block_size=4, kv_cache_bytes=10_000)
    # per layer sum(in + out): qkv 64+128, o 64+64, gate_up 64+256, down 128+64
    assert compute_plan(phi3, config).bytes_per_slot == 2 * 8 * 832 * 4
    # an engine serving LoRA on q/v only does not serve qkv_proj
    assert compute_plan(phi3, config.replace(lora_target_modules=("q_proj", "v_proj"))).bytes_per_slot == 0
    gemma2 = {
        **TINY_CONFIG_JSON,
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "head_dim": 16,
    }
    capped = compute_plan(ModelConfig.from_dict(gemma2), config)
    uncapped = compute_plan(ModelConfig.from_dict({**gemma2, "attn_logit_softcapping": None}), config)
    assert capped.attention_workspace_bytes > uncapped.attention_workspace_bytes  # float32 score pieces
