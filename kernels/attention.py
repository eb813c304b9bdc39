"""Paged attention: queries of a mixed step (prefill chunks and decodes) over the KV block pool.

Every sequence of a step contributes `n_b >= 1` new query tokens whose K/V are already written to
the pool; it attends causally to its whole context (the cached prefix and its own new tokens),
read through its block table, or with a sliding `window` w > 0 to the keys in (p - w, p] of a
query at position p (transformers' `sliding_window`; the layer's choice, one per call). With
`softcap` c > 0 the scores become tanh(s / c) * c before the softmax (Gemma 2's logit soft-capping).
No context is copied into padded batch tensors and no mask is built on the host; grouped-query
attention reads each K/V head once for all of its query heads.

  - "triton": `kernels.triton_attention`, one kernel for the whole step (CUDA, or CPU tensors under
    TRITON_INTERPRET=1);
  - "torch": the CPU path, one fused attention call (`scaled_dot_product_attention`, which runs
    flash attention on CPU, GQA without repeating K/V) per sequence over its own blocks; memory is
    that sequence's context, never the batch's padded maximum;
  - "auto": Triton for CUDA tensors, torch otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import select_backend

MASK_ROWS = 256  # queries per masked call of the torch path


@dataclass(frozen=True)
class AttentionMeta:
    """Where each sequence's queries and keys are in one step; built once, read by every layer."""

    query_start_loc: torch.Tensor  # [B + 1] int32, row in q of each sequence's first new token
    seq_lens: torch.Tensor  # [B] int32, context length of each sequence including its new tokens
    block_tables: torch.Tensor  # [R, max_blocks] int32, KV block ids of each table row
    seq_rows: torch.Tensor  # [B] int32, each sequence's row in block_tables
    max_query_len: int  # largest n_b of the step (1 for a decode-only step)
    max_seq_len: int  # largest seq_len of the step
    # (first query row, end query row, seq_len, table row) per sequence, for host-side loops
    host_seqs: tuple[tuple[int, int, int, int], ...]

    @property
    def num_seqs(self) -> int:
        return len(self.host_seqs)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    meta: AttentionMeta,
    scale: float,
    out: torch.Tensor,  # [T, H, D], written
    backend: str = "auto",
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of every sequence's new queries over its cached context (the last `window`
    positions of it when `window` > 0), scores soft-capped at `softcap` when > 0; returns `out`."""
    _check(q, k_cache, v_cache, out)
    if window < 0:
        raise ValueError(f"window ({window}) must be >= 0 (0 = full attention)")
    if softcap < 0:
        raise ValueError(f"softcap ({softcap}) must be >= 0 (0 = no soft-capping)")
    if select_backend(backend, q) == "triton":
        from kernels import triton_attention  # imported lazily: triton is optional on CPU hosts

        return triton_attention.paged_attention(q, k_cache, v_cache, meta, scale, out, window, softcap)
    return paged_attention_torch(q, k_cache, v_cache, meta, scale, out, window, softcap)


def paged_attention_torch(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    out: torch.Tensor,  # [T, H, D]
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The CPU path: per sequence, its blocks (a copy of its real context only) and fused calls.

    A chunk after a cached prefix needs a causal mask aligned bottom-right; it is built for at
    most MASK_ROWS queries at a time, so its memory is bounded by MASK_ROWS x context. With a
    window, only the blocks the sequence's first query can still see are read, each piece's keys
    start at its first query's window, and the mask also hides keys below each query's window.
    With `softcap`, every piece (of at most MASK_ROWS queries) is explicit matmul / softmax calls.
    """
    block_size = k_cache.shape[1]
    for begin, end, seq_len, row in meta.host_seqs:
        first = seq_len - (end - begin)  # position of the sequence's first new token
        lowest = max(0, first - window + 1) if window else 0  # first key any of its queries sees
        skip = lowest // block_size  # blocks wholly below every query's window
        blocks = meta.block_tables[row, skip : -(-seq_len // block_size)]  # [nb]
        keys = k_cache.index_select(0, blocks).flatten(0, 1)  # [nb * block_size, KVH, D]
        values = v_cache.index_select(0, blocks).flatten(0, 1)
        base = skip * block_size  # position of keys[0]
        for q0 in range(begin, end, MASK_ROWS):
            q1 = min(end, q0 + MASK_ROWS)
            pos0, visible = first + q0 - begin, first + q1 - begin  # first query's position, keys seen
            lo = max(0, pos0 - window + 1) if window else 0  # first key of the piece's first query
            if softcap:
                out[q0:q1] = _softcapped(
                    q[q0:q1],
                    keys[lo - base : visible - base],
                    values[lo - base : visible - base],
                    pos0,
                    lo,
                    scale,
                    window,
                    softcap,
                )
                continue
            mask = None
            if q1 - q0 > 1 and (pos0 > 0 or (window and visible > window)):
                key_pos = torch.arange(lo, visible, device=q.device)
                q_pos = torch.arange(pos0, visible, device=q.device)[:, None]
                mask = key_pos <= q_pos  # [n, L]
                if window:
                    mask &= key_pos > q_pos - window
            o = F.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1)[None],  # [1, H, n, D]
                keys[lo - base : visible - base].transpose(0, 1)[None],  # [1, KVH, L, D]
                values[lo - base : visible - base].transpose(0, 1)[None],
                attn_mask=mask,  # True = attend
                is_causal=q1 - q0 > 1 and mask is None,  # a prompt's start: aligned top-left
                scale=scale,
                enable_gqa=True,
            )  # [1, H, n, D]
            out[q0:q1] = o[0].transpose(0, 1)
    return out


def _softcapped(
    q: torch.Tensor,  # [n, H, D], queries at positions pos0 .. pos0 + n - 1
    k: torch.Tensor,  # [L, KVH, D], keys at positions lo .. lo + L - 1
    v: torch.Tensor,  # [L, KVH, D]
    pos0: int,
    lo: int,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:  # [n, H, D]
    """One piece of soft-capped attention: scores in float32, capped, masked, softmaxed."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(n, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3).float()  # [KVH, G, n, D]
    s = qg @ k.permute(1, 2, 0).float()[:, None] * scale  # [KVH, G, n, L]
    s = torch.tanh(s / softcap) * softcap
    key_pos = torch.arange(lo, lo + k.shape[0], device=q.device)
    q_pos = torch.arange(pos0, pos0 + n, device=q.device)[:, None]
    hidden = key_pos > q_pos  # [n, L]
    if window:
        hidden |= key_pos <= q_pos - window
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
    o = p @ v.permute(1, 0, 2).float()[:, None]  # [KVH, G, n, D]
    return o.permute(2, 0, 1, 3).reshape(n, heads, dim).to(q.dtype)


def torch_scratch_bytes(
    max_seq_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype, heads: int = 0
) -> int:
    """Largest scratch of `paged_attention_torch`: one sequence's K and V, and one mask piece
    (boolean, and the float copy the fused call makes of it); with `heads` (soft-capped layers),
    also a piece's float32 scores and probabilities [heads, MASK_ROWS, max_seq_len] and float32
    copies of K and V."""
    kv = 2 * max_seq_len * kv_heads * head_dim
    capped = heads * MASK_ROWS * max_seq_len * 4 * 2 + kv * 4 if heads else 0
    return kv * dtype.itemsize + MASK_ROWS * max_seq_len * (1 + 4) + capped


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"q {tuple(q.shape)} must be [T, H, D] and k/v caches {tuple(k_cache.shape)} / "
            f"{tuple(v_cache.shape)} [num_blocks, block_size, KVH, D]"
        )
    heads, head_dim = q.shape[1:]
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or heads % kv_heads:
        raise ValueError(
            f"{heads} query heads of dim {head_dim} do not fit {kv_heads} KV heads of dim {k_cache.shape[3]}"
        )
    if out.shape != q.shape:
        raise ValueError(f"out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
