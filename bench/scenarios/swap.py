"""Scenario 4, adapter swap cost: cold and warm loads against raw reads and copies of the same bytes.

Per adapter, interleaved, each timed on its own:
  - raw read: the adapter's weights file read into memory and parsed into tensors,
    `safetensors.torch.load(path.read_bytes())` (page cache warm: the file was just written, and
    without root there is no dropping caches; `load_file` would only map the file, not read it);
  - raw copy: `copy_` of each of those tensors into preallocated tensors of the same shapes;
  - engine cold (disk -> host -> slot): `LLMEngine.load_adapter(id, to_slot=True)` in this process,
    an adapter it has never loaded;
  - engine warm (host -> slot): `load_adapter(to_slot=True)` of an adapter in host memory whose
    slot was taken by the previous load (one slot, `max_loras = 1`);
  - service cold (manager store -> host -> slot): `InferenceService.LoadAdapter(to_slot)` on a
    replica started with `--adapter-manager`, for an adapter registered with the manager and never
    loaded there (acquire, FetchAdapterWeights stream, sha256 check, load, slot copy);
  - service warm: the same RPC for an adapter in the replica's host memory but not in its slot;
  - RPC floor: `ListResidentAdapters` on the same replica (an engine-thread round trip).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import torch
from safetensors.torch import load

from bench import assets, plots
from bench.metrics import percentile
from bench.procs import RedisServer, Service
from bench.report import Goal, ScenarioResult, Table
from inference_svc.config import EngineConfig
from inference_svc.engine import LLMEngine
from loraserve.peft_format import WEIGHTS_FILE
from loraserve.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc

NAME = "swap"
TITLE = "4. Adapter swap cost: cold and warm loads vs raw read and copy"
RPC_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Params:
    shape: str = "2048"
    vocab_size: int = 258  # the vocabulary does not change adapter size; a small one loads faster
    rank: int = 16
    adapters: int = 16
    managed: bool = True  # also measure the service path through the adapter manager


SMOKE = Params(shape="tiny", rank=4, adapters=3)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_copy_s(state: dict[str, torch.Tensor]) -> float:
    targets = {k: torch.empty_like(v) for k, v in state.items()}

    def copy() -> None:
        for k, v in state.items():
            targets[k].copy_(v)

    return timed(copy)


def engine_settings(p: Params) -> dict:
    """The engine of both paths: one slot, a host cache large enough for every adapter."""
    return dict(
        max_loras=1,
        max_cpu_loras=p.adapters + 1,
        max_lora_rank=p.rank,
        device="cpu",
        dtype="float32",
        kv_cache_bytes=16 << 20,
    )


def run(ctx, p: Params) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    model_dir = assets.model(ctx.work, p.shape, vocab_size=p.vocab_size)
    paths = assets.adapters(ctx.work, model_dir, p.adapters + 1, p.rank, prefix="swap-")
    names = list(paths)  # swap-0 is loaded up front, as the first warm load's partner
    size = (paths[names[0]] / WEIGHTS_FILE).stat().st_size
    config = EngineConfig(**engine_settings(p))
    samples: dict[str, list[float]] = {
        k: [] for k in ("raw read", "raw copy", "engine cold", "engine warm", "service cold", "service warm")
    }
    samples["RPC floor"] = []
    bar = ctx.progress(2 * p.adapters if p.managed else p.adapters, NAME)
    engine_samples(model_dir, config, paths, samples, bar)
    if p.managed:
        service_samples(ctx, p, model_dir, paths, samples, bar)
    bar.close()
    med = {k: percentile(v, 50) for k, v in samples.items()}
    result.notes.append(
        f"{p.adapters} distinct rank-{p.rank} adapters on all 7 projections of a hidden "
        f"{assets.SHAPES[p.shape]['hidden_size']}, {assets.SHAPES[p.shape]['num_hidden_layers']}-layer "
        f"model: {size / 2**20:.2f} MiB of float32 weights each. One slot (max_loras 1), host cache large "
        "enough for all (no host evictions). Times in milliseconds."
    )
    rows = []
    for key, values in samples.items():
        if values:
            bytes_per_s = size / med[key] if key != "RPC floor" else float("nan")
            rows.append(
                [key, len(values), 1000 * med[key], 1000 * percentile(values, 90), bytes_per_s / 2**30]
            )
    result.tables.append(Table("Load latency", ["path", "n", "p50 ms", "p90 ms", "GiB/s at p50"], rows))
    ratios = {
        "engine cold / raw read": med["engine cold"] / med["raw read"],
        "engine warm / raw copy": med["engine warm"] / med["raw copy"],
    }
    if p.managed:
        ratios["service cold / raw read"] = med["service cold"] / med["raw read"]
        ratios["service warm / raw copy"] = med["service warm"] / med["raw copy"]
    result.tables.append(Table("Ratios of medians", ["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    if p.managed:
        result.goals.append(
            Goal(
                "cold load (manager store -> host -> slot) / raw safetensors read",
                ratios["service cold / raw read"],
                2.0,
                False,
            )
        )
    result.goals.append(
        Goal(
            "cold load (disk -> host -> slot, engine) / raw safetensors read",
            ratios["engine cold / raw read"],
            2.0,
            False,
        )
    )
    result.goals.append(
        Goal("warm load (host -> slot, engine) / raw copy", ratios["engine warm / raw copy"], 2.0, False)
    )
    result.data = {"params": p.__dict__, "adapter_bytes": size, "samples_s": samples, "ratios": ratios}
    shown = [k for k, v in samples.items() if v]
    result.plots.append(
        plots.bars(
            ctx.out / "swap_latency.png",
            shown,
            {
                "p50": [1000 * med[k] for k in shown],
                "p90": [1000 * percentile(samples[k], 90) for k in shown],
            },
            "milliseconds",
            f"Load latency, {size / 2**20:.1f} MiB adapter",
        )
    )
    return result


def engine_samples(model_dir, config: EngineConfig, paths, samples, bar) -> None:
    """Raw read and copy, and the engine's cold and warm loads, interleaved per adapter."""
    names = list(paths)
    engine = LLMEngine(model_dir, config)
    for name, path in paths.items():
        engine.register_adapter(name, path)
    engine.load_adapter(names[0], to_slot=True)
    for prev, name in zip(names, names[1:]):
        weights = paths[name] / WEIGHTS_FILE
        start = time.perf_counter()
        state = load(weights.read_bytes())
        samples["raw read"].append(time.perf_counter() - start)
        samples["raw copy"].append(raw_copy_s(state))
        samples["engine cold"].append(timed(lambda n=name: engine.load_adapter(n, to_slot=True)))
        samples["engine warm"].append(timed(lambda n=prev: engine.load_adapter(n, to_slot=True)))
        bar.update(1)


def service_samples(ctx, p: Params, model_dir, paths, samples, bar) -> None:
    """The cold and warm service paths, through a real manager, Redis and replica."""
    names = list(paths)
    root = paths[names[0]].parent
    manager_flags = ["--model-config", str(model_dir), "--max-lora-rank", str(p.rank)]
    with (
        RedisServer(ctx.work / "swap-redis", ctx.log("swap-redis.log")) as redis_srv,
        Service.manager(
            redis_srv.url, root, ctx.work / "swap-store", ctx.log("swap-manager.log"), manager_flags
        ) as manager,
        Service.inference(
            model_dir, engine_settings(p), ctx.log("swap-inference.log"), adapter_manager=manager.address
        ) as replica,
        grpc.insecure_channel(manager.address) as manager_channel,
        grpc.insecure_channel(replica.address) as replica_channel,
    ):
        registry = adapter_pb2_grpc.AdapterServiceStub(manager_channel)
        stub = inference_pb2_grpc.InferenceServiceStub(replica_channel)
        for name, path in paths.items():
            registry.RegisterAdapter(
                adapter_pb2.RegisterAdapterRequest(adapter_id=name, path=str(path)), timeout=RPC_TIMEOUT_S
            )

        def load(name: str) -> None:
            stub.LoadAdapter(
                inference_pb2.LoadAdapterRequest(adapter_id=name, to_slot=True), timeout=RPC_TIMEOUT_S
            )

        load(names[0])
        for prev, name in zip(names, names[1:]):
            samples["service cold"].append(timed(lambda n=name: load(n)))
            samples["service warm"].append(timed(lambda n=prev: load(n)))
            samples["RPC floor"].append(
                timed(
                    lambda: stub.ListResidentAdapters(
                        inference_pb2.ListResidentAdaptersRequest(), timeout=RPC_TIMEOUT_S
                    )
                )
            )
            bar.update(1)
