"""Decode steps from CUDA graphs: the padded, fixed-grid step equals the eager one.

On CPU the padded step (the exact inputs and launch grids a captured graph replays: padding
sequences on the pool's padding block, LoRA metadata at fixed addresses with every slot's grid)
runs eagerly through the Triton kernels in the interpreter. Capture and replay themselves need a
GPU (the `gpu` test, also part of `python -m bench.gpu_check`).
"""

import os

import pytest
import torch

from inference_svc.cuda_graphs import batch_buckets
from inference_svc.forward_batch import SequenceChunk, StepInputs
from inference_svc.kv_cache import BlockTable, KVCache
from inference_svc.sampling import SamplingParams

from helpers import tiny_engine

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)",
)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_padded_decode_step_equals_the_eager_step(model_dir, adapter_root):
    engine = tiny_engine(
        model_dir,
        adapter_root,
        3,
        max_loras=3,
        lora_backend="triton",
        attention_backend="triton",
        max_num_seqs=8,
    )
    cfg = engine.config
    kv = KVCache(
        engine.model_config, 64, cfg.kv_block_size, torch.float32, engine.device, 8, 16, padding=True
    )
    inputs = StepInputs(kv, cfg.max_num_batched_tokens, 8, engine.device, cfg.max_loras)
    slots = [engine.adapters.acquire_slot(f"a{i}") for i in (2, 0)] + [-1]  # unsorted, one base row
    tables = [BlockTable() for _ in PROMPTS]
    prefill = []
    for ids, table, slot in zip(PROMPTS, tables, slots):
        assert kv.allocate(table, len(ids) + 1)
        prefill.append(SequenceChunk(ids, 0, table, slot, True))
    engine.model.forward(inputs.build(prefill), kv, engine.lora)
    decode = [
        SequenceChunk([3 + i], len(ids), t, s, True)
        for i, (ids, t, s) in enumerate(zip(PROMPTS, tables, slots))
    ]

    eager = engine.model.forward(inputs.build(decode), kv, engine.lora)  # [3, V]
    real_blocks = [b for t in tables for b in t.ids]
    cache_after_eager = kv.keys[:, real_blocks].clone()
    padded_batch = inputs.build(decode, pad_to=8)
    assert (
        padded_batch.lora_meta.num_active == cfg.max_loras and padded_batch.lora_meta.max_tokens_per_slot == 8
    )
    padded = engine.model.forward(padded_batch, kv, engine.lora)  # [8, V]
    torch.testing.assert_close(padded[:3], eager, atol=1e-5, rtol=0)
    # padding wrote only its own block (the decode rows rewrite theirs, equal up to summation order)
    torch.testing.assert_close(kv.keys[:, real_blocks], cache_after_eager, atol=1e-6, rtol=0)
    assert kv.tables[kv.padding_row, 0] not in real_blocks
    with pytest.raises(ValueError, match="only decode steps"):
        inputs.build(prefill, pad_to=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_generates_the_eager_tokens(model_dir, adapter_root):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    adapters = ["a0", "a1", None, "a2", "a0"]
    tokens = {}
    for eager in (True, False):
        engine = tiny_engine(
            model_dir, adapter_root, 3, max_loras=3, device="cuda", dtype="bfloat16", enforce_eager=eager
        )
        engine.warm_up()
        assert (engine.graphs is None) == eager and (eager or engine.graphs.captured)
        tokens[eager] = [
            c.token_ids for c in engine.generate([p for p in PROMPTS + PROMPTS[:2]], params, adapters)
        ]
    assert tokens[True] == tokens[False]
