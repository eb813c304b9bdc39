"""Continuous batching under the slot, sequence and KV limits; host-cache and slot residency."""

import pytest
import torch

from inference_svc import errors
from inference_svc.forward_batch import SequenceChunk
from inference_svc.kv_cache import BlockTable
from inference_svc.sampling import SamplingParams

from helpers import run_to_completion, tiny_engine, tokens_of

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def prompt(i):
    return [(13 * i + j) % 250 + 1 for j in range(3 + i % 5)]


def solo_tokens(model_dir, adapter_root, adapter, ids, params=GREEDY):
    engine = tiny_engine(model_dir, adapter_root, 8, max_loras=1, max_cpu_loras=1)
    engine.add_request("solo", ids, params, adapter)
    return tokens_of(run_to_completion(engine)["solo"])


def test_many_adapters_share_few_slots_and_match_solo_runs(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 8, max_loras=2, max_cpu_loras=4)
    requests = {f"r{i}": (prompt(i), [None, *[f"a{j}" for j in range(8)]][i % 9]) for i in range(18)}
    for rid, (ids, adapter) in requests.items():
        engine.add_request(rid, ids, GREEDY, adapter)
    slots_per_step = []

    def no_slot_serves_two_adapters(engine):
        record = engine.step_history[-1]
        slot_of = {r.adapter_id: r.slot for r in engine.list_resident_adapters()}
        used = [slot_of.get(a) for a in record.adapters - {None}]  # the slot each adapter ran in
        assert None not in used and len(set(used)) == len(used), (record, slot_of)
        assert set(used) == record.slots
        slots_per_step.append(len(used))

    results = run_to_completion(engine, after_step=no_slot_serves_two_adapters)
    assert max(slots_per_step) == 2  # batches really mixed adapters
    for rid, (ids, adapter) in requests.items():
        assert tokens_of(results[rid]) == solo_tokens(model_dir, adapter_root, adapter, ids), rid
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine.adapters.refcount == {}


def test_waiting_adapter_is_not_starved_by_a_stream_of_resident_ones(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 2, max_loras=1, max_cpu_loras=2)
    for adapter in ("a0", "a1"):  # both hot: steps count slot waits only, not a read's wall time
        engine.load_adapter(adapter)
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request("a-0", [1, 2], short, "a0")
    engine.add_request("starving", [3, 4], short, "a1")
    admitted_at = None
    for step in range(200):
        engine.add_request(f"a-{step + 1}", [1, 2], short, "a0")  # a0 always has fresh work
        engine.step()
        seq = engine.sequences.get("starving")
        if seq is None or seq.status != "waiting":
            admitted_at = step
            break
    assert admitted_at is not None, "a1's request never got the slot"
    assert admitted_at <= engine.scheduler.aging_limit + 2 * short.max_tokens + 2


def test_kv_pressure_preempts_and_recomputes_without_changing_results(model_dir, adapter_root):
    # 10 blocks of 4 tokens: not enough for 6 sequences of up to 7 + 6 tokens at once
    engine = tiny_engine(model_dir, adapter_root, 2, kv_cache_bytes=10 * 4 * 2 * 2 * 2 * 16 * 4)
    assert engine.kv.num_blocks == 10
    for adapter in ("a0", "a1"):  # read before stepping: the schedule must not depend on read timing
        engine.load_adapter(adapter)
    requests = {f"r{i}": (prompt(i), [None, "a0", "a1"][i % 3]) for i in range(6)}
    for rid, (ids, adapter) in requests.items():
        engine.add_request(rid, ids, GREEDY, adapter)
    results = run_to_completion(engine)
    assert engine.step_history[-1].preemptions_total > 0  # KV really ran out
    for rid, (ids, adapter) in requests.items():
        assert tokens_of(results[rid]) == solo_tokens(model_dir, adapter_root, adapter, ids), rid
    assert engine.kv.num_free_blocks == 10


def test_abort_frees_kv_blocks_and_slot_reference_at_once(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 2)
    for adapter in ("a0", "a1"):  # read before the steps counted below
        engine.load_adapter(adapter)
    start = engine.kv.num_free_blocks
    for i in range(4):
        engine.add_request(f"r{i}", prompt(i), SamplingParams(max_tokens=50, temperature=0), f"a{i % 2}")
    engine.step()
    engine.step()
    assert engine.kv.num_free_blocks < start and engine.adapters.refcount
    for i in range(4):
        assert engine.abort_request(f"r{i}")
    assert engine.kv.num_free_blocks == start
    assert engine.adapters.refcount == {}
    assert not engine.abort_request("r0")  # already gone


def test_request_validation_names_the_field(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 1)
    cases = [
        (SamplingParams(max_tokens=0), [1], None, "max_tokens"),
        (SamplingParams(temperature=-1), [1], None, "temperature"),
        (SamplingParams(top_p=0), [1], None, "top_p"),
        (SamplingParams(top_k=-2), [1], None, "top_k"),
        (SamplingParams(logprobs=99), [1], None, "logprobs"),
        (SamplingParams(stop_token_ids=(999,)), [1], None, "stop_token_ids"),
        (SamplingParams(), [], None, "prompt"),
        (SamplingParams(), [1, 9999], None, "token_ids"),
        (SamplingParams(max_tokens=10**6), [1], None, "max_tokens"),
    ]
    for params, ids, adapter, field in cases:
        with pytest.raises(errors.InvalidRequest) as err:
            engine.add_request("x", ids, params, adapter)
        assert err.value.field == field
    with pytest.raises(errors.AdapterNotFound):
        engine.add_request("x", [1], SamplingParams(), "nope")
    assert not engine.has_unfinished_requests()


def test_queue_limit(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 0, max_queue_len=2)
    engine.add_request("a", [1], SamplingParams())
    engine.add_request("b", [1], SamplingParams())
    with pytest.raises(errors.QueueFull):
        engine.add_request("c", [1], SamplingParams())
    with pytest.raises(errors.RequestAlreadyExists):
        engine.add_request("a", [1], SamplingParams())


def test_host_cache_is_lru_with_pins(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 5, max_loras=1, max_cpu_loras=3)
    for name in ["a0", "a1", "a2", "a3"]:
        engine.load_adapter(name)
    assert {r.adapter_id for r in engine.list_resident_adapters()} == {"a1", "a2", "a3"}  # a0 was LRU
    engine.load_adapter("a1", pin=True)
    for name in ["a4", "a0", "a2"]:
        engine.load_adapter(name)
    resident = {r.adapter_id: r for r in engine.list_resident_adapters()}
    assert set(resident) == {"a1", "a0", "a2"} and resident["a1"].pinned
    with pytest.raises(errors.AdapterInUse):
        engine.evict_adapter("a1")
    engine.load_adapter("a0", pin=True)
    engine.load_adapter("a2", pin=True)
    with pytest.raises(errors.NoEvictableSlot):
        engine.load_adapter("a3")
    assert {r.adapter_id for r in engine.list_resident_adapters()} == {"a0", "a1", "a2"}
    engine.adapters.unpin("a2")
    assert engine.evict_adapter("a2") and not engine.evict_adapter("a2")  # idempotent


def test_slot_tier_is_lru_and_busy_slots_are_never_taken(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 3, max_loras=2, max_cpu_loras=3)
    engine.load_adapter("a0")  # read before the step below
    engine.add_request("long", [1, 2], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), "a0")
    engine.step()
    slot_a0 = engine.adapters.slot_of["a0"]
    for name in ["a1", "a2", "a1", "a2"]:
        engine.load_adapter(name, to_slot=True)
        assert engine.adapters.slot_of["a0"] == slot_a0  # running requests keep their slot
    assert engine.adapters.slot_of.get("a1") is None  # a2 took the one free slot from a1
    with pytest.raises(errors.AdapterInUse):
        engine.evict_adapter("a0")


def forward_logits(engine, ids, slot):
    table = BlockTable()
    engine.kv.allocate(table, len(ids))
    try:
        batch = engine.inputs.build([SequenceChunk(ids, 0, table, slot, True)])
        return engine.model.forward(batch, engine.kv, engine.lora)[0]
    finally:
        engine.kv.free(table)


def test_slot_replace_and_reset(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 2, max_loras=2, max_cpu_loras=2)
    ids = [5, 6, 7, 8]
    base = forward_logits(engine, ids, -1)
    engine.load_adapter("a0", to_slot=True)
    engine.load_adapter("a1", to_slot=True)
    s0, s1 = engine.adapters.slot_of["a0"], engine.adapters.slot_of["a1"]
    with_a0, with_a1 = forward_logits(engine, ids, s0), forward_logits(engine, ids, s1)
    assert not torch.allclose(with_a0, base) and not torch.allclose(with_a0, with_a1)
    engine.lora.set_slot(s0, engine.adapters.host["a1"])  # load into an occupied slot: replaces it
    torch.testing.assert_close(forward_logits(engine, ids, s0), with_a1, atol=1e-6, rtol=0)
    engine.lora.reset_slot(s0)
    torch.testing.assert_close(forward_logits(engine, ids, s0), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(forward_logits(engine, ids, s1), with_a1, atol=1e-6, rtol=0)


def test_queued_request_fails_when_pins_later_take_every_slot(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, 3, max_loras=1, max_cpu_loras=3)
    engine.load_adapter("a0")  # read before the step below
    engine.add_request("long", [1, 2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "a0")
    engine.add_request("queued", [1, 2], GREEDY, "a1")
    engine.step()
    engine.load_adapter("a0", pin=True)  # the only slot is now pinned by another adapter
    results = run_to_completion(engine)
    assert results["queued"][-1].finish_reason == "error"
    assert isinstance(results["queued"][-1].error, errors.NoEvictableSlot)
    assert len(tokens_of(results["long"])) == 3  # the pinned adapter's request still finished
    with pytest.raises(errors.NoEvictableSlot):
        engine.add_request("new", [1], GREEDY, "a2")  # and new ones are refused up front


def test_hot_adapters_rotate_through_few_slots_within_a_bound(model_dir, adapter_root):
    n_adapters, max_loras, arrival_steps = 6, 2, 60
    engine = tiny_engine(
        model_dir, adapter_root, n_adapters, max_loras=max_loras, max_cpu_loras=n_adapters, max_num_seqs=256
    )
    for i in range(n_adapters):  # all hot: steps count slot waits only, not a read's wall time
        engine.load_adapter(f"a{i}")
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    arrived, finished = {}, {}
    base_checks = []
    step = 0
    while step < arrival_steps or engine.has_unfinished_requests():
        if step < arrival_steps:
            for i in range(n_adapters):  # every adapter gets a new request every step
                arrived[f"s{step}-a{i}"] = step
                engine.add_request(f"s{step}-a{i}", prompt(i), short, f"a{i}")
        if step in (20, 37):  # a base-model request while adapters wait for slots
            engine.add_request(f"base-{step}", prompt(step), short)
            base_checks.append(f"base-{step}")
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "length", out
                finished[out.request_id] = step
        if step in (20, 37):
            assert any(s.status == "waiting" and s.adapter_id for s in engine.scheduler.waiting)
            assert engine.sequences[f"base-{step}"].status == "running"  # admitted in its first step
        step += 1
    # An adapter's request waits at most: its adapter's own slot draining (T + 1 steps), aging_limit
    # steps, then ceil(n / max_loras) rounds of T + 1 steps while the longer waiters rotate through
    # the slots, then its own T steps.
    t, rounds = short.max_tokens, -(-n_adapters // max_loras)
    bound = engine.scheduler.aging_limit + (rounds + 2) * (t + 1)
    latency = {rid: finished[rid] - arrived[rid] for rid in arrived}
    assert set(finished) == set(arrived) | set(base_checks)
    assert max(latency.values()) <= bound, (max(latency.values()), bound)
    served = [r.adapters - {None} for r in engine.step_history]
    assert all(len(adapters) <= max_loras for adapters in served)
    assert all(any(f"a{i}" in adapters for adapters in served[40:arrival_steps]) for i in range(n_adapters))


def test_run_step_records_what_happened_to_each_request(model_dir, adapter_root):
    """Observers learn a request's life from the step record and events, not the engine's dicts."""
    engine = tiny_engine(model_dir, adapter_root, 1)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.add_request("done", [1, 2, 3], params)
    engine.add_request("gone", [4, 5], params, "a0")
    assert [(e.kind, e.request_id) for e in engine.take_events()] == [("queued", "done"), ("queued", "gone")]
    engine.adapters.wait_for_load(30)
    step = engine.run_step()
    assert step.ran and step.record.num_seqs == 2 and {o.request_id for o in step.outputs} == {"done", "gone"}
    kinds = [(e.kind, e.request_id) for e in step.events]
    assert kinds == [
        ("started", "done"),
        ("started", "gone"),
        ("first_token", "done"),
        ("first_token", "gone"),
    ]
    assert engine.abort_request("gone")
    (aborted,) = engine.take_events()
    assert (aborted.kind, aborted.reason, aborted.adapter_id) == ("finished", "abort", "a0")
    step = engine.run_step()
    (finished,) = [e for e in step.events if e.kind == "finished"]
    assert (finished.request_id, finished.reason, finished.completion_tokens) == ("done", "length", 2)
    assert finished.at >= finished.first_token_at >= finished.arrival
    assert not engine.has_unfinished_requests() and not engine.run_step().ran
