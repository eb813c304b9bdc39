"""Torch implementations of the batched multi-LoRA ops (the reference, and the CPU backend).

Semantics are the contract in DESIGN.md section 4; the Triton kernels in `triton_ops.py` must
match these functions exactly (tests compare the two).

Tokens are taken in slot order (`meta.sorted_token_ids`, where rows with slot -1 come first and are
skipped), so each active slot is one contiguous run: one matmul per slot reads that adapter's
weights once for all its tokens, then one scatter puts rows back in place. When the active slots
are consecutive and hold the same number of tokens each (`meta.uniform_run`, the usual decode
step), one batched matmul over a view of the slot tensor replaces the per-slot loop.
"""

from __future__ import annotations

import torch

from kernels.metadata import LoraBatchMeta


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [S, R, K]
    slot_ids: torch.Tensor,  # [T] int32, -1 = no adapter
    scale: float,
    meta: LoraBatchMeta,
) -> torch.Tensor:  # [T, R] float32
    """Return `scale * x[i] @ lora_a[slot_ids[i]].T` per row in float32; rows with slot -1 are 0."""
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    if not meta.has_lora:
        return out
    first = meta.host_segments[0][1]
    rows = meta.sorted_token_ids[first:]  # [n] tokens with an adapter, in slot order
    xs = x.index_select(0, rows)  # [n, K]
    ts = torch.empty(rows.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)  # [n, R]
    exact = x.dtype == lora_a.dtype == torch.float32
    if exact and meta.uniform_run is not None:
        lo, hi, each = meta.uniform_run
        xs3 = xs.view(hi - lo, each, xs.shape[1])  # [A, c, K]
        torch.bmm(lora_a[lo:hi], xs3.transpose(1, 2), out=ts.view(hi - lo, each, -1).transpose(1, 2))
        if scale != 1.0:
            ts *= scale
        out.index_copy_(0, rows, ts)
        return out
    for slot, begin, end in meta.host_segments:
        b, e = begin - first, end - first
        if exact:
            torch.mm(xs[b:e], lora_a[slot].t(), out=ts[b:e])
        else:
            ts[b:e] = xs[b:e].float() @ lora_a[slot].float().t()
    if scale != 1.0:
        ts *= scale
    out.index_copy_(0, rows, ts)
    return out


def lora_expand(
    out: torch.Tensor,  # [T, >= out_offset + N]
    t: torch.Tensor,  # [T, R] float32
    lora_b: torch.Tensor,  # [S, N, R]
    slot_ids: torch.Tensor,  # [T] int32
    out_offset: int,
    meta: LoraBatchMeta,
) -> None:
    """Add `t[i] @ lora_b[slot_ids[i]].T` into `out[i, out_offset:out_offset+N]` in place."""
    if not meta.has_lora:
        return
    n_out = lora_b.shape[1]
    first = meta.host_segments[0][1]
    rows = meta.sorted_token_ids[first:]  # [n]
    ts = t.index_select(0, rows)  # [n, R] float32
    delta = torch.empty(rows.shape[0], n_out, dtype=torch.float32, device=out.device)  # [n, N]
    exact = lora_b.dtype == torch.float32
    if exact and meta.uniform_run is not None:
        lo, hi, each = meta.uniform_run
        ts3 = ts.view(hi - lo, each, ts.shape[1])  # [A, c, R]
        torch.bmm(lora_b[lo:hi], ts3.transpose(1, 2), out=delta.view(hi - lo, each, -1).transpose(1, 2))
        out[:, out_offset : out_offset + n_out].index_add_(0, rows, delta.to(out.dtype))
        return
    for slot, begin, end in meta.host_segments:
        b, e = begin - first, end - first
        if exact:
            torch.mm(ts[b:e], lora_b[slot].t(), out=delta[b:e])
        else:
            delta[b:e] = ts[b:e] @ lora_b[slot].float().t()
    target = out[:, out_offset : out_offset + n_out]  # [T, N] view
    target.index_add_(0, rows, delta.to(out.dtype))
