"""Torch implementations of the batched multi-LoRA ops (the reference, and the CPU backend).

Semantics are the contract in DESIGN.md section 4; the Triton kernels in `triton_ops.py` must
match these functions exactly (tests compare the two).
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
    for slot, rows in meta.groups():
        xs = x.index_select(0, rows).float()  # [n, K]
        out.index_copy_(0, rows, (xs @ lora_a[slot].float().t()) * scale)
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
    n = lora_b.shape[1]
    target = out[:, out_offset : out_offset + n]  # [T, N] view
    for slot, rows in meta.groups():
        ts = t.index_select(0, rows)  # [n, R]
        delta = ts @ lora_b[slot].to(ts.dtype).t()  # [n, N]
        target.index_add_(0, rows, delta.to(out.dtype))
