"""Preallocated LoRA slot tensors for every layer, and the per-layer LoRA application.

Layout (DESIGN.md section 4), per layer:
  - A is stacked per fused projection: `a[group]  [max_loras, n_modules * R, in]`, so one shrink
    serves q/k/v (and one gate/up) because they read the same input;
  - B per target module: `b[module]  [max_loras, out, R]`, expanded into its slice of the fused
    output with `out_offset`.
Loading copies into a slot and zeroes only what the previous occupant left beyond the new adapter;
scaling is already folded into B. Nothing is allocated here after construction: the ops'
intermediates live in one `LoraWorkspace` sized for the largest step (`max_tokens`), reused by
every layer.
"""

from __future__ import annotations

import torch

import kernels
from inference_svc.adapters import LoraAdapter
from loraserve.engine_limits import serves
from loraserve.model_summary import ModelConfig

# Fused projections of one decoder layer and the modules stacked in each, in output order.
PROJECTION_GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def group_modules(group: str, shapes: dict) -> tuple[str, ...]:
    """The model's LoRA modules of a fused projection: its parts, or (Phi-3, whose checkpoints and
    adapters hold the fused module) the group's own name, one A and one B."""
    return tuple(m for m in PROJECTION_GROUPS[group] if m in shapes) or ((group,) if group in shapes else ())


def carried_groups(model: ModelConfig, target_modules: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Per fused projection, the model's modules that the engine serves LoRA on."""
    shapes = model.module_shapes()
    groups = {
        group: tuple(m for m in group_modules(group, shapes) if serves(target_modules, m))
        for group in PROJECTION_GROUPS
    }
    return {group: modules for group, modules in groups.items() if modules}


def workspace_shape(
    model: ModelConfig, max_rank: int, target_modules: tuple[str, ...], max_tokens: int
) -> kernels.WorkspaceShape:
    """The largest LoRA op of a step with `max_tokens` tokens, over the fused projections."""
    shapes = model.module_shapes()
    carried = list(carried_groups(model, target_modules).values())
    return kernels.WorkspaceShape(
        max_tokens=max_tokens,
        max_in=max((shapes[modules[0]][0] for modules in carried), default=0),
        max_rank=max((len(modules) * max_rank for modules in carried), default=0),
        max_out=max((shapes[m][1] for modules in carried for m in modules), default=0),
    )


class LoraSlots:
    """Slot tensors for `max_loras` adapters of rank <= `max_rank` on `target_modules`."""

    def __init__(
        self,
        model: ModelConfig,
        max_loras: int,
        max_rank: int,
        target_modules: tuple[str, ...],
        dtype: torch.dtype,
        device: torch.device,
        backend: str = "auto",
        *,
        max_tokens: int,
        activation_dtype: torch.dtype,
    ):
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.backend = backend
        shapes = model.module_shapes()
        self.groups = carried_groups(model, target_modules)
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        # offsets of each module inside its group's fused output and stacked rank dimension
        self.out_offset: dict[str, int] = {}
        self.rank_offset: dict[str, int] = {}
        for group in PROJECTION_GROUPS:
            out = 0
            for m in group_modules(group, shapes):
                self.out_offset[m] = out
                out += shapes[m][1]
        for modules in self.groups.values():
            for i, m in enumerate(modules):
                self.rank_offset[m] = i * max_rank
        for _ in range(model.num_layers):
            a, b = {}, {}
            for group, modules in self.groups.items():
                fan_in = shapes[modules[0]][0]
                a[group] = torch.zeros(max_loras, len(modules) * max_rank, fan_in, dtype=dtype, device=device)
                for m in modules:
                    b[m] = torch.zeros(max_loras, shapes[m][1], max_rank, dtype=dtype, device=device)
            self.a.append(a)
            self.b.append(b)
        # per slot, the rank written into each (layer, module): what the next occupant must clear
        self.written: list[dict[tuple[int, str], int]] = [{} for _ in range(max_loras)]
        self.workspace = kernels.LoraWorkspace(
            workspace_shape(model, max_rank, target_modules, max_tokens),
            activation_dtype,
            dtype,
            device,
            torch_backend=kernels.select_backend(backend, device) == "torch",
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the slot tensors (the workspace is counted apart)."""
        return sum(t.nbytes for layer in (*self.a, *self.b) for t in layer.values())

    def set_slot(self, index: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into slot `index`, zero-padding ranks and modules it does not carry.

        Only what the previous occupant wrote and `adapter` does not overwrite is zeroed (rank
        rows beyond the new rank, modules and layers the new adapter lacks). Copies are
        asynchronous from pinned host memory on CUDA.
        """
        self._check_index(index)
        previous = self.written[index]
        written = {}
        for (layer, module), (a, b) in adapter.weights.items():
            r = a.shape[0]
            if r > self.max_rank:
                raise ValueError(f"adapter rank {r} exceeds the slots' max_lora_rank {self.max_rank}")
            slot_a, slot_b = self._views(index, layer, module)  # [R, in], [out, R]
            slot_a[:r].copy_(a, non_blocking=True)
            slot_b[:, :r].copy_(b, non_blocking=True)
            stale = previous.get((layer, module), 0)
            if stale > r:
                slot_a[r:stale].zero_()
                slot_b[:, r:stale].zero_()
            written[(layer, module)] = r
        for key, stale in previous.items():
            if key not in written:
                slot_a, slot_b = self._views(index, *key)
                slot_a[:stale].zero_()
                slot_b[:, :stale].zero_()
        self.written[index] = written

    def reset_slot(self, index: int) -> None:
        """Zero slot `index` (the base model's output for rows that still point at it)."""
        self._check_index(index)
        for layer_a, layer_b in zip(self.a, self.b):
            for t in (*layer_a.values(), *layer_b.values()):
                t[index].zero_()
        self.written[index] = {}

    def _views(self, index: int, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot `index`'s A rows [max_rank, in] and B [out, max_rank] of one module."""
        group = next(g for g, mods in self.groups.items() if module in mods)
        row = self.rank_offset[module]
        return self.a[layer][group][index, row : row + self.max_rank], self.b[layer][module][index]

    def apply(
        self,
        layer: int,
        group: str,
        y: torch.Tensor,  # [T, fused_out], the base projection's output, updated in place
        x: torch.Tensor,  # [T, in]
        slot_ids: torch.Tensor,  # [T] int32
        meta: kernels.LoraBatchMeta,
    ) -> None:
        """Add every row's adapter delta for the fused projection `group`."""
        modules = self.groups.get(group)
        if modules is None or not meta.has_lora:
            return
        lora_a = self.a[layer][group]  # [S, n*R, in]
        t = kernels.lora_shrink(
            x,
            lora_a,
            slot_ids,
            1.0,
            out=self.workspace.take("shrink_out", x.shape[0], lora_a.shape[1]),
            meta=meta,
            backend=self.backend,
            workspace=self.workspace,
        )  # [T, n*R]
        for m in modules:
            row = self.rank_offset[m]
            kernels.lora_expand(
                y,
                t[:, row : row + self.max_rank],
                self.b[layer][m],
                slot_ids,
                self.out_offset[m],
                meta=meta,
                backend=self.backend,
                workspace=self.workspace,
            )

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.max_loras:
            raise IndexError(f"slot {index} out of range 0..{self.max_loras - 1}")
