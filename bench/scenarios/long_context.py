"""Scenario 7, decode at long contexts: ours versus transformers (+ PEFT) as the context grows.

For each model shape and context length, interleaved in one process: our engine decoding a batch
of `batch` sequences with `adapters` distinct adapters and with none, transformers + PEFT with the
same mixed `adapter_names`, and plain transformers (PEFT's adapters disabled). Decode throughput
is timed over `new_tokens` steps after an untimed prefill of `context` tokens per sequence. Best
of `repeats`. Figures: ours / PEFT with adapters, and ours / plain transformers without.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench import assets
from bench.engine_timing import decode_len, engine_decode_tps, prompts
from bench.peft_baseline import PeftServer
from bench.report import Goal, ScenarioResult, Table
from inference_svc.config import EngineConfig
from inference_svc.engine import LLMEngine
from loraserve.model_summary import ModelConfig

NAME = "long-context"
TITLE = "7. Decode at long contexts: ours vs transformers + PEFT"
GOAL_VS_PEFT = 3.0  # issue 11: with adapters, at every context length
GOAL_VS_PLAIN = 1.0  # issue 11: without adapters, at every context length


@dataclass(frozen=True)
class Params:
    shapes: tuple[str, ...] = ("512", "2048")
    contexts: tuple[int, ...] = (128, 1024, 2048)
    batch: int = 32
    adapters: int = 32
    rank: int = 16
    new_tokens: int = 8
    repeats: int = 2


SMOKE = Params(shapes=("tiny",), contexts=(8, 32), batch=4, adapters=2, rank=4, new_tokens=2, repeats=1)


def measure_shape(ctx, p: Params, shape: str, bar) -> list[dict]:
    budget = max(2048, p.batch)
    longest = max(p.contexts) + decode_len(p.batch, max(p.contexts), p.new_tokens, budget)
    model_dir = assets.model(ctx.work, shape, max_position_embeddings=max(2048, longest))
    paths = assets.adapters(ctx.work, model_dir, p.adapters, p.rank)
    names = list(paths)
    config = EngineConfig(
        max_loras=p.adapters,
        max_cpu_loras=p.adapters,
        max_lora_rank=p.rank,
        max_num_seqs=p.batch,
        max_num_batched_tokens=budget,
        device="cpu",
        dtype="float32",
        # room for the whole batch at the longest context, in blocks of 16 float32 positions
        kv_cache_bytes=(-(-p.batch * longest // 16) + 1)
        * 16
        * ModelConfig.from_dir(model_dir).kv_bytes_per_token(4),
    )
    engine = LLMEngine(model_dir, config)
    for name, path in paths.items():
        engine.register_adapter(name, path)
    peft = PeftServer(model_dir, paths, p.batch)
    mixed = [names[i % p.adapters] for i in range(p.batch)]
    vocab = engine.model_config.vocab_size
    rows = []
    for context in p.contexts:
        best = {}
        for _ in range(p.repeats):
            batch_prompts = prompts(p.batch, context, vocab)
            figures = {
                "ours/lora": engine_decode_tps(engine, mixed, context, p.new_tokens),
                "ours/base": engine_decode_tps(engine, [None] * p.batch, context, p.new_tokens),
                "peft/lora": peft.decode_tokens_per_s(batch_prompts, mixed, p.new_tokens),
                "peft/base": peft.decode_tokens_per_s(batch_prompts, None, p.new_tokens),
            }
            for key, value in figures.items():
                best[key] = max(best.get(key, 0.0), value)
            bar.update(1)
        rows.append({"shape": shape, "hidden": engine.model_config.hidden_size, "context": context, **best})
    return rows


def run(ctx, p: Params) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    result.notes.append(
        f"Batch {p.batch}; {p.adapters} distinct rank-{p.rank} adapters on all 7 projections, float32; "
        f"decode tokens/s over {p.new_tokens} steps after a prefill of the context; best of {p.repeats}."
    )
    bar = ctx.progress(len(p.shapes) * len(p.contexts) * p.repeats, NAME)
    rows = [row for shape in p.shapes for row in measure_shape(ctx, p, shape, bar)]
    bar.close()
    table = []
    for r in rows:
        vs_peft, vs_plain = r["ours/lora"] / r["peft/lora"], r["ours/base"] / r["peft/base"]
        table.append(
            [
                r["hidden"],
                r["context"],
                r["ours/lora"],
                r["peft/lora"],
                vs_peft,
                r["ours/base"],
                r["peft/base"],
                vs_plain,
            ]
        )
        result.goals.append(
            Goal(
                f"hidden {r['hidden']}, context {r['context']}: ours / PEFT, {p.adapters} adapters",
                vs_peft,
                GOAL_VS_PEFT,
            )
        )
        result.goals.append(
            Goal(
                f"hidden {r['hidden']}, context {r['context']}: ours / plain transformers, no adapters",
                vs_plain,
                GOAL_VS_PLAIN,
            )
        )
    columns = [
        "hidden",
        "context",
        f"ours, {p.adapters} adapters",
        "PEFT",
        "ratio",
        "ours, no adapters",
        "transformers",
        "ratio",
    ]
    result.tables.append(Table("Decode tokens/s", columns, table))
    result.data = {"params": p.__dict__, "rows": rows}
    return result
