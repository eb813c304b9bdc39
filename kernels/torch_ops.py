"""Torch implementations of the batched multi-LoRA ops (the reference, and the CPU backend).

Semantics are the contract in DESIGN.md section 4; the Triton kernels in `triton_ops.py` must
match these functions exactly (tests compare the two).

Tokens are taken in slot order (`meta.sorted_token_ids`, where rows with slot -1 come first and are
skipped), so each active slot is one contiguous run: one matmul per slot reads that adapter's
weights once for all its tokens, then one scatter puts rows back in place. When the active slots
are consecutive and hold the same number of tokens each (`meta.uniform_run`, the usual decode
step), one batched matmul over a view of the slot tensor replaces the per-slot loop. When the
step's tokens are already in slot order (`meta.in_order`), the gather and scatter are skipped:
the matmuls read and write row slices of the caller's tensors directly.

Every intermediate lives in a `LoraWorkspace` (the caller's, or one sized for the call), and
matmuls write into it with `out=`, so an engine step allocates nothing here.
"""

from __future__ import annotations

import torch

from kernels.metadata import LoraBatchMeta
from kernels.workspace import LoraWorkspace

F32 = torch.float32


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [S, R, K]
    slot_ids: torch.Tensor,  # [T] int32, -1 = no adapter
    scale: float,
    meta: LoraBatchMeta,
    out: torch.Tensor | None = None,  # [T, R] float32, written (allocated when None)
    workspace: LoraWorkspace | None = None,
) -> torch.Tensor:  # [T, R] float32
    """Return `scale * x[i] @ lora_a[slot_ids[i]].T` per row in float32; rows with slot -1 are 0."""
    num_tokens, hidden = x.shape
    rank = lora_a.shape[1]
    if out is None:
        out = torch.zeros(num_tokens, rank, dtype=F32, device=x.device)
    if not meta.host_groups:
        return out.zero_()
    first = meta.host_segments[0][1]  # the first `first` rows in slot order have no adapter
    if meta.in_order:
        out[:first].zero_()
    else:
        out.index_fill_(0, meta.sorted_token_ids[:first], 0.0)
    n = num_tokens - first
    ws = workspace or LoraWorkspace.fitting(x, rank, 0, lora_a.dtype)
    rows = meta.sorted_token_ids[first:]  # [n] tokens with an adapter, in slot order
    if meta.in_order:
        xs, ts = x[first:], out[first:]  # already in slot order: no gather, no scatter
    else:
        xs = torch.index_select(x, 0, rows, out=ws.take("rows_x", n, hidden))  # [n, K]
        ts = ws.take("rows_t", n, rank)  # [n, R] float32, slot order
    if x.dtype != F32:
        xs = ws.take("x_f32", n, hidden).copy_(xs)
    _slot_matmuls(xs, lora_a, ts, meta, ws)
    if scale != 1.0:
        ts.mul_(scale)
    if not meta.in_order:
        out.index_copy_(0, rows, ts)
    return out


def lora_expand(
    out: torch.Tensor,  # [T, >= out_offset + N]
    t: torch.Tensor,  # [T, R] float32
    lora_b: torch.Tensor,  # [S, N, R]
    slot_ids: torch.Tensor,  # [T] int32
    out_offset: int,
    meta: LoraBatchMeta,
    workspace: LoraWorkspace | None = None,
) -> None:
    """Add `t[i] @ lora_b[slot_ids[i]].T` into `out[i, out_offset:out_offset+N]` in place."""
    if not meta.host_groups:
        return
    width, rank = lora_b.shape[1], lora_b.shape[2]
    first = meta.host_segments[0][1]
    n = t.shape[0] - first
    ws = workspace or LoraWorkspace.fitting(out, rank, width, lora_b.dtype)
    rows = meta.sorted_token_ids[first:]  # [n]
    if meta.in_order:
        ts = t[first:]  # [n, R], possibly a column slice: the matmuls take its strides
    else:
        ts = torch.index_select(t, 0, rows, out=ws.take("rows_t", n, rank))  # [n, R] float32
    delta = ws.take("delta", n, width)  # [n, N] float32
    _slot_matmuls(ts, lora_b, delta, meta, ws)
    target = out[:, out_offset : out_offset + width]  # [T, N] view
    if out.dtype != F32:  # add in out's dtype, as index_add_ would (which allocates on half types)
        delta = ws.take("delta_cast", n, width).copy_(delta)
    if meta.in_order:
        target[first:].add_(delta)
    elif out.dtype == F32:
        target.index_add_(0, rows, delta)
    else:  # rows are distinct (each token appears once): gather, add, put back
        current = torch.index_select(target, 0, rows, out=ws.take("rows_out", n, width))
        target.index_copy_(0, rows, current.add_(delta))


def _slot_matmuls(
    rows: torch.Tensor,  # [n, K]: the step's tokens that have an adapter, in slot order
    weights: torch.Tensor,  # [S, M, K] slot tensor
    out: torch.Tensor,  # [n, M]
    meta: LoraBatchMeta,
    ws: LoraWorkspace,
) -> None:
    """`out[j] = rows[j] @ weights[slot of j].T`: one batched matmul over the slot tensor's own
    memory when the active slots are consecutive with equal token counts, else one per slot."""
    if weights.dtype == F32 and meta.uniform_run is not None:
        lo, hi, each = meta.uniform_run  # splitting dim 0 is a view whatever the strides
        torch.bmm(
            rows.view(hi - lo, each, -1), weights[lo:hi].transpose(1, 2), out=out.view(hi - lo, each, -1)
        )
        return
    first = meta.host_segments[0][1]
    for slot, begin, end in meta.host_segments:
        torch.mm(
            rows[begin - first : end - first],
            _f32(weights[slot], ws).t(),
            out=out[begin - first : end - first],
        )


def _f32(weight: torch.Tensor, ws: LoraWorkspace) -> torch.Tensor:
    """`weight` ([R, K] or [N, R]) itself when float32, else its float32 copy in the workspace."""
    if weight.dtype == F32:
        return weight
    return ws.take("weight_f32", *weight.shape).copy_(weight)
