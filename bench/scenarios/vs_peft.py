"""Scenario 2, versus the alternative on this hardware: one trace, transformers + PEFT vs our service.

The same skewed S-LoRA trace is replayed in real time, alternately, through
  - transformers + PEFT in this process: every adapter loaded, static batches of `batch` requests,
    `generate(adapter_names=...)` (bench.peft_baseline), and
  - our gRPC service, `python -m inference_svc serve` in a child process with every adapter
    registered and preloaded, `max_num_seqs = batch`, driven by the grpc.aio client in this process.
Both hold all adapters in host memory before the clock starts, and both are warmed up first. Best
of `repeats` by throughput for each system; TTFT and latency CDFs from that repeat.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from bench import assets, plots
from bench.client import engine_info, replay_trace
from bench.metrics import Slo, summarize
from bench.peft_baseline import PeftServer
from bench.procs import Service
from bench.report import Goal, ScenarioResult, Table
from bench.workload import generate, write_trace

NAME = "vs-peft"
TITLE = "2. Versus transformers + PEFT on the same trace"


@dataclass(frozen=True)
class Params:
    shape: str = "512"
    num_adapters: int = 100
    rank: int = 16
    alpha: float = 0.3  # skewed popularity
    rate: float = 16.0  # requests/s, enough to keep both systems busy
    cv: float = 1.0
    num_requests: int = 48
    input_len: tuple[int, ...] = (8, 128)
    output_len: tuple[int, ...] = (8, 64)
    batch: int = 16  # PEFT's static batch = our max_num_seqs
    max_loras: int = 16
    repeats: int = 3
    slo_ttft_s: float = 10.0
    slo_tpot_s: float = 0.25
    seed: int = 0


SMOKE = Params(
    shape="tiny",
    num_adapters=8,
    rank=4,
    rate=50.0,
    num_requests=10,
    input_len=(4, 12),
    output_len=(2, 6),
    batch=4,
    max_loras=4,
    repeats=1,
)


def run(ctx, p: Params) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    model_dir = assets.model(ctx.work, p.shape)
    paths = assets.adapters(ctx.work, model_dir, p.num_adapters, p.rank)
    spec = assets.workload(p, p.num_adapters, p.alpha)
    trace = generate(spec)
    write_trace(ctx.out / "traces" / "vs-peft.jsonl", spec, trace)
    warmup = [
        dataclasses.replace(r, arrival_s=0.0, prompt=r.prompt[:8], output_len=2) for r in trace[: p.batch]
    ]
    slo = Slo(p.slo_ttft_s, p.slo_tpot_s)
    bar = ctx.progress(2 * (p.repeats + 1), NAME)
    engine = dict(
        max_loras=p.max_loras,
        max_cpu_loras=p.num_adapters,
        max_lora_rank=p.rank,
        max_num_seqs=p.batch,
        device="cpu",
        dtype="float32",
    )
    runs = {"ours": [], "peft": []}
    with Service.inference(model_dir, engine, ctx.log("vs-peft-inference.log"), lora_modules=paths) as server:
        peft = PeftServer(model_dir, paths, p.batch)
        peft.replay(warmup)
        bar.update(1)
        replay_trace(server.address, warmup)
        bar.update(1)
        for _ in range(p.repeats):
            peft_results = peft.replay(trace)
            runs["peft"].append((summarize(peft_results, slo), peft_results))
            bar.update(1)
            ours_results = replay_trace(server.address, trace)
            runs["ours"].append((summarize(ours_results, slo), ours_results))
            bar.update(1)
        info = asyncio.run(engine_info(server.address))
    bar.close()
    best = {k: max(v, key=lambda run: run[0]["tokens_per_s"]) for k, v in runs.items()}
    ours, peft_best = best["ours"][0], best["peft"][0]
    distinct = len({r.adapter_id for r in trace})
    result.notes.append(
        f"Trace: {p.num_requests} requests over {p.num_adapters} rank-{p.rank} adapters (alpha {p.alpha}, "
        f"{distinct} distinct used), Gamma arrivals at {p.rate} req/s (cv {p.cv}), input {p.input_len}, "
        f"output {p.output_len} tokens (uniform), seed {p.seed}; `traces/vs-peft.jsonl`. Model: hidden "
        f"{assets.SHAPES[p.shape]['hidden_size']}, float32. Ours: max_num_seqs {p.batch}, max_loras "
        f"{p.max_loras}, max_cpu_loras {p.num_adapters}; PEFT: static batches of {p.batch}. SLO: TTFT <= "
        f"{p.slo_ttft_s} s and TPOT <= {p.slo_tpot_s} s. Client and server share the machine's cores."
    )
    rows = []
    for system, label in (("ours", "loraserve (gRPC)"), ("peft", "transformers+PEFT")):
        s = best[system][0]
        rows.append(
            [
                label,
                s["tokens_per_s"],
                s["requests_per_s"],
                s["ttft_p50_s"],
                s["ttft_p99_s"],
                s["tpot_p50_s"],
                s["latency_p50_s"],
                s["latency_p99_s"],
                s["slo_attainment"],
                s["errors"],
                ", ".join(f"{run[0]['tokens_per_s']:.0f}" for run in runs[system]),
            ]
        )
    columns = ["system", "tok/s", "req/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 s", "latency p50 s"]
    columns += ["latency p99 s", "SLO attained", "errors", "tok/s per repeat"]
    result.tables.append(Table("Same trace, best repeat of each", columns, rows))
    stats = info.cache_stats
    result.data = {
        "params": p.__dict__,
        "spec": spec.__dict__,
        "summaries": {k: [run[0] for run in v] for k, v in runs.items()},
        "cache_stats": {f.name: v for f, v in stats.ListFields()},
        "throughput_ratio": ours["tokens_per_s"] / peft_best["tokens_per_s"],
        "ttft_p99_ratio": ours["ttft_p99_s"] / peft_best["ttft_p99_s"],
    }
    ttft = {k: [r.ttft_s for r in v[1] if r.ttft_s is not None] for k, v in best.items()}
    latency = {k: [r.latency_s for r in v[1] if r.error is None] for k, v in best.items()}
    result.goals += [
        Goal("throughput, loraserve / transformers+PEFT", result.data["throughput_ratio"], 2.0),
        Goal(
            "p99 TTFT, loraserve / transformers+PEFT (lower)",
            result.data["ttft_p99_ratio"],
            1.0,
            higher_is_better=False,
        ),
    ]
    labels = {"ours": "loraserve (gRPC)", "peft": "transformers+PEFT"}
    result.plots.append(
        plots.cdfs(
            ctx.out / "vs_peft_ttft_cdf.png",
            {labels[k]: v for k, v in ttft.items()},
            "time to first token (s)",
            "Time to first token, same trace",
        )
    )
    result.plots.append(
        plots.cdfs(
            ctx.out / "vs_peft_latency_cdf.png",
            {labels[k]: v for k, v in latency.items()},
            "end-to-end latency (s)",
            "End-to-end latency, same trace",
        )
    )
    return result
