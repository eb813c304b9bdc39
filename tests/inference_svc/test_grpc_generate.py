"""Generate over a real loopback gRPC connection: concurrent streams across adapters, batched."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from inference_svc.sampling import SamplingParams
from loraserve.v1 import inference_pb2

from harness import NUM_ADAPTERS, TIMEOUT_S, offline_engine, request, resources

NUM_STREAMS = 32
MAX_TOKENS = 10
PROMPTS = ["Hello", [3, 17, 99, 5, 42], "Multi-LoRA serving", [7, 7, 8], "abc", [1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def offline(grpc_model):
    """The offline engine on the same model, adapters and configuration."""
    return offline_engine(*grpc_model)


def collect(stub, req) -> list[inference_pb2.GenerateResponse]:
    return list(stub.Generate(req, timeout=TIMEOUT_S))


def test_32_streams_over_8_adapters_match_the_offline_engine(served, offline):
    start = served.on_engine(resources)
    rows = [(PROMPTS[i % len(PROMPTS)], f"demo-{i % NUM_ADAPTERS}") for i in range(NUM_STREAMS)]
    reqs = [request(p, a, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True) for p, a in rows]
    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        streams = list(pool.map(lambda r: collect(served.stub, r), reqs))

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = offline.generate([p for p, _ in rows], params, [a for _, a in rows])
    for (prompt, adapter), messages, want in zip(rows, streams, expected):
        tokens = [t for m in messages for t in m.token_ids]
        assert tokens == want.token_ids, (prompt, adapter)
        assert {m.adapter_id for m in messages} == {adapter}
        assert len({m.request_id for m in messages}) == 1
        last = messages[-1]
        assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert all(m.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
        assert last.usage.completion_tokens == MAX_TOKENS
        assert not any(m.HasField("usage") for m in messages[:-1])

    history = served.on_engine(lambda engine: engine.step_history)
    assert all(len(record.slots) <= 2 for record in history), "more adapters in a step than max_loras"
    assert any(len(record.slots) == 2 for record in history), "never two adapters in one step"
    assert max(len(record.adapters) for record in history) >= 2
    assert served.on_engine(resources) == start  # every KV block and slot reference returned


def test_text_prompt_with_logprobs_and_alternatives(served, offline):
    req = request("The quick brown fox", "demo-3", max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    messages = collect(served.stub, req)
    want = offline.generate(
        ["The quick brown fox"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), ["demo-3"]
    )[0]

    tokens = [t for m in messages for t in m.token_ids]
    logprobs = [lp for m in messages for lp in m.logprobs]
    assert tokens == want.token_ids
    assert logprobs == pytest.approx(want.logprobs, abs=1e-4)
    for m in messages:
        assert len(m.logprobs) == len(m.token_ids) == len(m.top_logprobs)
        for chosen, lp, top in zip(m.token_ids, m.logprobs, m.top_logprobs):
            alternatives = [(a.token_id, a.logprob) for a in top.alternatives]
            assert len(alternatives) == 3
            assert alternatives[0][0] == chosen  # greedy: the chosen token is the most likely
            assert alternatives[0][1] == pytest.approx(lp, abs=1e-6)
    assert messages[-1].usage.prompt_tokens == len(offline.tokenizer.encode("The quick brown fox"))
    assert "".join(m.text for m in messages) == want.text


@pytest.mark.parametrize(
    "fields, new",
    [
        (dict(temperature=0), dict(repetition_penalty=1.5, frequency_penalty=1.5, presence_penalty=0.5)),
        (dict(temperature=1.5, seed=3), dict(min_p=0.9)),  # the tiny model is nearly flat
    ],
    ids=["penalties", "min_p"],
)
def test_new_sampling_fields_reach_the_engine(served, offline, fields, new):
    prompt, fields = [7, 7, 8], dict(max_tokens=8, ignore_eos=True, **fields)
    messages = collect(served.stub, request(prompt, "demo-1", **fields, **new))
    got = [t for m in messages for t in m.token_ids]
    want = offline.generate([prompt], SamplingParams(**fields, **new), ["demo-1"])[0].token_ids
    without = offline.generate([prompt], SamplingParams(**fields), ["demo-1"])[0].token_ids
    assert got == want != without


def test_base_model_and_defaults(served):
    messages = collect(served.stub, request([1, 2, 3], max_tokens=4))  # temperature, top_p unset
    assert all(m.adapter_id == "" for m in messages)
    assert sum(len(m.token_ids) for m in messages) <= 4
    assert not messages[0].top_logprobs  # logprobs unset: no alternatives


def test_residency_commands(served, grpc_model):
    _, adapters = grpc_model
    loaded = served.stub.LoadAdapter(
        inference_pb2.LoadAdapterRequest(adapter_id="demo-5", to_slot=True), timeout=TIMEOUT_S
    ).adapter
    assert loaded.adapter_id == "demo-5" and loaded.HasField("slot") and loaded.rank == 8
    resident = served.stub.ListResidentAdapters(inference_pb2.ListResidentAdaptersRequest()).adapters
    assert resident[0].adapter_id == "demo-5"  # most recently used first
    assert len(resident) <= 4  # max_cpu_loras
    assert sum(r.HasField("slot") for r in resident) <= 2  # max_loras
    assert all(r.in_flight == 0 and len(r.sha256) == 64 for r in resident)

    evict = inference_pb2.EvictAdapterRequest(adapter_id="demo-5")
    assert served.stub.EvictAdapter(evict).evicted
    assert not served.stub.EvictAdapter(evict).evicted  # idempotent
    ids = [
        r.adapter_id
        for r in served.stub.ListResidentAdapters(inference_pb2.ListResidentAdaptersRequest()).adapters
    ]
    assert "demo-5" not in ids

    # standalone mode: (re-)register from a path under the adapter root, pinned in the host tier
    path = str(adapters["demo-5"])
    pinned = served.stub.LoadAdapter(
        inference_pb2.LoadAdapterRequest(adapter_id="demo-5", path=path, pin=True)
    )
    assert pinned.adapter.pinned
    assert served.stub.EvictAdapter(
        inference_pb2.EvictAdapterRequest(adapter_id="demo-5", unpin=True)
    ).evicted

    info = served.stub.GetEngineInfo(inference_pb2.GetEngineInfoRequest())
    assert info.config.max_loras == 2 and info.config.max_cpu_loras == 4
    assert info.occupancy.slots_total == 2 and info.occupancy.slots_used <= 2
    assert info.occupancy.kv_blocks_total == info.memory_plan.kv_cache_blocks
    assert info.memory_plan.bytes_per_slot > 0 and info.model.vocab_size == 258
    assert info.occupancy.registered_adapters == NUM_ADAPTERS
