"""Checkpoints written by Hugging Face transformers and PEFT: the references our engine must match.

Test-only (transformers and peft are test dependencies). Everything is seeded and small.
"""

from __future__ import annotations

from pathlib import Path

import torch

from inference_svc.demo_model import TINY_SHAPE

ADAPTER_SPECS = {
    # name: (LoraConfig kwargs)
    "r1_qv": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "r8_all": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "r16_rslora_attn": dict(
        r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    ),
    "r32_mlp": dict(r=32, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
}

# Phi-3 adapters target its fused modules by the names its checkpoints use
PHI3_ADAPTER_SPECS = {
    "r1_qkv": dict(r=1, lora_alpha=2, target_modules=["qkv_proj"]),
    "r8_all": dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "r16_rslora_attn": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["qkv_proj", "o_proj"]),
    "r32_mlp": dict(r=32, lora_alpha=32, target_modules=["gate_up_proj", "down_proj"]),
    "pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["qkv_proj", "down_proj"],
        rank_pattern={"qkv_proj": 8, "layers.1.mlp.down_proj": 2},
        alpha_pattern={"qkv_proj": 3},
    ),
}

# the demo's tiny shape (hidden 64, 2 layers, GQA 4:2) with a 128-token vocabulary
_SMALL = dict(TINY_SHAPE, vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=128)


def _kind(family: str, adapters: dict = ADAPTER_SPECS, cfg: str | None = None, **kwargs) -> dict:
    """A transformers `{family}ForCausalLM` of the small shape, `kwargs` over its config, and the
    PEFT adapters (LoraConfig kwargs by name) the tests write for it."""
    return dict(
        cls=f"{family}ForCausalLM",
        cfg=cfg or f"{family}Config",
        kwargs={**_SMALL, **kwargs},
        adapters=adapters,
    )


def _rope(rope_type: str, max_position_embeddings: int = 128, **fields) -> dict:
    """A Llama whose rope is `rope_type`, with max_position_embeddings and the original length small
    enough that the test prompts (up to ~100 tokens) run past them."""
    scaling = dict(rope_type=rope_type, **fields)
    return _kind("Llama", max_position_embeddings=max_position_embeddings, rope_scaling=scaling)


MODEL_KINDS = {
    "llama": _kind("Llama", max_position_embeddings=256, rope_theta=500000.0),
    "qwen2": _kind(
        "Qwen2",
        intermediate_size=96,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    # Qwen2 with a sliding window on layer 1 only (max_window_layers=1): per-layer windows
    "qwen2_sliding": _kind("Qwen2", use_sliding_window=True, sliding_window=12, max_window_layers=1),
    # Mistral: a 16-token window on every layer, and a head_dim that is not hidden / heads
    "mistral": _kind("Mistral", head_dim=24, sliding_window=16),
    # Qwen3: per-head q/k RMSNorm, explicit head_dim, a sliding window on layer 1
    "qwen3": _kind(
        "Qwen3",
        head_dim=24,
        use_sliding_window=True,
        sliding_window=20,
        max_window_layers=1,
        tie_word_embeddings=True,
    ),
    # Gemma 2: 3 layers local / global / local with an 8-token window, head_dim 24 and
    # query_pre_attn_scalar apart, soft caps low enough to bite on these weights
    "gemma2": _kind(
        "Gemma2",
        num_hidden_layers=3,
        head_dim=24,
        query_pre_attn_scalar=20,
        sliding_window=8,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
        max_position_embeddings=256,
    ),
    # Gemma 3 (text): 4 layers, pattern 2 (local, global, ...), q/k norms, local rope base apart
    # from the global one, which has linear scaling
    "gemma3": _kind(
        "Gemma3",
        cfg="Gemma3TextConfig",
        num_hidden_layers=4,
        head_dim=24,
        query_pre_attn_scalar=24,
        sliding_window=10,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=100000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=500.0),
        },
        max_position_embeddings=256,
    ),
    # Phi-3: fused qkv_proj / gate_up_proj (adapters on them), LongRoPE past 32 positions, a
    # 24-token window on every layer
    "phi3": _kind(
        "Phi3",
        adapters=PHI3_ADAPTER_SPECS,
        pad_token_id=0,
        eos_token_id=2,
        sliding_window=24,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=10000.0,
            short_factor=[1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
            long_factor=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
        ),
    ),
    "rope_linear": _rope("linear", factor=2.0, max_position_embeddings=64),
    "rope_dynamic": _rope("dynamic", factor=2.0, max_position_embeddings=64),
    "rope_yarn": _rope("yarn", factor=4.0, original_max_position_embeddings=32),
    "rope_llama3": _rope(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    ),
    "rope_longrope": _rope(
        "longrope",
        original_max_position_embeddings=32,
        short_factor=[1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
        long_factor=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
    ),
}


def write_hf_model(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers

    spec = MODEL_KINDS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, spec["cfg"])(**spec["kwargs"])
    model = getattr(transformers, spec["cls"])(config).eval()
    with torch.no_grad():  # larger-than-default weights so differences are visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("norm.weight"):  # RMSNorm weights (Qwen3's q/k norms included)
                p.normal_(1, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_hf_model(model_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def write_peft_adapter(model_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    base = load_hf_model(model_dir)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return out


def reset_rope_state(model) -> None:
    """Undo transformers' dynamic-NTK state: its rotary module keeps the frequencies of the longest
    sequence it has seen (until one shorter than max_position_embeddings), so each reference call
    must start fresh to be the same function of its input."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "original_max_seq_len"):
            module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len


def peft_model_with(model_dir: Path, adapters: dict[str, Path]):
    """A PeftModel holding every adapter in `adapters` under its name."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load_hf_model(model_dir), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def byte_level_tokenizer(special_tokens: list[str], bos: str | None = None):
    """A `tokenizers` byte-level BPE without merges (ids 0..255 are the bytes), then `special_tokens`
    (ids 256, 257, ...); `bos`: a TemplateProcessing post-processor that puts it before every text,
    as Llama 2/3, Mistral and Gemma checkpoints do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(dict.fromkeys(special_tokens)))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def write_tokenizer_files(
    out: Path, special_tokens: list[str], tokenizer_config: dict, bos: str | None = None
) -> Path:
    """tokenizer.json (`byte_level_tokenizer`) and tokenizer_config.json, as a checkpoint ships them."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    byte_level_tokenizer(special_tokens, bos).save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
