"""Scratch memory for the LoRA ops of one step, allocated once and reused by every layer.

The engine builds one `LoraWorkspace` next to its slot tensors, sized for the largest step it
schedules (`max_num_batched_tokens`), so the LoRA path allocates nothing per step: the shrink
output and, on the torch backend, the gathered rows, the per-row deltas and the float32 copies
that half-precision inputs need all live here. Buffers are flat; `take` hands out contiguous
views of the size one op needs.

Ops called without a workspace (tests, benchmarks, one-off calls) get one sized for that call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkspaceShape:
    """The largest LoRA op of a step: every buffer is sized from these four numbers."""

    max_tokens: int  # tokens in one step
    max_in: int  # widest LoRA input (K of lora_a)
    max_rank: int  # widest shrink output (modules stacked per fused projection x max_lora_rank)
    max_out: int  # widest single module output (N of lora_b)


def buffer_sizes(
    shape: WorkspaceShape, activation_dtype: torch.dtype, lora_dtype: torch.dtype, torch_backend: bool
) -> dict[str, tuple[int, torch.dtype]]:
    """Name -> (elements, dtype) of every buffer a workspace holds for this configuration.

    Every backend needs the shrink output ("shrink_out"). The torch backend also gathers rows
    into slot order ("rows_x", "rows_t"), computes deltas ("delta"), and works in float32 when
    the activations ("x_f32", "delta_cast", "rows_out") or the slots ("weight_f32") are half
    precision.
    """
    t, k, r, n = shape.max_tokens, shape.max_in, shape.max_rank, shape.max_out
    f32 = torch.float32
    sizes = {"shrink_out": (t * r, f32)}
    if torch_backend:
        sizes |= {"rows_x": (t * k, activation_dtype), "rows_t": (t * r, f32), "delta": (t * n, f32)}
        if activation_dtype != f32:
            sizes |= {
                "x_f32": (t * k, f32),
                "delta_cast": (t * n, activation_dtype),
                "rows_out": (t * n, activation_dtype),
            }
        if lora_dtype != f32:
            sizes["weight_f32"] = (max(r * k, n * r), f32)
    return sizes


def workspace_bytes(
    shape: WorkspaceShape, activation_dtype: torch.dtype, lora_dtype: torch.dtype, torch_backend: bool
) -> int:
    """Bytes a `LoraWorkspace` of this configuration allocates (for the memory plan)."""
    sizes = buffer_sizes(shape, activation_dtype, lora_dtype, torch_backend)
    return sum(numel * dtype.itemsize for numel, dtype in sizes.values())


class LoraWorkspace:
    """Preallocated flat buffers; `take(name, rows, cols)` returns a contiguous [rows, cols] view."""

    def __init__(
        self,
        shape: WorkspaceShape,
        activation_dtype: torch.dtype,
        lora_dtype: torch.dtype,
        device: torch.device,
        torch_backend: bool,
    ):
        self.shape = shape
        self._buffers = {
            name: torch.zeros(numel, dtype=dtype, device=device)
            for name, (numel, dtype) in buffer_sizes(
                shape, activation_dtype, lora_dtype, torch_backend
            ).items()
        }

    @classmethod
    def fitting(cls, x: torch.Tensor, rank: int, out_width: int, lora_dtype: torch.dtype) -> LoraWorkspace:
        """A workspace just large enough for one torch-backend call on `x` [T, K]."""
        shape = WorkspaceShape(x.shape[0], x.shape[1], rank, out_width)
        return cls(shape, x.dtype, lora_dtype, x.device, torch_backend=True)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def take(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A contiguous [rows, cols] view at the start of buffer `name` (contents undefined)."""
        buffer = self._buffers.get(name)
        if buffer is None:
            raise ValueError(
                f"this LoRA workspace has no {name!r} buffer (built for another backend or dtype)"
            )
        if rows * cols > buffer.numel():
            raise ValueError(
                f"LoRA workspace buffer {name!r} holds {buffer.numel()} elements, a [{rows}, {cols}] "
                f"view needs {rows * cols}: the step is larger than the workspace was sized for "
                f"({self.shape})"
            )
        return buffer[: rows * cols].view(rows, cols)
