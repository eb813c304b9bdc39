"""Scenario 8, the front door: three replicas behind Envoy, routed by the endpoint picker, by a
Maglev hash of the adapter alone, or round-robin, on the same skewed trace (at its arrival times,
then all at once for capacity).

For each policy a fresh cluster (Redis, manager, three replicas, the picker when used, Envoy with
`loraserve.front_door`'s configuration for that mode) replays the trace through the door, every
request naming its adapter in the `x-adapter-id` header too, so the hash has its key. Cache
figures are the replicas' own counters (GetEngineInfo `cache_stats`), summed: a cold load is a
host-cache miss (the adapter fetched into host memory), the slot hit rate counts requests whose
adapter was already in an accelerator slot. Last, in the picker's cluster, the door's added
latency side by side: one-token requests for one resident adapter sent in turn straight to its
replica, through a second Envoy (no picker) in front of that replica alone, and through the
picker's door; p50 of each, and the picker's CPU time per request it routed (read from /proc, with
its background refresh) beside the mean time of the pick itself (its decision histogram).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from bench import assets, plots
from bench.client import replay_trace
from bench.metrics import percentile, summarize
from bench.procs import RedisServer, Service, _Child, free_port
from bench.report import Goal, ScenarioResult, Table
from bench.workload import generate, offline_hits, write_trace
from loraserve.front_door import GRPC_CLUSTER, MODES, FrontDoorConfig, envoy_binary, render
from loraserve.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc

NAME = "front-door"
TITLE = "8. Front door: endpoint picker vs Maglev hash vs round-robin over three replicas"
DOORS = ("envoy_alone", "envoy_picker")  # the door-latency arms beside `direct` (see door_latency)
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Params:
    replicas: int = 3  # behind the door, each with its own slots and host cache
    shape: str = "tiny"
    rank: int = 8
    num_adapters: int = 200
    alpha: float = 0.3  # S-LoRA's skewed popularity
    max_loras: int = 4
    max_cpu_loras: int = 16
    num_requests: int = 480
    rate: float = 4.0  # what three CPU replicas on two shared cores keep up with
    cv: float = 1.0
    input_len: tuple[int, ...] = (8, 32)
    output_len: tuple[int, ...] = (2, 8)
    latency_samples: int = 100
    seed: int = 0
    modes: tuple[str, ...] = MODES  # run in this order (the machine's load drifts over a run)


SMOKE = Params(num_adapters=12, num_requests=16, rate=20.0, output_len=(2, 4), latency_samples=4)


class _Picker(_Child):
    def __init__(self, redis_url: str, port: int, metrics_port: int, log):
        args = [
            sys.executable,
            "-m",
            "endpoint_picker",
            "serve",
            "--redis-url",
            redis_url,
            "--cluster",
            "bench",
        ]
        args += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)]
        super().__init__(args + ["--log-level", "WARNING"], log)
        self.address = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        _wait(lambda: _serving(self.address), self, "the endpoint picker")


class _Envoy(_Child):
    def __init__(self, config: FrontDoorConfig, path, log):
        path.write_text(render(config))
        super().__init__(
            [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "error"], log
        )
        self.address = f"127.0.0.1:{config.port}"
        self.admin = f"http://127.0.0.1:{config.admin_port}"
        _wait(lambda: self.healthy() == len(config.replicas), self, "envoy to see every replica healthy")

    def healthy(self) -> int:
        try:
            with urllib.request.urlopen(self.admin + "/clusters", timeout=1) as response:
                lines = response.read().decode().splitlines()
        except OSError:
            return 0
        return sum(1 for line in lines if line.startswith(GRPC_CLUSTER + "::") and line.endswith("::healthy"))


def _serving(address: str) -> bool:
    from loraserve.healthcheck import check

    try:
        return check(address, timeout_s=1.0) == "SERVING"
    except grpc.RpcError:
        return False


def _wait(predicate, child: _Child, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not predicate():
        child.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _cache_stats(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        info = inference_pb2_grpc.InferenceServiceStub(channel).GetEngineInfo(
            inference_pb2.GetEngineInfoRequest(), timeout=30
        )
    s = info.cache_stats
    return {k: getattr(s, k) for k in ("host_hits", "host_misses", "slot_hits", "slot_misses")}


def _one_token(stub, adapter_id: str) -> float:
    request = inference_pb2.GenerateRequest(
        adapter_id=adapter_id,
        token_ids=inference_pb2.TokenIds(ids=[5, 6, 7]),
        params=inference_pb2.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
    )
    start = time.perf_counter()
    list(stub.Generate(request, timeout=60))
    return time.perf_counter() - start


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _decision_totals(picker: _Picker) -> tuple[float, int]:
    """(sum of seconds, count) of the picker's decision histogram."""
    with urllib.request.urlopen(picker.metrics_url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    values = dict(
        line.rsplit(" ", 1) for line in lines if line.startswith("loraserve:picker_decision_seconds_")
    )
    return float(values["loraserve:picker_decision_seconds_sum"]), int(
        float(values["loraserve:picker_decision_seconds_count"])
    )


def _holder(replicas: list[Service], adapter_id: str) -> Service:
    """The replica that holds `adapter_id` (ListResidentAdapters)."""
    for r in replicas:
        with grpc.insecure_channel(r.address) as channel:
            listed = inference_pb2_grpc.InferenceServiceStub(channel).ListResidentAdapters(
                inference_pb2.ListResidentAdaptersRequest(), timeout=30
            )
        if any(a.adapter_id == adapter_id for a in listed.adapters):
            return r
    raise RuntimeError(f"no replica holds {adapter_id} after a request for it")


def door_latency(arms: dict[str, str], picker: _Picker, adapter_id: str, samples: int) -> dict:
    """p50 of one-token requests to each arm (`direct` and the doors, all reaching the same
    replica), taken in turn so all arms see the same machine; and the picker's CPU per request it
    routed beside the mean time of its pick."""
    channels = {name: grpc.insecure_channel(address) for name, address in arms.items()}
    try:
        stubs = {name: inference_pb2_grpc.InferenceServiceStub(c) for name, c in channels.items()}
        for stub in stubs.values():
            _one_token(stub, adapter_id)
        times: dict[str, list[float]] = {name: [] for name in stubs}
        cpu, (decided_s, decided) = _cpu_s(picker.proc.pid), _decision_totals(picker)
        for _ in range(samples):
            for name, stub in stubs.items():
                times[name].append(_one_token(stub, adapter_id))
        cpu = _cpu_s(picker.proc.pid) - cpu
        decided_s, decided = (a - b for a, b in zip(_decision_totals(picker), (decided_s, decided)))
    finally:
        for channel in channels.values():
            channel.close()
    direct = percentile(times["direct"], 50)
    out = {"direct_p50_s": direct, "samples": samples}
    for name in DOORS:
        p50 = percentile(times[name], 50)
        out[name] = {"door_p50_s": p50, "added_p50_ms": (p50 - direct) * 1000}
    out["picker_cpu_ms_per_request"] = cpu / samples * 1000
    out["pick_mean_us"] = decided_s / max(decided, 1) * 1e6
    return out


def measure(ctx, p: Params, mode: str, model_dir, paths, trace) -> dict:
    engine = dict(
        max_loras=p.max_loras,
        max_cpu_loras=p.max_cpu_loras,
        max_lora_rank=p.rank,
        device="cpu",
        dtype="float32",
        kv_cache_bytes=16 << 20,
    )
    root = ctx.work / f"front-door-{mode}"
    with contextlib.ExitStack() as stack:
        redis_srv = stack.enter_context(RedisServer(root / "redis", ctx.log(f"front-door-{mode}-redis.log")))
        manager = stack.enter_context(
            Service.manager(
                redis_srv.url,
                next(iter(paths.values())).parent,
                root / "store",
                ctx.log(f"front-door-{mode}-manager.log"),
                extra=[
                    "--model-config",
                    str(model_dir),
                    "--max-lora-rank",
                    str(p.rank),
                ],
            )
        )
        with grpc.insecure_channel(manager.address) as channel:
            stub = adapter_pb2_grpc.AdapterServiceStub(channel)
            for name, path in paths.items():
                stub.RegisterAdapter(
                    adapter_pb2.RegisterAdapterRequest(adapter_id=name, path=str(path)), timeout=60
                )
        replicas = [
            stack.enter_context(
                Service.inference(
                    model_dir,
                    engine,
                    ctx.log(f"front-door-{mode}-replica-{i}.log"),
                    adapter_manager=manager.address,
                    extra=["--adapter-cache-dir", str(root / f"cache-{i}")],
                )
            )
            for i in range(p.replicas)
        ]
        picker_port, picker = free_port(), None
        if mode == "picker":
            picker = stack.enter_context(
                _Picker(redis_srv.url, picker_port, free_port(), ctx.log("front-door-picker.log"))
            )

        def door(door_mode: str, name: str, behind: list[Service]) -> _Envoy:
            config = FrontDoorConfig(
                host="127.0.0.1",
                port=free_port(),
                admin_port=free_port(),
                replicas=tuple(r.address for r in behind),
                picker=f"127.0.0.1:{picker_port}",
                mode=door_mode,
                health_interval_s=1.0,
            )
            return stack.enter_context(
                _Envoy(config, root / f"{name}.yaml", ctx.log(f"front-door-{name}.log"))
            )

        envoy = door(mode, f"{mode}-envoy", replicas)
        before = [_cache_stats(r.address) for r in replicas]
        results = replay_trace(envoy.address, trace, adapter_header=True)
        after = [_cache_stats(r.address) for r in replicas]
        delta = {k: sum(a[k] - b[k] for a, b in zip(after, before)) for k in after[0]}
        out = {"summary": summarize(results), "cache": delta}
        slot = delta["slot_hits"] + delta["slot_misses"]
        out["slot_hit_rate"] = delta["slot_hits"] / slot if slot else float("nan")
        out["cold_loads"] = delta["host_misses"]
        # Capacity: the same requests all at once (vLLM's request rate "inf"), on the caches the
        # open-loop replay left; the open-loop trace's throughput is only its offered rate.
        flood = [replace(r, arrival_s=0.0) for r in trace]
        out["saturated"] = summarize(replay_trace(envoy.address, flood, adapter_header=True))
        if picker is not None:  # beside it: straight to the replica, and Envoy alone in front of it
            adapter_id = trace[0].adapter_id
            with grpc.insecure_channel(envoy.address) as channel:  # loads it where the picker sends it
                _one_token(inference_pb2_grpc.InferenceServiceStub(channel), adapter_id)
            holder = _holder(replicas, adapter_id)
            alone = door("maglev", "picker-envoy-alone", [holder])
            arms = {"direct": holder.address, "envoy_alone": alone.address, "envoy_picker": envoy.address}
            out["door_latency"] = door_latency(arms, picker, adapter_id, p.latency_samples)
        return out


def run(ctx, p: Params) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    model_dir = assets.model(ctx.work, p.shape)
    paths = assets.adapters(ctx.work, model_dir, p.num_adapters, p.rank, target_modules=("q_proj", "v_proj"))
    spec = assets.workload(p, p.num_adapters, p.alpha)
    trace = generate(spec)
    write_trace(ctx.out / "traces" / "front-door.jsonl", spec, trace)
    unknown = set(p.modes) - set(MODES)
    if unknown or not set(MODES) <= set(p.modes):
        raise ValueError(f"modes ({p.modes!r}) must list each of {', '.join(MODES)}")
    bar = ctx.progress(len(p.modes), NAME)
    runs = {}
    for mode in p.modes:
        runs[mode] = measure(ctx, p, mode, model_dir, paths, trace)
        bar.update(1)
    bar.close()
    rows = []
    for mode, m in runs.items():
        s = m["summary"]
        rows.append(
            [
                mode,
                m["slot_hit_rate"],
                m["cold_loads"],
                s["tokens_per_s"],
                s["ttft_p50_s"],
                s["ttft_p99_s"],
                s["errors"],
                m["saturated"]["tokens_per_s"],
                m["saturated"]["errors"],
            ]
        )
    columns = [
        "routing",
        "slot hit rate",
        "cold loads",
        "tok/s",
        "TTFT p50 s",
        "TTFT p99 s",
        "errors",
        "tok/s, all at once",
        "errors, all at once",
    ]
    result.tables.append(Table("Same trace, three routings", columns, rows))
    lat = runs["picker"]["door_latency"]
    labels = {"envoy_alone": "Envoy alone (no picker)", "envoy_picker": "Envoy + endpoint picker"}
    result.tables.append(
        Table(
            f"Door-added latency, side by side in the picker's cluster ({lat['samples']} one-token "
            "requests each for one resident adapter, taken in turn)",
            ["door", "direct p50 s", "through the door p50 s", "added p50 ms"],
            [[labels[d], lat["direct_p50_s"], lat[d]["door_p50_s"], lat[d]["added_p50_ms"]] for d in DOORS],
        )
    )
    result.notes.append(
        f"The picker's CPU per request it routed: {lat['picker_cpu_ms_per_request']:.2f} ms (its "
        f"background refresh included); the pick itself: {lat['pick_mean_us']:.0f} us on average."
    )
    named = [r.adapter_id for r in trace if r.adapter_id]
    slots, host = p.replicas * p.max_loras, p.replicas * p.max_cpu_loras
    slot_bound = offline_hits(named, slots) / max(len(named), 1)
    load_floor = len(named) - offline_hits(named, host)
    result.tables.append(
        Table(
            "What any routing could reach on this trace (Belady's optimal offline cache of every slot, "
            "or every host-cache entry, of the replicas together)",
            [
                "adapters asked for",
                "slot hit rate at most",
                "cold loads at least",
                "round-robin's cold loads x 1/3",
            ],
            [[len(set(named)), slot_bound, load_floor, runs["round_robin"]["cold_loads"] / 3]],
        )
    )
    rr, pk = runs["round_robin"], runs["picker"]
    result.goals += [
        Goal("cold loads, picker / round-robin", pk["cold_loads"] / max(rr["cold_loads"], 1), 1 / 3, False),
        Goal("slot hit rate with the picker", pk["slot_hit_rate"], 0.9),
        Goal(
            "throughput with every request at once, picker / round-robin",
            pk["saturated"]["tokens_per_s"] / max(rr["saturated"]["tokens_per_s"], 1e-9),
            1.0,
        ),
        Goal("door-added latency p50 (ms)", lat["envoy_picker"]["added_p50_ms"], 2.0, False),
    ]
    result.notes.append(
        f"{p.replicas} replicas (CPU, float32, `{p.shape}` model, max_loras {p.max_loras}, max_cpu_loras "
        f"{p.max_cpu_loras}), {p.num_adapters} rank-{p.rank} adapters registered with one manager; "
        f"{p.num_requests} requests at {p.rate} req/s (cv {p.cv}), S-LoRA popularity alpha {p.alpha}, input "
        f"{p.input_len}, output {p.output_len} tokens, seed {p.seed} (`traces/front-door.jsonl`). Each routing "
        "gets a fresh cluster; all replicas, Envoy, the picker and the client share this machine's cores. "
        "The open-loop replay's tok/s is the offered rate whatever the routing; capacity is the second "
        "replay, the same requests sent all at once right after it (tok/s over its makespan), whose "
        "ratio is the throughput goal."
    )
    result.data = {"params": p.__dict__, "runs": runs}
    result.plots.append(
        plots.bars(
            ctx.out / "front_door.png",
            list(MODES),
            {
                "slot hit rate": [runs[m]["slot_hit_rate"] for m in MODES],
                "cold loads / requests": [runs[m]["cold_loads"] / p.num_requests for m in MODES],
            },
            "fraction",
            "Front door routing on one skewed trace",
        )
    )
    return result
