"""Batched multi-LoRA ops: one entry point per op, backend chosen in one place.

`lora_shrink`, `lora_expand` and `add_lora` follow DESIGN.md section 4 on every backend:
  - "torch": the reference implementation, used on CPU tensors;
  - "triton": the Triton kernels, used on CUDA tensors (and on CPU under TRITON_INTERPRET=1);
  - "auto": Triton for CUDA tensors, torch otherwise.
"""

from __future__ import annotations

import torch

from kernels import torch_ops
from kernels.metadata import LoraBatchMeta, make_batch_meta

__all__ = ["LoraBatchMeta", "add_lora", "lora_expand", "lora_shrink", "make_batch_meta", "select_backend"]

BACKENDS = ("auto", "triton", "torch")


def select_backend(backend: str, tensor: torch.Tensor) -> str:
    """Resolve `backend` for data living where `tensor` lives."""
    if backend not in BACKENDS:
        raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    return backend


def _ops(backend: str, tensor: torch.Tensor):
    if select_backend(backend, tensor) == "triton":
        from kernels import triton_ops  # imported lazily: triton is optional on CPU hosts

        return triton_ops
    return torch_ops


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [S, R, K]
    slot_ids: torch.Tensor,  # [T] int32
    scale: float = 1.0,
    *,
    meta: LoraBatchMeta | None = None,
    backend: str = "auto",
) -> torch.Tensor:  # [T, R] float32
    """Per row i: `scale * x[i] @ lora_a[slot_ids[i]].T` in float32; rows with slot -1 are 0."""
    meta = meta if meta is not None else make_batch_meta(slot_ids)
    return _ops(backend, x).lora_shrink(x, lora_a, slot_ids, scale, meta)


def lora_expand(
    out: torch.Tensor,  # [T, >= out_offset + N]
    t: torch.Tensor,  # [T, R] float32
    lora_b: torch.Tensor,  # [S, N, R]
    slot_ids: torch.Tensor,  # [T] int32
    out_offset: int = 0,
    *,
    meta: LoraBatchMeta | None = None,
    backend: str = "auto",
) -> None:
    """Per row i: `out[i, out_offset:out_offset+N] += t[i] @ lora_b[slot_ids[i]].T`, in place."""
    meta = meta if meta is not None else make_batch_meta(slot_ids)
    _ops(backend, out).lora_expand(out, t, lora_b, slot_ids, out_offset, meta)


def add_lora(
    y: torch.Tensor,  # [T, >= out_offset + N]
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [S, R, K]
    lora_b: torch.Tensor,  # [S, N, R]
    slot_ids: torch.Tensor,  # [T] int32
    scale: float = 1.0,
    *,
    out_offset: int = 0,
    meta: LoraBatchMeta | None = None,
    backend: str = "auto",
) -> None:
    """`y[:, out_offset:out_offset+N] += scale * (x @ A[s].T) @ B[s].T` per row, in place."""
    meta = meta if meta is not None else make_batch_meta(slot_ids)
    if not meta.has_lora:
        return
    t = lora_shrink(x, lora_a, slot_ids, scale, meta=meta, backend=backend)
    lora_expand(y, t, lora_b, slot_ids, out_offset, meta=meta, backend=backend)
