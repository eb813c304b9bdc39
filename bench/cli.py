"""`python -m bench {list,run,trace,replay}`: the benchmark suite's one entry point.

    python -m bench list                                  # scenarios and their parameters
    python -m bench run all --out results/my-machine      # every scenario, full size
    python -m bench run overhead --smoke                  # one scenario, CI size
    python -m bench run overhead --set shapes=512 --set repeats=5
    python -m bench trace --out t.jsonl --adapters 100 --alpha 0.3 --rate 8 --requests 200
    python -m bench replay --target 127.0.0.1:50051 --trace t.jsonl

`run` writes report.md, results.json, PNG plots, the replayed traces and the services' logs into
the results directory (default: results/tmp/<scenarios>-<time>, ignored by git) and prints the
report's path. A scenario that fails is reported and the others still run; the exit status is 1
if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.procs import REPO


def cmd_list(args: argparse.Namespace) -> int:
    from bench.scenarios import SCENARIOS

    for name, module in SCENARIOS.items():
        print(f"{name:<14} {module.TITLE}")
        full, smoke = module.Params(), module.SMOKE
        for f in dataclasses.fields(full):
            value, small = getattr(full, f.name), getattr(smoke, f.name)
            print(f"    {f.name:<14} {value!r}" + (f"   (smoke: {small!r})" if small != value else ""))
    return 0


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from bench import report
    from bench.scenarios import SCENARIOS, Context, params_for

    names = list(SCENARIOS) if args.scenarios == ["all"] else args.scenarios
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {['all', *SCENARIOS]}")
    overrides = {n: [] for n in names}
    for item in args.set:
        scope, dot, rest = item.partition(".")
        if dot and scope in SCENARIOS and "=" not in scope:
            if scope not in overrides:
                raise ValueError(f"--set {item!r}: scenario {scope!r} is not being run")
            overrides[scope].append(rest)
        elif len(names) == 1:
            overrides[names[0]].append(item)
        else:
            raise ValueError(f"--set {item!r}: with several scenarios, name one (SCENARIO.FIELD=VALUE)")
    params = {n: params_for(SCENARIOS[n], args.smoke, overrides[n]) for n in names}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else REPO / "results" / "tmp" / f"{'-'.join(names)}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the services started as children
    info = report.machine()
    ctx = Context(out=out, work=work, smoke=args.smoke)
    results, failed = [], []
    try:
        for name in names:
            module = SCENARIOS[name]
            start = time.perf_counter()
            try:
                result = module.run(ctx, params[name])
            except Exception as e:
                failed.append(name)
                traceback.print_exc()
                result = report.ScenarioResult(name, module.TITLE, notes=[f"**FAILED**: `{e!r}`"])
            result.seconds = time.perf_counter() - start
            result.load_average = os.getloadavg()
            results.append(result)
            path = report.write(out, command, info, results, args.smoke)  # after each: partial runs keep
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(path)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_trace(args: argparse.Namespace) -> int:
    from bench.workload import WorkloadSpec, generate, write_trace

    spec = WorkloadSpec(
        num_adapters=args.adapters,
        alpha=args.alpha,
        rate=args.rate,
        cv=args.cv,
        num_requests=args.requests,
        input_len=args.input_len,
        output_len=args.output_len,
        vocab_size=args.vocab_size,
        seed=args.seed,
        adapter_prefix=args.adapter_prefix,
    )
    requests = generate(spec)
    print(write_trace(args.out, spec, requests))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from bench.client import replay_trace
    from bench.metrics import Slo, summarize
    from bench.workload import read_trace

    _, requests = read_trace(args.trace)
    results = replay_trace(args.target, requests, args.timeout_s)
    summary = summarize(results, Slo(args.slo_ttft_s, args.slo_tpot_s))
    print(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(",")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} must be LO,HI")
    return int(lo), int(hi)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the scenarios and their parameters")
    run = sub.add_parser("run", help="run scenarios and write a results directory")
    run.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario names, or 'all'")
    run.add_argument("--smoke", action="store_true", help="tiny sizes: checks the suite runs, not speed")
    run.add_argument("--out", help="results directory (default: results/tmp/<scenarios>-<time>)")
    run.add_argument("--work", help="keep generated models and adapters here, reused across runs")
    run.add_argument(
        "--threads",
        type=int,
        help="torch threads here and in the services started (default: torch's); on a shared machine, "
        "fewer threads than cores makes timings less sensitive to other load",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[SCENARIO.]FIELD=VALUE",
        help="override a scenario parameter (repeatable; tuples comma-separated; see `list`)",
    )
    trace = sub.add_parser("trace", help="write an S-LoRA-style workload trace (JSONL)")
    trace.add_argument("--out", required=True)
    trace.add_argument("--adapters", type=int, default=100)
    trace.add_argument("--alpha", type=float, default=1.0, help="popularity: 1 uniform, 0.1-0.6 skewed")
    trace.add_argument("--rate", type=float, default=4.0, help="requests per second")
    trace.add_argument("--cv", type=float, default=1.0, help="arrival coefficient of variation (1 = Poisson)")
    trace.add_argument("--requests", type=int, default=200)
    trace.add_argument("--input-len", type=_range, default=(8, 512), metavar="LO,HI")
    trace.add_argument("--output-len", type=_range, default=(8, 512), metavar="LO,HI")
    trace.add_argument("--vocab-size", type=int, default=32000)
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--adapter-prefix", default="lora-")
    replay = sub.add_parser("replay", help="replay a trace against a running InferenceService")
    replay.add_argument("--target", required=True, metavar="HOST:PORT")
    replay.add_argument("--trace", required=True)
    replay.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each request")
    replay.add_argument("--slo-ttft-s", type=float, default=10.0)
    replay.add_argument("--slo-tpot-s", type=float, default=0.25)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args, argv)
        return {"list": cmd_list, "trace": cmd_trace, "replay": cmd_replay}[args.command](args)
    except (ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
