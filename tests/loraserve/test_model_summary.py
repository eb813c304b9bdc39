"""config.json summaries: each family's fields and defaults, rope fields of transformers 4 and 5."""

import pytest

from loraserve.errors import InvalidModel
from loraserve.model_summary import ModelConfig, RopeConfig

SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=100
)
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def summary(model_type, arch, **fields):
    return ModelConfig.from_dict(dict(SHAPE, model_type=model_type, architectures=[arch], **fields))


def test_transformers_4_and_5_rope_fields_read_the_same():
    v4 = summary("llama", "LlamaForCausalLM", rope_theta=5e5, rope_scaling=dict(rope_type="llama3", **LLAMA3))
    v4_type = summary("llama", "LlamaForCausalLM", rope_theta=5e5, rope_scaling=dict(type="llama3", **LLAMA3))
    v5 = summary(
        "llama", "LlamaForCausalLM", rope_parameters=dict(rope_type="llama3", rope_theta=5e5, **LLAMA3)
    )
    assert v4.rope == v4_type.rope == v5.rope
    assert v5.rope == RopeConfig(
        rope_type="llama3",
        theta=5e5,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    assert v5.rope_theta == 5e5


def test_original_max_position_embeddings_as_transformers_standardizes_it():
    yarn = dict(rope_type="yarn", factor=4.0)
    # absent: max_position_embeddings; a top-level field wins over the dict's (Phi-3 style)
    assert (
        summary(
            "qwen2", "Qwen2ForCausalLM", max_position_embeddings=4096, rope_scaling=yarn
        ).rope.original_max_position_embeddings
        == 4096
    )
    both = summary(
        "qwen2",
        "Qwen2ForCausalLM",
        original_max_position_embeddings=1024,
        max_position_embeddings=2048,
        rope_scaling=dict(yarn, original_max_position_embeddings=2048),
    )
    assert both.rope.original_max_position_embeddings == 1024
    # linear and dynamic stretch the default max_model_len by factor; yarn to original x factor
    assert both.max_context_len == 4096
    dynamic = summary(
        "llama",
        "LlamaForCausalLM",
        max_position_embeddings=2048,
        rope_scaling=dict(type="dynamic", factor=2.0),
    )
    assert dynamic.max_context_len == 4096


def test_family_fields_and_defaults():
    qwen3 = summary("qwen3", "Qwen3ForCausalLM", attention_bias=True)
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.attention_bias, qwen3.o_proj_bias) == (128, True, True, True)
    assert qwen3.layer_windows == (0, 0, 0, 0) and qwen3.max_position_embeddings == 32768
    qwen2 = summary("qwen2", "Qwen2ForCausalLM", attention_bias=False)
    assert (qwen2.head_dim, qwen2.attention_bias, qwen2.o_proj_bias) == (16, True, False)
    mistral = summary("mistral", "MistralForCausalLM", head_dim=32, attention_bias=True)
    assert (mistral.head_dim, mistral.attention_bias, mistral.layer_windows) == (32, False, (4096,) * 4)
    assert summary("mistral", "MistralForCausalLM", sliding_window=None).layer_windows == (0,) * 4
    llama = summary("llama", "LlamaForCausalLM", sliding_window=16, attention_bias=True, mlp_bias=True)
    assert llama.layer_windows == (0,) * 4 and llama.o_proj_bias and llama.mlp_bias
    # no model_type: the architecture names the family
    assert ModelConfig.from_dict(dict(SHAPE, architectures=["Qwen3ForCausalLM"])).model_type == "qwen3"


def test_qwen_sliding_layers():
    base = dict(use_sliding_window=True, sliding_window=64, max_window_layers=2)
    assert summary("qwen2", "Qwen2ForCausalLM", **base).layer_windows == (0, 0, 64, 64)
    assert (
        summary("qwen2", "Qwen2ForCausalLM", **dict(base, use_sliding_window=False)).layer_windows == (0,) * 4
    )
    types = ["sliding_attention", "full_attention"] * 2
    assert summary("qwen3", "Qwen3ForCausalLM", layer_types=types, **base).layer_windows == (64, 0, 64, 0)
    with pytest.raises(InvalidModel, match="layer_types"):
        summary("qwen3", "Qwen3ForCausalLM", layer_types=["chunked_attention"] * 4, **base)


def test_head_dim_shapes_reach_modules_and_kv():
    qwen3 = summary("qwen3", "Qwen3ForCausalLM", head_dim=24, num_key_value_heads=2)
    assert qwen3.module_shapes()["q_proj"] == (64, 96) and qwen3.module_shapes()["o_proj"] == (96, 64)
    assert qwen3.kv_bytes_per_token(2) == 2 * 4 * 2 * 24 * 2


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3", "gemma3_text", "phi3", "gpt2"])
def test_unknown_model_types_are_named(model_type):
    with pytest.raises(InvalidModel, match=f"model_type '{model_type}'"):
        summary(model_type, "SomethingForCausalLM")


def test_gemma2_defaults_as_its_config_class():
    gemma2 = summary("gemma2", "Gemma2ForCausalLM")
    assert gemma2.gemma and gemma2.hidden_act == "gelu_pytorch_tanh" and gemma2.tie_word_embeddings
    assert gemma2.head_dim == 256 and gemma2.attn_scale == 256**-0.5
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (50.0, 30.0)
    assert gemma2.layer_windows == (4096, 0, 4096, 0)  # local, global, ...
    off = summary("gemma2", "Gemma2ForCausalLM", attn_logit_softcapping=None, query_pre_attn_scalar=64)
    assert off.attn_softcap == 0 and off.attn_scale == 64**-0.5


def test_gemma3_local_and_global_ropes_from_transformers_4_and_5_fields():
    v4 = summary(
        "gemma3_text",
        "Gemma3ForCausalLM",
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rope_scaling=dict(rope_type="linear", factor=8.0),
        sliding_window_pattern=2,
    )
    v5 = summary(
        "gemma3_text",
        "Gemma3ForCausalLM",
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4),
        },
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    assert v4.rope == v5.rope == RopeConfig(rope_type="linear", theta=1e6, factor=8.0)
    assert v4.local_rope == v5.local_rope == RopeConfig(theta=1e4)
    assert v4.layer_windows == v5.layer_windows == (4096, 0, 4096, 0)
    default = summary("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=7)
    assert default.layer_windows == (4096,) * 5 + (0, 4096)  # pattern 6
    assert default.qk_norm and default.attn_softcap == 0 and default.final_softcap == 0
    with pytest.raises(InvalidModel, match="multimodal Gemma 3"):
        summary("gemma3", "Gemma3ForConditionalGeneration")


def test_phi3_fused_modules_longrope_and_window():
    phi3 = summary(
        "phi3",
        "Phi3ForCausalLM",
        original_max_position_embeddings=4096,
        max_position_embeddings=131072,
        sliding_window=2047,
        rope_scaling=dict(type="su", short_factor=[1.0] * 8, long_factor=[2.0] * 8),
    )
    assert phi3.rope.rope_type == "longrope" and phi3.rope.original_max_position_embeddings == 4096
    assert phi3.rope_recompute_len == 4096
    assert phi3.layer_windows == (2047,) * 4
    assert phi3.module_shapes() == {
        "qkv_proj": (64, 192),
        "o_proj": (64, 64),
        "gate_up_proj": (64, 256),
        "down_proj": (128, 64),
    }
    assert summary("phi3", "Phi3ForCausalLM").layer_windows == (0,) * 4  # sliding_window defaults to None
