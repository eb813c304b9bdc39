"""Decode and prefill throughput of an `LLMEngine`, shared by the scenarios and `bench.gpu_check`.

Imports only the engine, so it also runs where the gRPC and plotting parts of `bench` cannot
(a bare GPU machine). On CUDA the clocks are read after `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import time

import torch

from inference_svc.engine import LLMEngine
from inference_svc.sampling import SamplingParams


def prompts(batch: int, length: int, vocab: int, salt: int = 0) -> list[list[int]]:
    """`batch` deterministic prompts of `length` token ids in 1..vocab-2."""
    return [[(7 * i + 13 * j + salt) % (vocab - 2) + 1 for j in range(length)] for i in range(batch)]


def sync(engine: LLMEngine) -> None:
    """Wait for the engine's device, so that a clock read after it covers the queued work."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def decode_len(batch: int, length: int, new_tokens: int, budget: int) -> int:
    """Most tokens a sequence generates in `engine_decode_tps` (size max_model_len and KV by it).

    Those that finish prefill first decode while the rest of the batch is still prefilled, at
    most one token per step of the prefill, whose steps have `budget` tokens minus the decodes.
    """
    prefill_steps = -(-batch * length // max(1, budget - batch)) + 1
    return 1 + prefill_steps + new_tokens


def engine_decode_tps(engine: LLMEngine, adapters: list[str | None], length: int, new_tokens: int) -> float:
    """Generated tokens/s of `new_tokens` decode steps of the whole batch (prefill untimed).

    One request per entry of `adapters`, each with a `length`-token prompt. Long prompts are
    prefilled in chunks over several steps, and sequences that are done decode meanwhile; the clock
    starts only once every sequence has its first token, so each timed step decodes the whole
    batch. The requests are aborted after the timed steps.
    """
    budget = engine.config.max_num_batched_tokens
    max_tokens = decode_len(len(adapters), length, new_tokens, budget)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    stamp = time.monotonic_ns()
    ids = [f"decode-{stamp}-{i}" for i in range(len(adapters))]
    for rid, prompt, adapter in zip(ids, prompts(len(adapters), length, vocab), adapters):
        engine.add_request(rid, prompt, params, adapter)
    waiting = set(ids)
    while waiting:  # the prefill step(s)
        for out in engine.step():
            if out.error is not None:
                raise out.error
            if out.token is not None:
                waiting.discard(out.request_id)
    sync(engine)
    start, tokens = time.perf_counter(), 0
    for _ in range(new_tokens):
        tokens += sum(1 for o in engine.step() if o.token is not None)
    sync(engine)
    elapsed = time.perf_counter() - start
    for rid in ids:
        engine.abort_request(rid)
    return tokens / elapsed


def engine_prefill_tps(engine: LLMEngine, adapters: list[str | None], length: int) -> float:
    """Prompt tokens/s of one step prefilling every prompt of the batch."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for i, (prompt, adapter) in enumerate(zip(prompts(len(adapters), length, vocab, salt=5), adapters)):
        engine.add_request(f"prefill-{time.monotonic_ns()}-{i}", prompt, params, adapter)
    sync(engine)
    start = time.perf_counter()
    outputs = engine.step()
    sync(engine)
    elapsed = time.perf_counter() - start
    assert len(outputs) == len(adapters) and not engine.has_unfinished_requests(), "prefill took >1 step"
    return len(adapters) * length / elapsed
