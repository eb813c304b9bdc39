"""Scenario 1, LoRA overhead: throughput with N distinct adapters in the batch versus none.

One engine per model shape (slots for the largest N), one transformers + PEFT model with the same
adapters loaded, in the same process. Each repeat measures, interleaved, for N = 0 (base model
only) and every N in `adapters`: our decode and prefill throughput, then PEFT's. Decode: the whole
batch decodes `new_tokens` steps after an untimed prefill; prefill: one step over `batch` prompts
of `prompt_len` tokens (logits of the last token only, on both sides). Batch rows are spread
round-robin over the N adapters. Best of `repeats`; the result is each N's ratio to N = 0.

This replaces `bench/lora_overhead.py`; its figures (issue 2: decode only, 32 adapters, 16 tokens
after an 8-token prompt) come from
    python -m bench run overhead --set adapters=32 --set new_tokens=16 --set prompt_len=8
"""

from __future__ import annotations

from dataclasses import dataclass

from bench import assets, plots
from bench.engine_timing import engine_decode_tps, engine_prefill_tps, prompts
from bench.peft_baseline import PeftServer
from bench.report import Goal, ScenarioResult, Table
from inference_svc.config import EngineConfig
from inference_svc.engine import LLMEngine

NAME = "overhead"
TITLE = "1. LoRA overhead: N distinct adapters in the batch vs none"
GOALS = {"2048": 0.90, "512": 0.75}  # issue 7: decode ratio at 32 adapters


@dataclass(frozen=True)
class Params:
    shapes: tuple[str, ...] = ("512", "2048")  # bench.assets.SHAPES keys
    adapters: tuple[int, ...] = (1, 8, 32)  # distinct adapters in the batch
    rank: int = 16
    batch: int = 32
    new_tokens: int = 8  # decode steps timed
    prompt_len: int = 16  # prefill tokens per sequence
    repeats: int = 3
    peft: bool = True


SMOKE = Params(shapes=("tiny",), adapters=(1, 4), rank=4, batch=4, new_tokens=2, prompt_len=4, repeats=1)


def measure_shape(ctx, p: Params, shape: str, bar) -> dict:
    model_dir = assets.model(ctx.work, shape)
    n_max = max(p.adapters)
    paths = assets.adapters(ctx.work, model_dir, n_max, p.rank)
    names = list(paths)
    config = EngineConfig(
        max_loras=n_max,
        max_cpu_loras=n_max,
        max_lora_rank=p.rank,
        max_num_seqs=p.batch,
        max_num_batched_tokens=max(2048, p.batch * p.prompt_len),
        device="cpu",
        dtype="float32",
        kv_cache_bytes=256 << 20,
    )
    engine = LLMEngine(model_dir, config)
    for name, path in paths.items():
        engine.register_adapter(name, path)
    peft = PeftServer(model_dir, paths, p.batch) if p.peft else None
    vocab = engine.model_config.vocab_size
    counts = (0, *p.adapters)
    rows = {n: [names[i % n] for i in range(p.batch)] if n else [None] * p.batch for n in counts}
    engine_decode_tps(engine, rows[n_max], p.prompt_len, 2)  # warm-up: every adapter into its slot
    engine_prefill_tps(engine, rows[n_max], p.prompt_len)
    best: dict[tuple[str, str, int], float] = {}

    def keep(system: str, phase: str, n: int, value: float) -> None:
        best[system, phase, n] = max(best.get((system, phase, n), 0.0), value)

    for _ in range(p.repeats):
        for n in counts:
            keep("ours", "decode", n, engine_decode_tps(engine, rows[n], p.prompt_len, p.new_tokens))
            keep("ours", "prefill", n, engine_prefill_tps(engine, rows[n], p.prompt_len))
            if peft is not None:
                batch_prompts = prompts(p.batch, p.prompt_len, vocab)
                peft_names = None if n == 0 else rows[n]
                keep("peft", "decode", n, peft.decode_tokens_per_s(batch_prompts, peft_names, p.new_tokens))
                keep("peft", "prefill", n, peft.prefill_tokens_per_s(batch_prompts, peft_names))
            bar.update(1)
    systems = ("ours", "peft") if peft is not None else ("ours",)
    keys = [(system, phase, n) for system in systems for phase in ("decode", "prefill") for n in counts]
    return {
        "shape": shape,
        "hidden": engine.model_config.hidden_size,
        "tokens_per_s": {f"{s}/{phase}/{n}": best[s, phase, n] for s, phase, n in keys},
        "ratio": {f"{s}/{phase}/{n}": best[s, phase, n] / best[s, phase, 0] for s, phase, n in keys},
    }


def run(ctx, p: Params) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    result.notes.append(
        f"Batch {p.batch}, rank-{p.rank} adapters on all 7 projections, float32; decode: {p.new_tokens} steps "
        f"after a {p.prompt_len}-token prefill; prefill: one step of {p.batch} x {p.prompt_len} tokens. "
        f"Ratio = throughput with N distinct adapters / throughput with none, same system, best of "
        f"{p.repeats}."
    )
    bar = ctx.progress(len(p.shapes) * p.repeats * (1 + len(p.adapters)), NAME)
    shapes = [measure_shape(ctx, p, shape, bar) for shape in p.shapes]
    bar.close()
    result.data = {"params": p.__dict__, "shapes": shapes}
    systems = ("ours", "peft") if p.peft else ("ours",)
    rows = []
    for s in shapes:
        for system in systems:
            for phase in ("decode", "prefill"):
                base = s["tokens_per_s"][f"{system}/{phase}/0"]
                ratios = [s["ratio"][f"{system}/{phase}/{n}"] for n in p.adapters]
                rows.append(
                    [
                        s["hidden"],
                        "loraserve" if system == "ours" else "transformers+PEFT",
                        phase,
                        base,
                        *ratios,
                    ]
                )
    columns = [
        "hidden",
        "system",
        "phase",
        "tok/s, no adapters",
        *(f"ratio, {n} adapters" for n in p.adapters),
    ]
    result.tables.append(Table("Throughput with N adapters / without", columns, rows))
    n_goal = max(p.adapters)
    for s in shapes:
        if s["shape"] in GOALS:
            result.goals.append(
                Goal(
                    f"hidden {s['hidden']}, {n_goal} adapters: decode throughput / no-adapter",
                    s["ratio"][f"ours/decode/{n_goal}"],
                    GOALS[s["shape"]],
                )
            )
    series = {}
    for s in shapes:
        for system in systems:
            label = "loraserve" if system == "ours" else "PEFT"
            series[f"{label} decode, hidden {s['hidden']}"] = [
                s["ratio"][f"{system}/decode/{n}"] for n in (0, *p.adapters)
            ]
    result.plots.append(
        plots.lines(
            ctx.out / "overhead_ratio.png",
            [0, *p.adapters],
            series,
            "distinct adapters in the batch",
            "decode throughput / no-adapter throughput",
            "LoRA overhead (higher is better)",
        )
    )
    return result
