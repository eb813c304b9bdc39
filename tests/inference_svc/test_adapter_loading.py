"""Adapter reads run on the loader thread, never inside a step; slots are rewritten in place."""

import asyncio
import contextlib
import dataclasses
import shutil
import threading

import torch
from safetensors.torch import load_file, save_file

from inference_svc import errors
from inference_svc.adapter_cache import HOST_BY_MANAGER
from inference_svc.async_engine import AsyncEngine
from inference_svc.demo_model import write_demo_adapter
from inference_svc.sampling import SamplingParams
from loraserve import errors as format_errors

from helpers import run_to_completion, tiny_engine, tokens_of

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
TIMEOUT_S = 30


def gate_loader(engine) -> threading.Event:
    """Test-only fault: occupy the loader's one worker with a task that waits on the returned
    event, so every read asked for afterwards stays pending until the test sets it. (A real read
    of a tiny adapter takes milliseconds; this makes "the read is slow" deterministic.)"""
    gate = threading.Event()
    engine.adapters.loader.executor.submit(gate.wait, TIMEOUT_S)
    return gate


def solo_tokens(model_dir, adapter_root, adapter, ids, params=GREEDY):
    engine = tiny_engine(model_dir, adapter_root, 3, max_loras=1, max_cpu_loras=1)
    engine.add_request("solo", ids, params, adapter)
    return tokens_of(run_to_completion(engine)["solo"])


def test_add_request_starts_the_read_before_any_step(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 2)
    engine.add_request("r", [1, 2, 3], GREEDY, "a1")
    read = engine.adapters.loading["a1"]  # in flight (or done) with no step run
    read.result(timeout=TIMEOUT_S)
    assert engine.scheduler.steps == 0 and "a1" not in engine.adapters.host
    engine.add_request("again", [1, 2], GREEDY, "a1")
    assert engine.adapters.loading["a1"] is read  # single flight
    engine.step()  # installs the finished read, then admits both requests in this step
    assert "a1" in engine.adapters.host and not engine.adapters.loading
    assert {s.status for s in engine.sequences.values()} == {"running"}
    assert engine.adapters.stats["host_misses"] == 1


def test_a_slow_read_does_not_stall_running_requests(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 2)
    engine.load_adapter("a0")
    engine.add_request("base", [4, 5, 6], LONG)
    engine.add_request("hot", [7, 8], LONG, "a0")
    engine.step()
    gate = gate_loader(engine)
    engine.add_request("cold", [9, 10, 11], GREEDY, "a1")
    for _ in range(5):
        produced = {out.request_id for out in engine.step() if out.token is not None}
        assert produced == {"base", "hot"}  # they decode while a1's read is pending
        record = engine.step_history[-1]
        assert record.num_seqs == 2 and record.adapters == {None, "a0"}
        assert engine.sequences["cold"].status == "waiting" and not engine.adapters.loading["a1"].done()
    gate.set()
    results = run_to_completion(engine)
    assert tokens_of(results["cold"]) == solo_tokens(model_dir, adapter_root, "a1", [9, 10, 11])
    assert len(tokens_of(results["hot"])) == LONG.max_tokens - 6  # one token per step throughout


def test_a_failed_read_fails_only_the_requests_waiting_for_it(model_dir, adapter_root, tmp_path):
    engine = tiny_engine(model_dir, adapter_root, 2)
    broken = shutil.copytree(adapter_root / "a1", tmp_path / "broken")
    engine.register_adapter("broken", broken)
    weights = broken / "adapter_model.safetensors"  # corrupted after registration: same size, a NaN
    tensors = load_file(weights)
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, weights)
    engine.add_request("base", [1, 2, 3], GREEDY)
    engine.add_request("good", [1, 2, 3], GREEDY, "a0")
    engine.add_request("bad-1", [1, 2, 3], GREEDY, "broken")
    engine.add_request("bad-2", [4, 5], GREEDY, "broken")
    results = run_to_completion(engine)
    for rid in ("bad-1", "bad-2"):
        assert results[rid][-1].finish_reason == "error"
        assert isinstance(results[rid][-1].error, format_errors.NonFiniteWeights)
    assert tokens_of(results["good"]) == solo_tokens(model_dir, adapter_root, "a0", [1, 2, 3])
    assert results["base"][-1].finish_reason == "length"
    assert "broken" not in engine.adapters.host and not engine.adapters.failed_loads


def test_a_read_with_no_room_in_the_host_cache_fails_its_requests(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 3, max_loras=2, max_cpu_loras=2)
    engine.load_adapter("a0", pin=True)
    engine.load_adapter("a1", pin=True)
    engine.add_request("hot", [1, 2], GREEDY, "a0")
    engine.add_request("cold", [1, 2], GREEDY, "a2")  # read, then nothing may be evicted for it
    results = run_to_completion(engine)
    assert isinstance(results["cold"][-1].error, errors.NoEvictableSlot)
    assert "max_cpu_loras" in str(results["cold"][-1].error)
    assert results["hot"][-1].finish_reason == "length"
    assert set(engine.adapters.host) == {"a0", "a1"}


def test_set_slot_clears_only_what_the_previous_adapter_left(model_dir, tmp_path):
    engine = tiny_engine(model_dir, tmp_path, max_loras=2, max_lora_rank=16)
    model = engine.model_config
    engine.register_adapter("big", write_demo_adapter(tmp_path / "big", model, rank=16, seed=1))
    small_dir = write_demo_adapter(
        tmp_path / "small", model, rank=8, target_modules=("q_proj", "v_proj"), seed=2
    )
    engine.register_adapter("small", small_dir)
    engine.load_adapter("big")
    engine.load_adapter("small")
    big, small = engine.adapters.host["big"], engine.adapters.host["small"]
    # a real adapter's weights on one layer only: the other layer must be cleared too
    one_layer = dataclasses.replace(small, weights={k: v for k, v in small.weights.items() if k[0] == 0})
    lora = engine.lora

    def slot(i):
        return [t[i].clone() for layer in (*lora.a, *lora.b) for t in layer.values()]

    for adapter in (small, one_layer, big):
        lora.set_slot(0, big)
        lora.set_slot(0, adapter)  # over a rank-16 adapter on every module
        lora.reset_slot(1)
        lora.set_slot(1, adapter)  # a zeroed slot + copy
        assert all(torch.equal(x, y) for x, y in zip(slot(0), slot(1)))


def test_async_engine_reads_off_its_thread_and_sleeps_until_a_read_is_done(model_dir, adapter_root):
    expected = solo_tokens(model_dir, adapter_root, "a1", [1, 2, 3])

    async def scenario():
        built = []
        served = AsyncEngine(lambda: built.append(tiny_engine(model_dir, adapter_root, 2)) or built[0])
        await served.start()
        gate = gate_loader(built[0])

        async def generate():
            tokens = []
            async with contextlib.aclosing(served.generate([1, 2, 3], GREEDY, "a1")) as stream:
                async for batch in stream:
                    tokens += [out.token.token_id for out in batch]
            return tokens

        load = asyncio.ensure_future(served.load_adapter("a0", to_slot=True))
        request = asyncio.ensure_future(generate())
        await asyncio.sleep(0.1)
        # Both reads are pending: the engine thread still answers commands at once, and it does
        # not step while it waits for the reads (a poll would step every few milliseconds).
        steps = await served.call(lambda engine: engine.scheduler.steps)
        await asyncio.sleep(0.3)
        assert await served.call(lambda engine: engine.scheduler.steps) - steps <= 2
        assert not load.done() and not request.done()
        gate.set()
        resident = await asyncio.wait_for(load, TIMEOUT_S)
        assert resident.adapter_id == "a0" and resident.tier == "slot"
        assert await asyncio.wait_for(request, TIMEOUT_S) == expected
        await served.stop()

    asyncio.run(scenario())


def test_a_managed_cache_never_chooses_host_victims_itself(model_dir, adapter_root):
    """HOST_BY_MANAGER: a finished read that finds the host cache full waits (one needs_room
    event) until the agent evicts the manager's victims; a refusal fails its requests."""
    events = []
    engine = tiny_engine(
        model_dir, adapter_root, 3, events.append, HOST_BY_MANAGER, max_loras=1, max_cpu_loras=2
    )
    engine.load_adapter("a0")
    engine.load_adapter("a1")
    engine.add_request("r", [1, 2, 3], GREEDY, "a2")
    for _ in range(3):
        engine.adapters.wait_for_load(TIMEOUT_S)
        assert engine.step() == []
    held = {r.adapter_id for r in engine.list_resident_adapters()}
    assert held == {"a0", "a1"} and engine.info()["occupancy"]["waiting"] == 1
    assert [(e.kind, e.adapter_id) for e in events if e.kind in ("needs_room", "evicted")] == [
        ("needs_room", "a2")
    ]
    try:
        engine.load_adapter("a2")
        raise AssertionError("a direct load into a full managed cache must not evict")
    except errors.HostCacheFull:
        pass

    engine.evict_adapter("a0")  # the victim the manager named
    engine.adapters.room_done("a2")
    assert tokens_of(run_to_completion(engine)["r"]) == solo_tokens(model_dir, adapter_root, "a2", [1, 2, 3])
    assert {r.adapter_id for r in engine.list_resident_adapters()} == {"a1", "a2"}

    engine.add_request("refused", [4, 5], GREEDY, "a0")
    engine.adapters.wait_for_load(TIMEOUT_S)
    assert engine.step() == []
    engine.adapters.room_done("a0", errors.NoEvictableSlot("every entry is pinned"))
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "error" and isinstance(out.error, errors.NoEvictableSlot)
    assert {r.adapter_id for r in engine.list_resident_adapters()} == {"a1", "a2"}
