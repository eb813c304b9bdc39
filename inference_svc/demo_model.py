"""Deterministic small models and PEFT adapters, for tests, benchmarks and the demo.

Everything is generated from a seed, so two machines produce byte-identical files. The files are
real Hugging Face / PEFT layouts: `config.json` + `model.safetensors` + `tokenizer.json` (with a
`tokenizer_config.json` holding a chat template), and
`adapter_config.json` + `adapter_model.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraserve.engine_limits import ALL_TARGET_MODULES
from loraserve.model_summary import ModelConfig


def llama_shape(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """The config.json fields that size a Llama-style model (`write_demo_model` adds the rest)."""
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
    }


DEMO_SHAPE = llama_shape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=258)
# The smallest shape that still has grouped-query attention: tests and smoke runs.
TINY_SHAPE = llama_shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=258)
BOS_ID, EOS_ID = 256, 257
# A Zephyr-style chat template for the demo tokenizer (written into tokenizer_config.json).
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ eos_token ~ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def write_demo_model(out_dir: str | Path, seed: int = 0, **shape) -> Path:
    """Write a random Llama-style model; `shape` overrides DEMO_SHAPE fields of config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        **DEMO_SHAPE,
        **shape,
    }
    cfg = ModelConfig.from_dict(raw)
    g = torch.Generator().manual_seed(seed)

    def rand(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=g) * 0.02

    tensors = {
        "model.embed_tokens.weight": rand(cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": torch.ones(cfg.hidden_size),
        "lm_head.weight": rand(cfg.vocab_size, cfg.hidden_size),
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(cfg.hidden_size)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(cfg.hidden_size)
        for module, (fan_in, fan_out) in cfg.module_shapes().items():
            part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            tensors[f"{p}.{part}.{module}.weight"] = rand(fan_out, fan_in)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    if cfg.vocab_size >= 258:
        write_byte_tokenizer(out / "tokenizer.json")
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "chat_template": DEMO_CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens, then <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path))


def write_demo_adapter(
    out_dir: str | Path,
    model: ModelConfig,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] = ALL_TARGET_MODULES,
    seed: int = 0,
    use_rslora: bool = False,
) -> Path:
    """Write a random PEFT LoRA adapter for `model` (B is non-zero, so it changes outputs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(model.num_layers):
        for module in target_modules:
            fan_in, fan_out = model.module_shapes()[module]
            part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{i}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m inference_svc.demo_model --model-dir D --adapter-dir A`: write the demo files once."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m inference_svc.demo_model", description=main.__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--adapter-dir", required=True, help="demo adapters go to ADAPTER_DIR/demo-N")
    parser.add_argument("--num-adapters", type=int, default=4)
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        write_demo_model(model_dir)
    model = ModelConfig.from_dir(model_dir)
    for i in range(args.num_adapters):
        path = Path(args.adapter_dir) / f"demo-{i}"
        if not (path / "adapter_config.json").is_file():
            write_demo_adapter(path, model, rank=8 * (1 + i % 2), seed=i)
    print(f"demo model in {model_dir}, {args.num_adapters} adapters in {args.adapter_dir}")


if __name__ == "__main__":
    main()
