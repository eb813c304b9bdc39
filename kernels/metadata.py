"""Per-step grouping of tokens by LoRA slot, computed once and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class LoraBatchMeta:
    """Tokens of one step grouped by slot (a stable sort of `slot_ids`).

    Built once per scheduling step by `make_batch_meta`; every LoRA op of every layer reads it,
    so no op sorts or synchronises on its own.
    """

    num_tokens: int
    sorted_token_ids: torch.Tensor  # [T] int64, token indices ordered by slot (stable)
    active_slots: torch.Tensor  # [A] int32, distinct slots >= 0 present in the step
    tokens_per_slot: torch.Tensor  # [A] int32, tokens of each active slot
    segment_starts: torch.Tensor  # [A] int32, offset of each active slot in sorted_token_ids
    host_groups: tuple[tuple[int, torch.Tensor], ...]  # (slot, token indices) for host loops
    in_order: bool  # tokens already grouped by ascending slot: sorted_token_ids is 0..T-1

    def groups(self) -> tuple[tuple[int, torch.Tensor], ...]:
        """(slot, [n] int64 token indices) for every active slot, in slot order."""
        return self.host_groups

    @property
    def has_lora(self) -> bool:
        return len(self.host_groups) > 0

    @property
    def num_active(self) -> int:
        """Number of distinct slots >= 0 in the step (A)."""
        return len(self.host_groups)

    @cached_property
    def max_tokens_per_slot(self) -> int:
        """Largest token count of any active slot (0 if none); sizes kernel grids, no device sync."""
        return max((len(rows) for _, rows in self.host_groups), default=0)

    @cached_property
    def host_segments(self) -> tuple[tuple[int, int, int], ...]:
        """(slot, begin, end) of each active slot's run inside `sorted_token_ids`, for host loops."""
        segments, begin = [], None
        for slot, rows in self.host_groups:
            begin = self.num_tokens - sum(len(r) for _, r in self.host_groups) if begin is None else begin
            segments.append((slot, begin, begin + len(rows)))
            begin += len(rows)
        return tuple(segments)

    @cached_property
    def uniform_run(self) -> tuple[int, int, int] | None:
        """(first_slot, end_slot, tokens_each) when the active slots are consecutive and each has
        the same number of tokens (the usual decode step): the ops then run one batched matmul over
        the slot tensors' own memory, with no gather and no per-slot loop. None otherwise."""
        segments = self.host_segments
        if not segments:
            return None
        first, last = segments[0][0], segments[-1][0]
        each = segments[0][2] - segments[0][1]
        if last - first + 1 != len(segments) or any(e - b != each for _, b, e in segments):
            return None
        return first, last + 1, each

    @property
    def max_active_slot(self) -> int:
        """Largest active slot index (-1 if none); lets ops bounds-check slots without a sync."""
        return self.host_groups[-1][0] if self.host_groups else -1


def make_batch_meta(slot_ids: torch.Tensor, host_slot_ids: np.ndarray | None = None) -> LoraBatchMeta:
    """Group the tokens of `slot_ids` ([T] int32, -1 = no adapter) by slot.

    `host_slot_ids` is the same map in host memory, when the caller has it (the engine builds it):
    the grouping then runs on the host, with no device round trip.
    """
    if slot_ids.dim() != 1:
        raise ValueError(f"slot_ids must be 1-D, got shape {tuple(slot_ids.shape)}")
    if host_slot_ids is None:
        host_slot_ids = slot_ids.cpu().numpy()
    ids = host_slot_ids.astype(np.int64)
    order = np.argsort(ids, kind="stable")  # [T]
    sorted_ids = ids[order]
    bounds = np.flatnonzero(np.diff(sorted_ids)) + 1
    starts = np.concatenate(([0], bounds)) if len(ids) else bounds  # [distinct] run starts
    counts = np.diff(np.concatenate((starts, [len(ids)])))
    slots = sorted_ids[starts]
    keep = slots >= 0
    active, counts, starts = slots[keep], counts[keep], starts[keep]
    device_order = torch.from_numpy(order).to(slot_ids.device, non_blocking=True)
    host_groups = tuple(
        (int(s), device_order[int(b) : int(b) + int(n)]) for s, b, n in zip(active, starts, counts)
    )

    def on_device(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values.astype(np.int32)).to(slot_ids.device, non_blocking=True)

    return LoraBatchMeta(
        num_tokens=int(slot_ids.shape[0]),
        sorted_token_ids=device_order,
        active_slots=on_device(active),
        tokens_per_slot=on_device(counts),
        segment_starts=on_device(starts),
        host_groups=host_groups,
        in_order=bool(np.array_equal(order, np.arange(len(order)))),
    )
