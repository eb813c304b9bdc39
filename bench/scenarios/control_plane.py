"""Scenario 5, control plane: register / list / load latencies with 10,000 adapters registered.

The measurement is the adapter manager's own benchmark, `python -m bench.control_plane` (written
with the manager; see its docstring for what each operation does and how Redis round trips are
counted), run as a child process through its command line; this module turns its JSON into the
suite's table and plot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from bench import plots
from bench.procs import REPO
from bench.report import ScenarioResult, Table

NAME = "control-plane"
TITLE = "5. Control plane: register / list / load latencies at scale"
TIMEOUT_S = 900


@dataclass(frozen=True)
class Params:
    adapters: int = 10_000  # registered before measuring
    samples: int = 200  # timed calls per operation


SMOKE = Params(adapters=50, samples=5)


def run(ctx, p: Params) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    bar = ctx.progress(1, NAME)
    command = [sys.executable, "-m", "bench.control_plane", "--adapters", str(p.adapters)]
    command += ["--samples", str(p.samples), "--json"]
    log = ctx.log("control-plane.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as stderr:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"bench.control_plane exited with {done.returncode}; log {log}")
    data = json.loads(done.stdout)
    bar.update(1)
    bar.close()
    ops = data["operations"]
    result.notes.append(
        f"`python -m bench.control_plane --adapters {p.adapters} --samples {p.samples}`: a private Redis, "
        f"an in-process manager and replica (tiny model, max_cpu_loras 3), {data['registered_adapters']} "
        f"adapters registered ({p.adapters} in bulk through the registry's script in "
        f"{data['bulk_register_s']} s), then {p.samples} timed gRPC calls per operation. Round trips: "
        "messages the manager sent Redis per call; commands: what Redis executed (scripts' inner commands "
        "included)."
    )
    rows = [
        [name, op["n"], op["p50_ms"], op["p99_ms"], op["redis_round_trips"], op["redis_commands"]]
        for name, op in ops.items()
    ]
    columns = ["operation", "n", "p50 ms", "p99 ms", "Redis round trips", "Redis commands"]
    result.tables.append(
        Table(f"Latency per call, {data['registered_adapters']} adapters registered", columns, rows)
    )
    result.data = {"params": p.__dict__, "control_plane": data}
    names = list(ops)
    result.plots.append(
        plots.bars(
            ctx.out / "control_plane_latency.png",
            names,
            {"p50": [ops[n]["p50_ms"] for n in names], "p99": [ops[n]["p99_ms"] for n in names]},
            "milliseconds",
            f"Control-plane calls, {data['registered_adapters']} adapters registered",
        )
    )
    return result
