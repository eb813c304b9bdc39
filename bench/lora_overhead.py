"""LoRA overhead, side by side in one run: decode throughput with N distinct adapters in the batch
versus the same engine with no adapters, and the same ratio for transformers + PEFT.

    python -m bench.lora_overhead --hidden 2048 --batch 32 --adapters 32
    python -m bench.lora_overhead --preset issue2      # both shapes of the issue-2 report

Ratios, not absolute speeds, are the result: both sides run in the same process on the same
machine, interleaved, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from inference_svc.config import EngineConfig
from inference_svc.demo_model import write_demo_adapter, write_demo_model
from inference_svc.engine import LLMEngine
from inference_svc.model_config import ModelConfig
from inference_svc.sampling import SamplingParams

SHAPES = {
    512: dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
    2048: dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def engine_decode_tps(
    engine: LLMEngine, adapters: list[str | None], prompt_len: int, new_tokens: int
) -> float:
    """Decode tokens/s of one whole batch (the prefill step is not timed)."""
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
    for i, adapter in enumerate(adapters):
        engine.add_request(
            f"b{time.monotonic_ns()}-{i}",
            [(7 * i + j) % 1000 + 1 for j in range(prompt_len)],
            params,
            adapter,
        )
    engine.step()  # prefill (+ first token)
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += len(engine.step())
    return tokens / (time.perf_counter() - start)


def peft_tps(model, names: list[str] | None, batch: int, prompt_len: int, new_tokens: int) -> float:
    ids = torch.tensor([[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(batch)])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        if names is None:
            with model.disable_adapter():
                model.generate(input_ids=ids, **kwargs)
        else:
            model.generate(input_ids=ids, adapter_names=names, **kwargs)
    return batch * new_tokens / (time.perf_counter() - start)


def run(
    hidden: int,
    batch: int,
    n_adapters: int,
    rank: int,
    new_tokens: int,
    repeats: int,
    with_peft: bool,
    workdir: Path,
) -> dict:
    model_dir = write_demo_model(workdir / f"model-{hidden}", **SHAPES[hidden])
    model_cfg = ModelConfig.from_dir(model_dir)
    adapter_dirs = {
        f"a{i}": write_demo_adapter(
            workdir / f"adapters-{hidden}" / f"a{i}", model_cfg, rank=rank, alpha=2 * rank, seed=i
        )
        for i in range(n_adapters)
    }
    config = EngineConfig(
        max_loras=n_adapters,
        max_lora_rank=rank,
        max_cpu_loras=n_adapters,
        max_num_seqs=batch,
        device="cpu",
        dtype="float32",
        kv_cache_bytes=256 << 20,
    )
    engine = LLMEngine(model_dir, config)
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, path)
    names = list(adapter_dirs)
    mixed = [names[i % n_adapters] for i in range(batch)]
    prompt_len = 8
    engine_decode_tps(engine, mixed, prompt_len, 2)  # warm-up: loads every adapter into its slot
    ours_base, ours_lora = [], []
    for _ in range(repeats):
        ours_base.append(engine_decode_tps(engine, [None] * batch, prompt_len, new_tokens))
        ours_lora.append(engine_decode_tps(engine, mixed, prompt_len, new_tokens))
    result = {
        "hidden": hidden,
        "batch": batch,
        "adapters": n_adapters,
        "rank": rank,
        "ours_base_tps": max(ours_base),
        "ours_lora_tps": max(ours_lora),
    }
    result["ours_ratio"] = result["ours_lora_tps"] / result["ours_base_tps"]
    del engine
    if with_peft:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapter_dirs[name], adapter_name=name)
        model.eval()
        peft_tps(model, mixed, batch, prompt_len, 2)
        peft_base, peft_lora = [], []
        for _ in range(repeats):
            peft_base.append(peft_tps(model, None, batch, prompt_len, new_tokens))
            peft_lora.append(peft_tps(model, mixed, batch, prompt_len, new_tokens))
        result.update(peft_base_tps=max(peft_base), peft_lora_tps=max(peft_lora))
        result["peft_ratio"] = result["peft_lora_tps"] / result["peft_base_tps"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["issue2"], help="hidden 512 and 2048, batch 32, 32 adapters")
    parser.add_argument("--hidden", type=int, choices=sorted(SHAPES), default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    hiddens = sorted(SHAPES) if args.preset == "issue2" else [args.hidden]
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in hiddens:
            r = run(
                hidden,
                args.batch,
                args.adapters,
                args.rank,
                args.new_tokens,
                args.repeats,
                not args.no_peft,
                Path(tmp),
            )
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True
            )


if __name__ == "__main__":
    main()
