"""Sampling through the engine: seeds, top-k/top-p, stops, max tokens, logprobs."""

import dataclasses

import pytest
import torch

from inference_svc.sampling import SamplingParams, sample

from helpers import run_to_completion, tiny_engine, tiny_model, tokens_of

PROMPT = [10, 20, 30, 40]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("s")
    return tiny_engine(tiny_model(root), root / "adapters", 2)


def generate(engine, params, adapter=None, prompt=PROMPT):
    engine.add_request("q", prompt, params, adapter)
    return run_to_completion(engine)["q"]


def test_same_seed_same_tokens_and_different_seed_differs(engine):
    p = SamplingParams(max_tokens=12, temperature=1.5, seed=1234, ignore_eos=True)
    first, again = tokens_of(generate(engine, p, "a0")), tokens_of(generate(engine, p, "a0"))
    assert first == again
    other = tokens_of(
        generate(engine, SamplingParams(max_tokens=12, temperature=1.5, seed=99, ignore_eos=True), "a0")
    )
    assert other != first


def test_top_k_1_and_tiny_top_p_equal_greedy(engine):
    greedy = tokens_of(generate(engine, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    top_k = tokens_of(
        generate(engine, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=5, ignore_eos=True))
    )
    top_p = tokens_of(
        generate(engine, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True))
    )
    assert greedy == top_k == top_p


def test_top_k_restricts_the_support():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    chosen = {
        sample(logits, [SamplingParams(temperature=5.0, top_k=2)], [torch.Generator().manual_seed(s)])[
            0
        ].token_id
        for s in range(200)
    }
    assert chosen == {3, 4}


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    chosen = {
        sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)], [torch.Generator().manual_seed(s)])[
            0
        ].token_id
        for s in range(300)
    }
    assert chosen == {0, 1}


def test_max_tokens_and_stop_token_ids(engine):
    out = generate(engine, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    tokens = tokens_of(out)
    assert len(tokens) == 7 and out[-1].finish_reason == "length" and out[-1].usage.completion_tokens == 7
    stop_id = tokens[3]
    stopped = generate(
        engine, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,))
    )
    first = tokens.index(stop_id)
    assert tokens_of(stopped) == tokens[: first + 1]
    assert stopped[-1].finish_reason == "stop"


def test_eos_stops_unless_ignored(engine):
    tokens = tokens_of(generate(engine, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    eos = tokens[2]
    original = engine.model_config
    engine.model_config = dataclasses.replace(original, eos_token_ids=(eos,))  # as if config.json said so
    try:
        stopped = generate(engine, SamplingParams(max_tokens=6, temperature=0))
        assert tokens_of(stopped) == tokens[: tokens.index(eos) + 1] and stopped[-1].finish_reason == "stop"
        assert (
            tokens_of(generate(engine, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
            == tokens
        )
    finally:
        engine.model_config = original


def test_stop_string_ends_text_before_it(engine):
    full = generate(engine, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), "a1")
    text = "".join(o.text for o in full)
    assert len(text) >= 4
    stop = text[2:4]
    out = generate(engine, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=(stop,)), "a1")
    got = "".join(o.text for o in out)
    assert got == text[: text.find(stop)]
    assert out[-1].finish_reason == "stop"


def test_logprobs_are_the_models_distribution(engine):
    engine.record_logits = True
    try:
        out = generate(engine, SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True), "a0")
    finally:
        engine.record_logits = False
    for o in out:
        lp = torch.log_softmax(o.logits, -1)
        assert o.token.logprob == pytest.approx(lp[o.token.token_id].item(), abs=1e-5)
        ids = [t for t, _ in o.token.top_logprobs]
        assert ids == lp.topk(3).indices.tolist()
        assert ids[0] == o.token.token_id  # greedy picks the most likely
        vals = [v for _, v in o.token.top_logprobs]
        assert vals == sorted(vals, reverse=True)
