"""The step's data path: inputs laid out from the new tokens only, attention on the block pool.

Peak memory is read from torch's profiler (its memory timeline: every tensor created and
destroyed during the step, in order), so a dense `[B, chunk, context]` tensor anywhere in the
forward pass makes the bound test fail.
"""

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfile

from inference_svc.forward_batch import SequenceChunk
from inference_svc.kv_cache import BlockTable
from kernels import attention

from helpers import tiny_engine

CONTEXT, CHUNK, DECODES = 2048, 512, 63


def peak_cpu_bytes(fn) -> int:
    """Highest sum of live CPU tensor bytes created while `fn` runs (torch profiler timeline)."""
    fn()  # warm up lazily-initialised library state
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    live = peak = 0
    # the timeline export_memory_timeline draws: (time, action, (tensor, version), bytes) in order
    for _, action, (key, _), size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def long_context_step(engine):
    """One 512-token chunk after a 1,536-token prefix beside 63 decodes at 2,048 context."""
    chunks = []
    for b in range(DECODES + 1):
        table = BlockTable()
        assert engine.kv.allocate(table, CONTEXT)
        if b == 0:
            ids = [t % 250 + 1 for t in range(CHUNK)]
            chunks.append(SequenceChunk(ids, CONTEXT - CHUNK, table, -1, True))
        else:
            chunks.append(SequenceChunk([b % 250 + 1], CONTEXT - 1, table, -1, True))
    return chunks


def test_mixed_long_context_step_memory_follows_the_real_tokens(model_dir, adapter_root):
    engine = tiny_engine(
        model_dir,
        adapter_root,
        max_num_seqs=DECODES + 1,
        max_num_batched_tokens=CHUNK + DECODES,
        kv_block_size=16,
        kv_cache_bytes=80 << 20,
        attention_backend="torch",
    )
    cfg = engine.model_config
    chunks = long_context_step(engine)
    num_tokens = sum(len(c.token_ids) for c in chunks)

    def step():
        engine.model.forward(engine.inputs.build(chunks), engine.kv, engine.lora)

    peak = peak_cpu_bytes(step)
    # the real work: a few activations of the step's tokens at the widest layer, one sequence's
    # context K/V, one mask piece of the chunk (boolean and float)
    widest = max(cfg.vocab_size, 2 * cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    bound = 8 * num_tokens * widest * 4 + attention.torch_scratch_bytes(
        CONTEXT, cfg.num_kv_heads, cfg.head_dim, torch.float32
    )
    dense = (DECODES + 1) * CHUNK * CONTEXT * 4  # one float per (sequence, chunk query, context key)
    assert bound < dense / 8  # the bound is far below what a padded-batch attention needs
    assert 0 < peak <= bound, f"peak {peak} B > bound {bound} B"


@pytest.mark.parametrize("block_size", [4, 16])
def test_step_inputs_match_the_positions_and_block_tables(model_dir, adapter_root, block_size):
    engine = tiny_engine(model_dir, adapter_root, 2, kv_block_size=block_size, max_num_seqs=16)
    gen = np.random.default_rng(0)
    tables, chunks = [], []
    for b, (prefix, new) in enumerate([(0, 7), (9, 1), (16, 1), (0, 1), (13, 6)]):
        table = BlockTable()
        other = BlockTable()  # interleave another table's blocks so blocks are not consecutive
        assert engine.kv.allocate(other, int(gen.integers(1, 9)))
        assert engine.kv.allocate(table, prefix + new)
        tables.append(other)
        ids = [int(t) for t in gen.integers(1, 250, new)]
        chunks.append(SequenceChunk(ids, prefix, table, b % 3 - 1, b != 3))
    batch = engine.inputs.build(chunks)
    expected_pos, expected_slot, expected_tok, expected_write, logits_rows = [], [], [], [], []
    for c in chunks:
        for i, tok in enumerate(c.token_ids):
            pos = c.start_pos + i
            expected_pos.append(pos)
            expected_tok.append(tok)
            expected_slot.append(c.slot)
            expected_write.append(c.block_table.ids[pos // block_size] * block_size + pos % block_size)
        if c.want_logits:
            logits_rows.append(len(expected_pos) - 1)
    assert batch.positions.tolist() == expected_pos
    assert batch.token_ids.tolist() == expected_tok
    assert batch.slot_ids.tolist() == expected_slot
    assert batch.kv_write.tolist() == expected_write
    assert batch.logits_index.tolist() == logits_rows
    meta = batch.attention
    for (begin, end, seq_len, row), c in zip(meta.host_seqs, chunks):
        assert (end - begin, seq_len) == (len(c.token_ids), c.start_pos + len(c.token_ids))
        assert meta.block_tables[row, : len(c.block_table)].tolist() == c.block_table.ids
    assert meta.query_start_loc.tolist() == [0, *np.cumsum([len(c.token_ids) for c in chunks]).tolist()]
    for table in [*tables, *(c.block_table for c in chunks)]:
        engine.kv.free(table)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_freed_row_is_reused_with_its_new_blocks(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, kv_block_size=4, max_num_seqs=1)
    first, second = BlockTable(), BlockTable()
    assert engine.kv.allocate(first, 9)
    assert not engine.kv.allocate(second, 1)  # the only table row is taken
    engine.kv.free(first)
    assert engine.kv.allocate(second, 5)
    assert engine.kv.tables[second.row, :2].tolist() == second.ids
