"""The engine's mixed-adapter batches reproduce transformers + PEFT, row by row, for every model
kind of `oracles.MODEL_KINDS` (families, sliding windows, rope variants)."""

import pytest
import torch

from inference_svc.config import EngineConfig
from inference_svc.engine import LLMEngine
from inference_svc.sampling import SamplingParams

from oracles import peft_model_with, reset_rope_state

ATOL = 1e-4


def _long(n: int, seed: int) -> list[int]:
    return [(seed + 37 * i + i * i) % 128 for i in range(n)]


# Short prompts, and long ones: past every kind's sliding window, past max_position_embeddings of the
# linear / dynamic kinds (64) and original_max_position_embeddings of the others (32); 62 and 30
# cross those lengths while decoding.
PROMPTS = [
    [3, 17, 99, 5, 42],
    _long(90, 1),
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    _long(62, 2),
    [100],
    _long(30, 3),
    [9, 90, 19, 91],
]


def engine_for(model_dir, adapters, backend="torch", **overrides):
    """An engine with `backend` for both the LoRA ops and attention."""
    config = EngineConfig(
        max_loras=len(adapters),
        max_lora_rank=32,
        max_cpu_loras=len(adapters),
        device="cpu",
        dtype="float32",
        lora_backend=backend,
        attention_backend=backend,
        kv_block_size=4,
        kv_cache_bytes=1 << 20,
        **overrides,
    )
    engine = LLMEngine(model_dir, config)
    for name, path in adapters.items():
        engine.register_adapter(name, path)
        engine.load_adapter(name)  # read up front: the first step can hold every row
    return engine


def rows(adapters):
    """Base rows and one row per adapter, interleaved, mixed in one batch."""
    names = [None, *adapters]
    return [(PROMPTS[i % len(PROMPTS)], names[i % len(names)]) for i in range(len(names) + 1)]


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    kind, model_dir, adapters = hf_checkpoint
    return peft_model_with(model_dir, adapters)


def hf_logits(model, ids, adapter):
    reset_rope_state(model)
    with torch.no_grad():
        out = model(torch.tensor([ids]), adapter_names=[adapter or "__base__"])
    return out.logits[0].float()  # [len, V]


def test_prefill_logits_match_peft(hf_checkpoint, reference):
    _, model_dir, adapters = hf_checkpoint
    engine = engine_for(model_dir, adapters)
    batch = rows(adapters)
    assert len({a for _, a in batch}) >= 5  # base + at least 4 adapters in one batch
    got = engine.score([ids for ids, _ in batch], [a for _, a in batch])
    for (ids, adapter), logits in zip(batch, got):
        torch.testing.assert_close(logits, hf_logits(reference, ids, adapter), atol=ATOL, rtol=0)


def hf_generate(model, ids, adapter, max_tokens):
    """transformers' greedy tokens and the logits of each step (its KV cache, as a server runs)."""
    model.set_adapter(adapter) if adapter else None
    reset_rope_state(model)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),  # prompts may hold the pad id
            max_new_tokens=max_tokens,
            do_sample=False,
            adapter_names=[adapter or "__base__"],
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), [step[0].float() for step in out.logits]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prompts", "chunked-prefill"])
def test_decode_steps_and_greedy_tokens_match_peft(hf_checkpoint, reference, chunked):
    _, model_dir, adapters = hf_checkpoint
    # chunked: 8 tokens a step, so prompts arrive in chunks beside other sequences' decodes
    overrides = dict(max_num_seqs=8, max_num_batched_tokens=8) if chunked else {}
    engine = engine_for(model_dir, adapters, **overrides)
    engine.record_logits = True
    batch = rows(adapters)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for i, (ids, adapter) in enumerate(batch):
        engine.add_request(f"r{i}", ids, params, adapter)
    generated = {f"r{i}": [] for i in range(len(batch))}
    logits = {f"r{i}": [] for i in range(len(batch))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated[out.request_id].append(out.token.token_id)
            logits[out.request_id].append(out.logits)
    history = engine.step_history
    if chunked:  # some step mixed a prompt chunk with decodes
        assert any(r.num_tokens > r.num_seqs > 1 for r in history)
    else:
        assert max(r.num_seqs for r in history) == len(batch)  # really one mixed batch
    for i, (ids, adapter) in enumerate(batch):
        tokens, expected = hf_generate(reference, ids, adapter, params.max_tokens)
        assert len(logits[f"r{i}"]) == len(expected)
        for got, want in zip(logits[f"r{i}"], expected):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert generated[f"r{i}"] == tokens
