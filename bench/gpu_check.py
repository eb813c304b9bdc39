"""The one prepared accelerator check (issue 11): run it on a machine with an NVIDIA GPU.

    python -m bench.gpu_check [--quick] [--out DIR] [--work DIR]          (or: make gpu-check)

1. Kernel sweep: pytest over tests/kernels/ in a subprocess; with a GPU the Triton LoRA ops and
   paged attention run on CUDA, including the `gpu`-marked serving-size sweep.
2. Parity (bench/gpu_parity.py): the engine in bfloat16 with the Triton kernels against
   transformers + PEFT on one mixed batch, prefill and greedy decode; then decode with CUDA graphs
   allowed (enforce_eager=False) against without.
3. Decode throughput: batch x context x distinct adapters, graphs on and off, on the hidden-2048
   model in bfloat16, printed as markdown.

Each check prints one PASS/FAIL line; the run ends with `gpu_check: N passed, M failed` and exits 1
if any failed. Results go to --out (default $OUT when set, else results/gpu-check): gpu_check.json
(every figure), table.md, kernel_tests.log, and errors.log with the traceback of a part that
raised. Without CUDA it says so in one line and exits 2.

It needs only the working tree and torch, triton, transformers, peft, pytest and hypothesis: it
imports the engine, `bench.assets` and `bench.engine_timing`, nothing that needs Redis or gRPC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import torch
except ModuleNotFoundError:
    print(
        f"gpu_check: {sys.executable} cannot import torch; run it with a python that has torch",
        file=sys.stderr,
    )
    sys.exit(2)

from bench import assets
from bench.engine_timing import decode_len, engine_decode_tps
from bench.gpu_parity import Check, bfloat16_engine, graphs_checks, parity_checks

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = (
    "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); "
    "run this on a machine with an NVIDIA GPU"
)
KERNEL_TESTS = ("tests/kernels/test_lora_ops.py", "tests/kernels/test_paged_attention.py")
KERNEL_TIMEOUT_S = 300  # leaves the parity checks and the table their share of 8 minutes
TABLE_RANK = 16  # adapters of the table, on all 7 projections
TABLE_BATCHED_TOKENS = 8192  # longer prefills go through in chunks


@dataclass(frozen=True)
class Plan:
    """How much one run measures; --quick shrinks it."""

    gpu_sweep: bool  # include the `gpu`-marked kernel sweep
    parity_shapes: tuple[str, ...]  # bench.assets.SHAPES keys
    table_shape: str  # the throughput table's model (bench.assets.SHAPES key)
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    adapters: tuple[int, ...]  # distinct adapters asked for (capped by the batch)
    decode_steps: int  # timed decode steps per figure
    repeats: int  # best of


FULL = Plan(True, ("512", "2048"), "2048", (1, 8, 32, 64), (512, 2048), (0, 8, 32), 32, 2)
QUICK = Plan(False, ("512",), "2048", (1, 32), (512,), (0, 32), 8, 1)


class Report:
    """The checks of one run: printed as they come, kept for gpu_check.json."""

    def __init__(self, out: Path):
        self.out = out
        self.checks: list[Check] = []
        self.seconds: dict[str, float] = {}

    def add(self, check: Check) -> None:
        self.checks.append(check)
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}", flush=True)

    def part(self, name: str, fn: Callable[..., list[Check]], *args) -> None:
        """Add the checks of fn(*args), timed; an exception is one FAIL line, traceback in errors.log."""
        start = time.perf_counter()
        try:
            for check in fn(*args):
                self.add(check)
        except Exception as e:
            log = self.out / "errors.log"
            with log.open("a") as f:
                f.write(f"--- {name}\n{traceback.format_exc()}\n")
            self.add(Check(name, False, f"{type(e).__name__}: {e} (traceback in {log})"))
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}: {self.seconds[name]} s]", flush=True)

    @property
    def failed(self) -> int:
        return sum(not c.passed for c in self.checks)


# --- 1. kernel sweep -----------------------------------------------------------------------------


def kernel_sweep(out: Path, gpu_sweep: bool) -> list[Check]:
    """pytest over the kernel tests with TRITON_INTERPRET unset (so on CUDA); log in `out`."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS]
    if not gpu_sweep:
        cmd += ["-m", "not gpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = out / "kernel_tests.log"
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=KERNEL_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        log.write_text(_text(e.stdout) + _text(e.stderr))
        return [Check("kernel sweep", False, f"pytest did not finish in {KERNEL_TIMEOUT_S} s (log in {log})")]
    log.write_text(proc.stdout + proc.stderr)
    lines = [line.strip("= ") for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else f"no output, exit {proc.returncode}"
    return [Check("kernel sweep", proc.returncode == 0, f"{summary} (log in {log})")]


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


# --- 3. decode throughput --------------------------------------------------------------------------


def distinct_adapters(batch: int, asked: tuple[int, ...]) -> list[int]:
    """The distinct-adapter counts a batch of `batch` rows can have: each of `asked`, capped."""
    return sorted({min(n, batch) for n in asked})


def mix(names: list[str], batch: int, n: int) -> list[str | None]:
    """`batch` rows spread round-robin over the first `n` adapters (n = 0: base model only)."""
    return [names[i % n] if n else None for i in range(batch)]


def longest_sequence(plan: Plan) -> int:
    """Tokens of the longest sequence a table figure runs (context + what it generates)."""
    batch, context = max(plan.batches), max(plan.contexts)
    return context + decode_len(batch, context, plan.decode_steps, TABLE_BATCHED_TOKENS)


def table_engine(model_dir: Path, adapters: dict[str, Path], plan: Plan, device: str, enforce_eager: bool):
    """The bfloat16 engine of the table, warmed up (and graphs captured) for every batch it runs."""
    seqs = max(plan.batches)
    engine = bfloat16_engine(
        model_dir,
        adapters,
        device,
        enforce_eager,
        max_loras=max(plan.adapters),
        max_lora_rank=TABLE_RANK,
        max_num_seqs=seqs,
        max_num_batched_tokens=TABLE_BATCHED_TOKENS,
        kv_tokens=max(seqs * (longest_sequence(plan) + 16), TABLE_BATCHED_TOKENS),  # + a partial block each
    )
    engine.warm_up()
    for batch in plan.batches:  # also puts every adapter in its slot
        for n in distinct_adapters(batch, plan.adapters):
            engine_decode_tps(engine, mix(list(adapters), batch, n), 16, 2)
    return engine


def throughput_table(plan: Plan, work: Path, device: str) -> list[dict]:
    """Decode tokens/s of every batch x context x adapters, eager and with graphs interleaved."""
    model_dir = assets.model(
        work, plan.table_shape, max_position_embeddings=max(4096, longest_sequence(plan))
    )
    adapters = assets.adapters(work, model_dir, max(plan.adapters), TABLE_RANK)
    engines = {eager: table_engine(model_dir, adapters, plan, device, eager) for eager in (True, False)}
    rows = []
    for context in plan.contexts:
        for batch in plan.batches:
            for n in distinct_adapters(batch, plan.adapters):
                batch_adapters = mix(list(adapters), batch, n)
                tps = dict.fromkeys(engines, 0.0)
                for _ in range(plan.repeats):
                    for eager, engine in engines.items():
                        figure = engine_decode_tps(engine, batch_adapters, context, plan.decode_steps)
                        tps[eager] = max(tps[eager], figure)
                rows.append(
                    dict(context=context, batch=batch, adapters=n, eager=tps[True], graphs=tps[False])
                )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The throughput rows as a markdown table."""
    columns = ("context", "batch", "adapters", "eager tok/s", "graphs tok/s", "graphs / eager")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for r in rows:
        cells = (r["context"], r["batch"], r["adapters"], f"{r['eager']:,.0f}", f"{r['graphs']:,.0f}")
        lines.append("| " + " | ".join(map(str, cells)) + f" | {r['graphs'] / r['eager']:.2f} |")
    return "\n".join(lines) + "\n"


def table_checks(out: Path, plan: Plan, work: Path, device: str) -> list[Check]:
    """Measure the throughput table, print it and write it to table.md; its rows are the figures."""
    rows = throughput_table(plan, work, device)
    hidden = assets.SHAPES[plan.table_shape]["hidden_size"]
    text = (
        f"Decode tokens/s on {device_name(device)}: hidden {hidden}, bfloat16, rank-{TABLE_RANK} adapters "
        f"on all 7 projections; {plan.decode_steps} timed steps after an untimed prefill of the context; "
        f"best of {plan.repeats}. `adapters` = distinct adapters in the batch (0 = base model only); "
        f"graphs = enforce_eager=False.\n\n{markdown_table(rows)}"
    )
    (out / "table.md").write_text(text)
    print(text, flush=True)
    return [
        Check("decode throughput table", True, f"{len(rows)} rows, in {out / 'table.md'}", dict(rows=rows))
    ]


# --- the run ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="no serving-size kernel sweep, one parity model, a small table"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or "results/gpu-check"),
        help="results directory (default: $OUT when set, else results/gpu-check)",
    )
    parser.add_argument(
        "--work", type=Path, help="models and adapters are written here once and reused (default: a temp dir)"
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    """`path` (created), or a temporary directory removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        yield Path(tmp)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "CPU"


def environment() -> dict:
    import triton

    return dict(
        device=device_name("cuda"),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        python=platform.python_version(),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    env = environment()
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    with work_dir(args.work) as work:
        report.part("kernel sweep", kernel_sweep, args.out, plan.gpu_sweep)
        for shape in plan.parity_shapes:
            report.part(f"parity {shape}", parity_checks, work, shape, "cuda")
            report.part(f"graphs {shape}", graphs_checks, work, shape, "cuda")
        report.part("decode throughput table", table_checks, args.out, plan, work, "cuda")
    results = dict(
        environment=env, plan=asdict(plan), checks=[asdict(c) for c in report.checks], seconds=report.seconds
    )
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(f"gpu_check: {len(report.checks) - report.failed} passed, {report.failed} failed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
