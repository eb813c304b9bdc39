"""Batched multi-LoRA ops: one entry point per op, backend chosen in one place.

`lora_shrink`, `lora_expand` and `add_lora` follow DESIGN.md section 4 on every backend:
  - "torch": the reference implementation, used on CPU tensors;
  - "triton": the Triton kernels, used on CUDA tensors (and on CPU under TRITON_INTERPRET=1);
  - "auto": Triton for CUDA tensors, torch otherwise.
The engine passes `out=` (the shrink result) and a `LoraWorkspace` built once, so its steps
allocate nothing here; called without them, the ops allocate what the call needs.
"""

from __future__ import annotations

import os
import shutil

import torch

from kernels import torch_ops
from kernels.metadata import LoraBatchMeta, LoraMetaBuffers, make_batch_meta
from kernels.workspace import LoraWorkspace, WorkspaceShape, workspace_bytes

__all__ = [
    "LoraBatchMeta",
    "LoraMetaBuffers",
    "LoraWorkspace",
    "WorkspaceShape",
    "add_lora",
    "check_backend_ready",
    "lora_expand",
    "lora_shrink",
    "make_batch_meta",
    "select_backend",
    "workspace_bytes",
]

BACKENDS = ("auto", "triton", "torch")


def select_backend(backend: str, where: torch.Tensor | torch.device) -> str:
    """Resolve `backend` for data living on `where` (a tensor or a device)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
    if backend == "auto":
        device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
        return "triton" if device.type == "cuda" else "torch"
    return backend


def check_backend_ready(backend: str, device: torch.device) -> None:
    """Fail at start-up, in one line, where Triton could only fail at the first step: on CUDA it
    compiles a small C driver on first use and needs a C compiler (`CC`, clang or gcc)."""
    if select_backend(backend, device) != "triton" or device.type != "cuda":
        return
    if not (os.environ.get("CC") or shutil.which("clang") or shutil.which("gcc") or shutil.which("cc")):
        raise ValueError(
            f"backend ({backend!r}) on {device} runs Triton, which needs a C compiler to build its CUDA "
            "driver and none was found: install gcc (apt-get install gcc libc6-dev), set CC, or use "
            "the torch backends (--lora-backend torch --attention-backend torch)"
        )


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
    out: torch.Tensor | None = None,  # [T, R] float32 to write the result into
    meta: LoraBatchMeta | None = None,
    backend: str = "auto",
    workspace: LoraWorkspace | None = None,
) -> torch.Tensor:  # [T, R] float32
    """Per row i: `scale * x[i] @ lora_a[slot_ids[i]].T` in float32; rows with slot -1 are 0."""
    meta = meta if meta is not None else make_batch_meta(slot_ids)
    if out is not None:
        _check_shrink_out(out, x, lora_a)
    return _ops(backend, x).lora_shrink(x, lora_a, slot_ids, scale, meta, out, workspace)


def lora_expand(
    out: torch.Tensor,  # [T, >= out_offset + N]
    t: torch.Tensor,  # [T, R] float32
    lora_b: torch.Tensor,  # [S, N, R]
    slot_ids: torch.Tensor,  # [T] int32
    out_offset: int = 0,
    *,
    meta: LoraBatchMeta | None = None,
    backend: str = "auto",
    workspace: LoraWorkspace | None = None,
) -> None:
    """Per row i: `out[i, out_offset:out_offset+N] += t[i] @ lora_b[slot_ids[i]].T`, in place."""
    meta = meta if meta is not None else make_batch_meta(slot_ids)
    _ops(backend, out).lora_expand(out, t, lora_b, slot_ids, out_offset, meta, workspace)


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
    workspace: LoraWorkspace | None = None,
) -> None:
    """`y[:, out_offset:out_offset+N] += scale * (x @ A[s].T) @ B[s].T` per row, in place.

    `lora_shrink` into the workspace's shrink buffer (when given), then `lora_expand`; a batch in
    which no row has an adapter returns at once.
    """
    meta = meta if meta is not None else make_batch_meta(slot_ids)
    if not meta.has_lora:
        return
    t = None
    if workspace is not None:
        t = workspace.take("shrink_out", x.shape[0], lora_a.shape[1])
    t = lora_shrink(x, lora_a, slot_ids, scale, out=t, meta=meta, backend=backend, workspace=workspace)
    lora_expand(y, t, lora_b, slot_ids, out_offset, meta=meta, backend=backend, workspace=workspace)


def _check_shrink_out(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor) -> None:
    want = (x.shape[0], lora_a.shape[1])
    if out.dtype != torch.float32 or tuple(out.shape) != want or out.device != x.device:
        raise ValueError(
            f"out ({out.dtype}, {tuple(out.shape)}, {out.device}) must be float32 {want} on {x.device}"
        )
