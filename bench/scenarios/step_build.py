"""Scenario 6, host time to build a step: the new input path versus the one before issue 11.

Both paths lay out the same step (`batch` sequences at `context` tokens: all decodes, and one
`chunk`-token prefill chunk beside `batch - 1` decodes) in one process, interleaved:
  - old: `ForwardBatch.build` and `KVCache.slot_index` as of `baseline_commit`, loaded from git
    (`git show`), plus the engine's per-step `prompt + output` concatenation of that commit;
  - new: `StepInputs.build` over the pool's block-table array, and `Sequence.token_slice`.
Best of `repeats` per path; the figure is new / old.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from bench import assets
from bench.procs import REPO
from bench.report import Goal, ScenarioResult, Table
from inference_svc.forward_batch import SequenceChunk, StepInputs
from inference_svc.kv_cache import BlockTable, KVCache
from loraserve.model_summary import ModelConfig

NAME = "step-build"
TITLE = "6. Host time to build a step: new input path / old"
GOAL = 0.1


@dataclass(frozen=True)
class Params:
    batch: int = 64
    context: int = 2048
    chunk: int = 512
    block_size: int = 16
    repeats: int = 20
    baseline_commit: str = "519c44a"  # the last commit before the paged data path


SMOKE = Params(batch=4, context=64, chunk=16, repeats=2)
# Modules the baseline imports that have moved since: old name -> where they live now.
MOVED = {"inference_svc.model_config": "loraserve.model_summary"}


def load_old(commit: str, name: str):
    """`inference_svc/<name>.py` as it was at `commit`, as a module of its own."""
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:inference_svc/{name}.py"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"step-build needs the git history of {REPO} (commit {commit}): {e}") from None
    for old, new in MOVED.items():
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader(f"old_{name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{commit}:inference_svc/{name}.py", "exec"), module.__dict__)
    return module


def layouts(p: Params) -> dict[str, list[tuple[int, int]]]:
    """(cached prefix, new tokens) per sequence, for each step kind."""
    decodes = [(p.context - 1, 1)] * p.batch
    return {"decode": decodes, "mixed": [(p.context - p.chunk, p.chunk), *decodes[1:]]}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    p: Params, model: ModelConfig, steps: list[tuple[int, int]], old_fb, old_kv
) -> tuple[float, float]:
    prompt = [t % 250 + 1 for t in range(p.context)]
    output = [7] * 8
    num_blocks = len(steps) * -(-p.context // p.block_size) + 1
    cpu = torch.device("cpu")
    max_tokens = sum(n for _, n in steps)

    old_cache = old_kv.KVCache(model, num_blocks, p.block_size, torch.float32, cpu)
    old_tables = []
    for _ in steps:
        table: list[int] = []
        old_cache.allocate(table, p.context)
        old_tables.append(table)

    def old_step():
        chunks = []
        for (prefix, n), table in zip(steps, old_tables):
            ids = (prompt + output)[prefix : prefix + n]  # the engine's all_ids slice of that commit
            chunks.append(old_fb.SequenceChunk(ids, prefix, table, -1, True))
        old_fb.ForwardBatch.build(chunks, old_cache, cpu)

    blocks = -(-p.context // p.block_size)
    new_cache = KVCache(model, num_blocks, p.block_size, torch.float32, cpu, len(steps), blocks)
    inputs = StepInputs(new_cache, max_tokens, len(steps), cpu)
    new_tables = []
    for _ in steps:
        table = BlockTable()
        new_cache.allocate(table, p.context)
        new_tables.append(table)

    def new_step():
        chunks = []
        for (prefix, n), table in zip(steps, new_tables):
            ids = prompt[prefix : prefix + n]  # Sequence.token_slice: no concatenation
            chunks.append(SequenceChunk(ids, prefix, table, -1, True))
        inputs.build(chunks)

    old_step(), new_step()  # warm up
    old_s = new_s = float("inf")
    for _ in range(p.repeats):  # interleaved, so both see the same machine
        old_s = min(old_s, seconds(old_step))
        new_s = min(new_s, seconds(new_step))
    return old_s, new_s


def run(ctx, p: Params) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    model = ModelConfig.from_dir(assets.model(ctx.work, "tiny"))
    old_fb, old_kv = load_old(p.baseline_commit, "forward_batch"), load_old(p.baseline_commit, "kv_cache")
    rows, data = [], {}
    for kind, steps in layouts(p).items():
        old_s, new_s = measure(p, model, steps, old_fb, old_kv)
        data[kind] = {"old_s": old_s, "new_s": new_s, "ratio": new_s / old_s}
        rows.append([kind, len(steps), p.context, old_s * 1e3, new_s * 1e3, new_s / old_s])
        result.goals.append(
            Goal(
                f"{kind} step, batch {len(steps)} at {p.context}: new / old build time",
                new_s / old_s,
                GOAL,
                higher_is_better=False,
            )
        )
    result.notes.append(
        f"Old path: git {p.baseline_commit}. Block size {p.block_size}; best of {p.repeats}, interleaved."
    )
    result.tables.append(
        Table(
            "Host time to build one step",
            ["step", "sequences", "context", "old ms", "new ms", "new / old"],
            rows,
        )
    )
    result.data = {"params": p.__dict__, "steps": data}
    return result
