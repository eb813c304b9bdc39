"""bench.engine_timing: the timed decode steps hold the whole batch and nothing else."""

from __future__ import annotations

from bench import assets
from bench.engine_timing import engine_decode_tps
from inference_svc.config import EngineConfig
from inference_svc.engine import LLMEngine


def test_decode_is_timed_only_after_a_chunked_prefill(tmp_path):
    model_dir = assets.model(tmp_path, "tiny")
    ((name, path),) = assets.adapters(tmp_path, model_dir, 1, rank=4).items()
    # 4 prompts of 40 tokens through a 24-token budget: the prefill takes several steps, and the
    # first sequences decode while the last are still being prefilled
    config = EngineConfig(
        max_loras=1, max_num_seqs=4, max_num_batched_tokens=24, device="cpu", kv_block_size=4
    )
    engine = LLMEngine(model_dir, config)
    engine.register_adapter(name, path)
    assert engine_decode_tps(engine, [None, name, None, name], 40, new_tokens=3) > 0
    timed = engine.step_history[-3:]
    assert all(r.num_seqs == r.num_tokens == 4 for r in timed)
    assert any(r.num_tokens > r.num_seqs > 1 for r in engine.step_history)  # a chunk beside decodes
    assert not engine.has_unfinished_requests()
