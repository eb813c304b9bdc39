"""Triton paged attention for mixed steps (prefill chunks and decodes), semantics of `attention.py`.

Grid: (sequence, query tile, KV head). A program takes BLOCK_M new tokens of one sequence and
all GROUP query heads that share one KV head (grouped-query attention: K/V are read once for the
whole group, never repeated), flattened into BLOCK_M * BLOCK_G rows. It walks the sequence's
context BLOCK_N keys at a time, looking each key's block up in the block table (so any
`block_size` works), with an online softmax in fp32 and a causal bound: the tile stops at the last
key its last query may see. With a sliding window the walk starts at the key tile holding the first
key its first query may see, and keys below each query's window are masked. With SOFTCAP the scores
become tanh(s / softcap) * softcap before the softmax (Gemma 2). Tiles past a sequence's query count exit at once, so one launch serves
a 512-token chunk beside 63 decodes. fp32 dots use IEEE precision (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention import AttentionMeta
from kernels.triton_ops import INTERPRETED, _on_device

# Keys per inner iteration, and rows (query tokens x grouped heads) per program.
BLOCK_N = 32
PREFILL_ROWS = 64
MIN_ROWS = 16  # tl.dot's smallest tile on the GPU
FULL_WINDOW = 1 << 30  # the window argument of full attention: longer than any sequence


@triton.jit
def _kv_tile(cache_ptr, block, within, kv_head, offs_d, stride_b, stride_s, stride_h, mask):
    """The [N, D] keys (or values) of one KV head at N pool positions: `block` and `within` it."""
    return tl.load(
        cache_ptr
        + block[:, None] * stride_b
        + within[:, None] * stride_s
        + kv_head * stride_h
        + offs_d[None, :],
        mask=mask,
        other=0.0,
    )


@triton.jit
def _paged_attention_kernel(
    # pointers
    q_ptr,  # [T, H, D]
    k_ptr,  # [num_blocks, block_size, KVH, D]
    v_ptr,  # [num_blocks, block_size, KVH, D]
    out_ptr,  # [T, H, D]
    block_tables_ptr,  # [R, max_blocks] int32
    seq_rows_ptr,  # [B] int32
    query_start_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    # sizes
    scale,
    block_size,
    head_dim,
    window,  # a query at p sees keys in (p - window, p]; a huge value = full attention
    softcap,  # read only with SOFTCAP
    # strides
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    # meta-parameters
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_M: tl.constexpr,  # query tokens per program
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SOFTCAP: tl.constexpr,  # soft-cap the scores at `softcap`
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first new token
    table = block_tables_ptr + tl.load(seq_rows_ptr + seq).to(tl.int64) * stride_bt

    rows = tl.arange(0, BLOCK_M * BLOCK_G)
    tok = tile * BLOCK_M + rows // BLOCK_G  # [M] new-token index within the sequence
    head = kv_head * GROUP + rows % BLOCK_G
    row_ok = (tok < q_len) & (rows % BLOCK_G < GROUP)
    q_pos = first_pos + tok  # [M]
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_rows = (q_begin + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [M, D]
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M * BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M * BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M * BLOCK_G, BLOCK_D), dtype=tl.float32)
    kv_end = tl.minimum(seq_len, first_pos + (tile + 1) * BLOCK_M)  # causal: the tile's last key
    lowest = tl.maximum(first_pos + tile * BLOCK_M - window + 1, 0)  # window: the tile's first key
    for start in range(lowest // BLOCK_N * BLOCK_N, kv_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)  # [N]
        k_ok = k_pos < kv_end
        block = tl.load(table + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
        within = k_pos % block_size
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = _kv_tile(k_ptr, block, within, kv_head, offs_d, stride_kb, stride_ks, stride_kh, kv_mask)
        v = _kv_tile(v_ptr, block, within, kv_head, offs_d, stride_vb, stride_vs, stride_vh, kv_mask)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [M, N]
        if SOFTCAP:  # tanh(x) = 2 sigmoid(2x) - 1
            s = (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0) * softcap
        seen = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def paged_attention(
    q: torch.Tensor,  # [T, H, D], unit stride in D
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D], unit stride in D
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D], unit stride in D
    meta: AttentionMeta,
    scale: float,
    out: torch.Tensor,  # [T, H, D], unit stride in D
    window: int = 0,  # sliding window, 0 = full attention
    softcap: float = 0.0,  # score soft-capping, 0 = none
) -> torch.Tensor:
    """One launch for the whole step; see the module docstring. Returns `out`."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    if q.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            "to run on CPU tensors; use backend='torch' on CPU"
        )
    heads, head_dim = q.shape[1:]
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    block_g = triton.next_power_of_2(group)
    rows = MIN_ROWS if meta.max_query_len == 1 else PREFILL_ROWS
    block_m = max(1, min(rows // block_g, triton.next_power_of_2(meta.max_query_len)))
    if block_m * block_g < MIN_ROWS:
        block_m = MIN_ROWS // block_g
    grid = (meta.num_seqs, triton.cdiv(meta.max_query_len, block_m), kv_heads)
    dot_fp32 = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    with _on_device(q):
        _paged_attention_kernel[grid](
            q,
            k_cache,
            v_cache,
            out,
            meta.block_tables,
            meta.seq_rows,
            meta.query_start_loc,
            meta.seq_lens,
            float(scale),
            k_cache.shape[1],
            head_dim,
            window or FULL_WINDOW,
            float(softcap or 1.0),
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            out.stride(0),
            out.stride(1),
            meta.block_tables.stride(0),
            GROUP=group,
            BLOCK_G=block_g,
            BLOCK_M=block_m,
            BLOCK_N=BLOCK_N,
            BLOCK_D=triton.next_power_of_2(head_dim),
            DOT_FP32=dot_fp32,
            SOFTCAP=bool(softcap),
            num_warps=4,
        )
    return out
