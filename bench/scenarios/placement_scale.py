"""Scenario 9, placement at scale, simulated: real Redis and control-plane code, simulated replicas.

For each scale (adapters x replicas) a fresh private Redis (one server, or with `redis=cluster` a
six-node Cluster) holds a whole simulated deployment: `bench.placement_sim` registers the adapters
through `Registry.register`, joins the replicas through the manager's `Membership`, and drives an
S-LoRA request stream on a simulated clock through the endpoint picker's view and pick and, for
every adapter a chosen replica lacks, the manager's `Placement.acquire`, with the replica's
heartbeats and residency reports in between (see that module for what is real and what is
simulated). Redis commands per operation come from INFO commandstats around sampled calls; the
scales side by side show which costs stay flat as adapters and replicas grow.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bench import plots
from bench.placement_sim import OPS, CountingConnection, PlacementSim, RedisCounters, SimConfig
from bench.procs import RedisClusterServer, RedisServer
from bench.report import ScenarioResult, Table

NAME = "placement-scale"
TITLE = "9. Placement at scale, simulated replicas on a real Redis"
REDIS_KINDS = ("single", "cluster")


@dataclass(frozen=True)
class Params:
    adapters: tuple[int, ...] = (10_000, 100_000)  # one scale per entry, paired with `replicas`
    replicas: tuple[int, ...] = (100, 1_000)
    requests: tuple[int, ...] = (10_000, 10_000)  # one per scale
    redis: str = "single"  # "single" (one redis-server) or "cluster" (six nodes, three primaries)
    max_loras: int = 4
    max_cpu_loras: int = 16
    alpha: float = 0.3  # S-LoRA popularity exponent
    rate_per_replica: float = 1.0  # simulated requests/s per replica
    sample_every: int = 10  # INFO commandstats around every n-th event of each kind
    seed: int = 0


SMOKE = Params(adapters=(100, 200), replicas=(5, 10), requests=(300, 300))


def scale_label(adapters: int, replicas: int) -> str:
    return f"{adapters:,} adapters / {replicas:,} replicas"


def run_scale(ctx, p: Params, adapters: int, replicas: int, requests: int) -> dict:
    """One simulated deployment on a fresh Redis; -> `PlacementSim.run`'s figures."""
    config = SimConfig(
        adapters=adapters,
        replicas=replicas,
        requests=requests,
        max_loras=p.max_loras,
        max_cpu_loras=p.max_cpu_loras,
        alpha=p.alpha,
        rate_per_replica=p.rate_per_replica,
        sample_every=p.sample_every,
        seed=p.seed,
    )
    directory = ctx.work / f"placement-redis-{p.redis}-{adapters}-{replicas}"
    if p.redis == "cluster":
        server = RedisClusterServer(directory)
        ports = server.primary_ports
    else:
        server = RedisServer(directory, ctx.log(f"placement-redis-{adapters}-{replicas}.log"))
        ports = [server.port]
    counters = RedisCounters(ports)
    try:
        CountingConnection.sent = 0
        sim = PlacementSim(config, server.url, counters, count_trips=p.redis == "single")
        return {"redis": p.redis, "primaries": len(ports), **asyncio.run(sim.run())}
    finally:
        counters.close()
        server.stop()


def run(ctx, p: Params) -> ScenarioResult:
    if p.redis not in REDIS_KINDS:
        raise ValueError(f"redis ({p.redis!r}) must be one of {REDIS_KINDS}")
    if not p.adapters or not len(p.adapters) == len(p.replicas) == len(p.requests):
        raise ValueError(
            f"adapters {p.adapters}, replicas {p.replicas} and requests {p.requests} must pair up, one scale each"
        )
    result = ScenarioResult(NAME, TITLE)
    bar = ctx.progress(len(p.adapters), NAME)
    runs = []
    for adapters, replicas, requests in zip(p.adapters, p.replicas, p.requests):
        runs.append(run_scale(ctx, p, adapters, replicas, requests))
        bar.update(1)
    bar.close()
    labels = [scale_label(r["config"]["adapters"], r["config"]["replicas"]) for r in runs]
    result.notes.append(_what_is_real(p))
    result.tables += [
        _commands_table(runs, labels),
        _latency_table(runs, labels),
        _hits_table(runs, labels),
        _memory_table(runs, labels),
    ]
    result.data = {"params": p.__dict__, "runs": runs}
    shown = ["slot hit", "host hit", "cold load", "load landed", "heartbeat"]
    result.plots.append(
        plots.bars(
            ctx.out / "placement_commands.png",
            [*shown, "per request"],
            {
                label: [_mean(run, op) for op in shown] + [run["per_request"]["commands"]]
                for label, run in zip(labels, runs)
            },
            "Redis commands (scripts' inner commands included)",
            f"Redis commands per operation ({p.redis} Redis)",
        )
    )
    latency_ops = ["picker pick", "manager acquire", "report", "heartbeat"]
    result.plots.append(
        plots.bars(
            ctx.out / "placement_latency.png",
            latency_ops,
            {
                f"{label} {q}": [run["latency"].get(op, {}).get(f"{q}_ms") or 0 for op in latency_ops]
                for label, run in zip(labels, runs)
                for q in ("p50", "p99")
            },
            "milliseconds (wall clock around the real call)",
            "Decision and bookkeeping latency",
        )
    )
    return result


def _mean(run: dict, op: str) -> float:
    return run["ops"].get(op, {}).get("commands_mean") or 0.0


def _what_is_real(p: Params) -> str:
    deployment = "a private six-node Redis Cluster" if p.redis == "cluster" else "a private redis-server"
    return (
        f"Real: {deployment} per scale, the registry (`Registry.register` for every adapter, JOIN, "
        "HEARTBEAT, REPORT, ACQUIRE), the manager's `Membership` and `Placement.acquire` (host-cache "
        "policy) and `choose_replica` (LoadAdapter's affinity choice), `loraserve.routing.resolve`, and the "
        "endpoint picker's `ClusterState` view and `policy.pick`. Simulated: the replicas (no model, no "
        "gRPC; each keeps its slots and host-cache LRU in Python and sends what a real replica's agent "
        "sends: JOIN, HEARTBEAT with load and snapshot, ACQUIRE before a load, REPORT of loaded / "
        "activated / deactivated / evicted), the picker's in-flight counts, and time: an event heap "
        f"in simulated seconds (Poisson arrivals at {p.rate_per_replica} request/s per replica, "
        "durations of 8-511 tokens at 10 ms, loads of 0.2 s, heartbeats every 2 s staggered, the "
        "picker re-reading Redis every 0.1 s); nothing sleeps. Calls run one at a time, so INFO "
        f"commandstats around a call (every {p.sample_every}th event of each kind, summed over the "
        "primaries, INFO itself excluded, commands inside Lua scripts included) is that call's work; "
        "round trips are messages the clients sent (one Redis server only). Latencies are wall clock "
        f"around the real calls on this machine. Requests per scale: {', '.join(map(str, p.requests))}; S-LoRA "
        f"popularity alpha {p.alpha}; every replica has max_loras {p.max_loras}, max_cpu_loras "
        f"{p.max_cpu_loras}."
    )


def _commands_table(runs: list[dict], labels: list[str]) -> Table:
    rows = []
    for op, what in OPS.items():
        cells = []
        for run in runs:
            o = run["ops"].get(op)
            if o is None or o["commands_mean"] is None:
                cells.append("-")
                continue
            trips = f", {o['round_trips_mean']:g} trips" if o["round_trips_mean"] is not None else ""
            cells.append(f"{o['commands_mean']:g} (max {o['commands_max']}{trips}; n={o['count']})")
        rows.append([op, what, *cells])

    def both(key: str) -> list[str]:
        out = []
        for run in runs:
            x = run[key]
            trips = f", {x['round_trips']:g} trips" if run["redis"] == "single" else ""
            out.append(f"{x['commands']:g}{trips}")
        return out

    rows.append(["per request", "all request-driven work above, per request", *both("per_request")])
    rows.append(["+ picker view", "view refreshes amortized per request", *both("per_request_view_refresh")])
    rows.append(
        ["register", "Registry.register, per adapter", *[r["register"]["commands_per_adapter"] for r in runs]]
    )
    rows.append(["join", "Membership.join, per replica", *[r["join"]["commands_per_join"] for r in runs]])
    rows.append(["LoadAdapter choice", "registry.replicas() + choose_replica", *[r["load_decision"]["commands_mean"] for r in runs]])  # fmt: skip
    return Table(
        "Redis commands per operation (mean of sampled calls)", ["operation", "what runs", *labels], rows
    )


def _latency_table(runs: list[dict], labels: list[str]) -> Table:
    names = [
        "picker pick",
        "view refresh",
        "view full read",
        "manager acquire",
        "report",
        "heartbeat",
        "join",
    ]
    rows = []
    for name in names:
        cells = []
        for run in runs:
            lat = run["latency"].get(name, {})
            cells.append(f"{lat.get('p50_ms')} / {lat.get('p99_ms')}" if lat.get("n") else "-")
        rows.append([name, *cells])
    rows.append(
        [
            "LoadAdapter choice",
            *[f"{r['load_decision']['p50_ms']} / {r['load_decision']['p99_ms']}" for r in runs],
        ]
    )
    return Table("Latency p50 / p99 (ms, wall clock around the real call)", ["call", *labels], rows)


def _per_scale(title: str, columns: list[str], runs: list[dict], labels: list[str], cells) -> Table:
    """A table with a row per scale: its label, then `cells(run)`."""
    return Table(title, columns, [[label, *cells(run)] for label, run in zip(labels, runs)])


def _hits_table(runs: list[dict], labels: list[str]) -> Table:
    columns = ["scale", "requests decided", "distinct adapters asked", "slots", "host entries"]
    columns += ["slot hits", "host hits", "joined a load", "cold loads", "hit rate (slot or host)"]

    def cells(run: dict) -> list:
        o, c = run["outcomes"], run["capacity"]
        return [
            f"{run['decided']} / {run['config']['requests']}", c["distinct_adapters_asked"], c["slots"],
            c["host_entries"], o.get("slot hit", 0), o.get("host hit", 0), o.get("joins a load", 0),
            o.get("cold load", 0), run["hit_rate"]["slot_or_host"],
        ]  # fmt: skip

    return _per_scale("Hit rate against capacity", columns, runs, labels, cells)


def _memory_table(runs: list[dict], labels: list[str]) -> Table:
    columns = ["scale", "Redis", "busiest primary's share", "register s", "bytes per adapter"]
    columns += ["of which event stream", "join s", "drive wall s", "simulated s", "anomalies"]

    def cells(run: dict) -> list:
        reg, drive = run["register"], run["drive"]
        anomalies = ", ".join(f"{k}: {v}" for k, v in run["anomalies"].items()) or "none"
        return [
            f"{run['redis']} ({run['primaries']} primaries)", drive["busiest_primary_share"], reg["seconds"],
            reg["memory_bytes_per_adapter"], round(reg["events_stream_bytes"] / run["config"]["adapters"], 1),
            run["join"]["seconds"], drive["wall_s"], drive["simulated_s"], anomalies,
        ]  # fmt: skip

    return _per_scale("Memory in Redis, time, anomalies", columns, runs, labels, cells)
