"""Paged attention (torch CPU path and Triton kernel) against a float64 dense reference.

Batches are ragged mixes of prefill chunks (with and without a cached prefix) and decodes, over
block tables whose blocks are shuffled through the pool, with block sizes that do and do not
divide the kernel's key tile, GQA ratios 1, 4 and 8, and a head dim that is not a power of two;
and with sliding windows shorter and longer than blocks, key tiles and mask pieces; and with
Gemma 2's score soft-capping, alone and with a window.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import attention
from kernels.attention import AttentionMeta, paged_attention

from tolerances import assert_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"

# (cached prefix, new tokens) per sequence: decodes at block edges, a chunk after a prefix,
# a whole prompt, a one-token prompt, a chunk that starts mid-block
MIXED = [(0, 7), (5, 1), (16, 1), (0, 1), (13, 20), (31, 1), (3, 9)]


def build_case(steps, block_size, kv_heads, group, head_dim, dtype, seed=0):
    """Random q and a shuffled block pool holding every sequence's context."""
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    lens = [p + n for p, n in steps]
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(per_seq)
    tables = torch.zeros(len(steps) + 1, width, dtype=torch.int32)  # row 0 unused: rows are indirect
    taken = 0
    for b, nb in enumerate(per_seq):
        tables[b + 1, :nb] = torch.tensor(order[taken : taken + nb])
        taken += nb
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    total = sum(n for _, n in steps)
    q = torch.randn(total, heads, head_dim, generator=gen)
    starts = [0]
    for _, n in steps:
        starts.append(starts[-1] + n)
    meta = AttentionMeta(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE),
        seq_rows=torch.arange(1, len(steps) + 1, dtype=torch.int32, device=DEVICE),
        max_query_len=max(n for _, n in steps),
        max_seq_len=max(lens),
        host_seqs=tuple((starts[b], starts[b + 1], lens[b], b + 1) for b in range(len(steps))),
    )
    on = dict(device=DEVICE, dtype=dtype)
    return q.to(**on), k_cache.to(**on), v_cache.to(**on), meta


def reference(q, k_cache, v_cache, meta, scale, window=0, softcap=0.0):
    """float64, one sequence at a time, K/V repeated per query head, an explicit causal mask
    (keys in (p - window, p] of a query at p when window > 0), scores tanh(s / c) * c when
    softcap c > 0."""
    q, k_cache, v_cache = (t.cpu().double() for t in (q, k_cache, v_cache))
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = torch.zeros_like(q)
    tables = meta.block_tables.cpu()
    for begin, end, seq_len, row in meta.host_seqs:
        slots = [int(tables[row, p // block_size]) * block_size + p % block_size for p in range(seq_len)]
        keys = k_cache.flatten(0, 1)[slots].repeat_interleave(group, dim=1)  # [L, H, D]
        values = v_cache.flatten(0, 1)[slots].repeat_interleave(group, dim=1)
        n = end - begin
        q_pos = torch.arange(seq_len - n, seq_len)[:, None]
        scores = torch.einsum("nhd,lhd->hnl", q[begin:end], keys) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        key_pos = torch.arange(seq_len)[None, :]
        hidden = (key_pos > q_pos) | ((key_pos <= q_pos - window) if window else False)
        scores = scores.masked_fill(hidden, float("-inf"))
        out[begin:end] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_step_matches_reference(backend, group, block_size):
    q, k_cache, v_cache, meta = build_case(
        MIXED, block_size, kv_heads=2, group=group, head_dim=40, dtype=torch.float32
    )
    scale = 40**-0.5
    out = paged_attention(q, k_cache, v_cache, meta, scale, torch.empty_like(q), backend=backend)
    assert_close(out, reference(q, k_cache, v_cache, meta, scale), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "steps", [[(40, 1)] * 3 + [(0, 1)], [(0, 33)], [(17, 15), (0, 2)]], ids=["decode", "prompt", "chunks"]
)
def test_decode_only_and_prefill_only_steps(backend, steps):
    q, k_cache, v_cache, meta = build_case(
        steps, 8, kv_heads=1, group=4, head_dim=64, dtype=torch.float32, seed=3
    )
    out = paged_attention(q, k_cache, v_cache, meta, 0.125, torch.empty_like(q), backend=backend)
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.125), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision(backend, dtype):
    q, k_cache, v_cache, meta = build_case(MIXED, 16, kv_heads=2, group=2, head_dim=32, dtype=dtype, seed=5)
    out = paged_attention(q, k_cache, v_cache, meta, 32**-0.5, torch.empty_like(q), backend=backend)
    assert out.dtype == dtype
    assert_close(out, reference(q, k_cache, v_cache, meta, 32**-0.5), dtype)


def test_rows_outside_the_step_are_not_written():
    q, k_cache, v_cache, meta = build_case(
        [(2, 1), (0, 3)], 4, kv_heads=2, group=2, head_dim=16, dtype=torch.float32
    )
    out = torch.full((q.shape[0] + 2, *q.shape[1:]), 7.0, device=q.device)
    paged_attention(q, k_cache, v_cache, meta, 0.25, out[: q.shape[0]], backend="triton")
    assert torch.all(out[q.shape[0] :] == 7.0)


def test_bad_shapes_are_refused():
    q, k_cache, v_cache, meta = build_case([(0, 2)], 4, kv_heads=3, group=1, head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="query heads"):
        paged_attention(q[:, :2], k_cache, v_cache, meta, 1.0, torch.empty_like(q[:, :2]))


def test_torch_path_splits_long_chunks_into_bounded_mask_pieces(monkeypatch):
    monkeypatch.setattr(attention, "MASK_ROWS", 3)  # every chunk of MIXED spans several pieces
    q, k_cache, v_cache, meta = build_case(MIXED, 4, kv_heads=2, group=2, head_dim=16, dtype=torch.float32)
    out = paged_attention(q, k_cache, v_cache, meta, 0.25, torch.empty_like(q), backend="torch")
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.25), torch.float32)


# long prompts, chunks after long prefixes and decodes far from the start, so windows cut in
WINDOWED = [(0, 70), (45, 1), (90, 1), (33, 40), (0, 3), (64, 1), (7, 30)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window", [1, 5, 16, 37, 200])
@pytest.mark.parametrize("block_size", [4, 16])
def test_sliding_window_matches_reference(backend, window, block_size):
    q, k_cache, v_cache, meta = build_case(
        WINDOWED, block_size, kv_heads=2, group=2, head_dim=24, dtype=torch.float32, seed=7
    )
    out = paged_attention(
        q, k_cache, v_cache, meta, 24**-0.5, torch.empty_like(q), backend=backend, window=window
    )
    assert_close(out, reference(q, k_cache, v_cache, meta, 24**-0.5, window), torch.float32)


def test_sliding_window_across_torch_mask_pieces(monkeypatch):
    monkeypatch.setattr(attention, "MASK_ROWS", 8)
    q, k_cache, v_cache, meta = build_case(WINDOWED, 4, kv_heads=1, group=2, head_dim=16, dtype=torch.float32)
    out = paged_attention(q, k_cache, v_cache, meta, 0.25, torch.empty_like(q), backend="torch", window=11)
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.25, 11), torch.float32)


def test_negative_window_is_refused():
    q, k_cache, v_cache, meta = build_case([(0, 2)], 4, kv_heads=1, group=1, head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="window"):
        paged_attention(q, k_cache, v_cache, meta, 1.0, torch.empty_like(q), window=-1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window", [0, 16], ids=["full", "window16"])
@pytest.mark.parametrize("softcap", [0.5, 50.0])
def test_softcap_matches_reference(backend, window, softcap):
    q, k_cache, v_cache, meta = build_case(
        WINDOWED, 4, kv_heads=2, group=2, head_dim=24, dtype=torch.float32, seed=11
    )
    q = q * 4  # scores large enough that a cap of 0.5 bites
    out = paged_attention(
        q, k_cache, v_cache, meta, 0.25, torch.empty_like(q), backend=backend, window=window, softcap=softcap
    )
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.25, window, softcap), torch.float32)


def test_softcap_across_torch_mask_pieces(monkeypatch):
    monkeypatch.setattr(attention, "MASK_ROWS", 8)
    q, k_cache, v_cache, meta = build_case(MIXED, 4, kv_heads=1, group=4, head_dim=16, dtype=torch.float32)
    out = paged_attention(q, k_cache, v_cache, meta, 0.25, torch.empty_like(q), backend="torch", softcap=1.0)
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.25, softcap=1.0), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcap_half_precision(backend):
    q, k_cache, v_cache, meta = build_case(MIXED, 16, kv_heads=2, group=2, head_dim=32, dtype=torch.bfloat16)
    out = paged_attention(q, k_cache, v_cache, meta, 0.2, torch.empty_like(q), backend=backend, softcap=2.0)
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.2, softcap=2.0), torch.bfloat16)


def test_negative_softcap_is_refused():
    q, k_cache, v_cache, meta = build_case([(0, 2)], 4, kv_heads=1, group=1, head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        paged_attention(q, k_cache, v_cache, meta, 1.0, torch.empty_like(q), softcap=-1.0)
