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
    # Fixed launch grids (CUDA graphs): kernels run for at least this many slots and tokens per
    # slot, whatever this step holds; the padding entries of active_slots are -1 and exit at once.
    grid_slots: int = 0
    grid_tokens: int = 0

    def groups(self) -> tuple[tuple[int, torch.Tensor], ...]:
        """(slot, [n] int64 token indices) for every active slot, in slot order."""
        return self.host_groups

    @property
    def has_lora(self) -> bool:
        """Whether the kernels run at all: some slot is active, or grids are fixed."""
        return self.num_active > 0

    @property
    def num_active(self) -> int:
        """Slots the kernel grids cover (A): the distinct slots >= 0 in the step, or grid_slots."""
        return max(len(self.host_groups), self.grid_slots)

    @cached_property
    def max_tokens_per_slot(self) -> int:
        """Largest token count of any active slot (0 if none), or grid_tokens; sizes kernel grids
        with no device sync."""
        return max(max((len(rows) for _, rows in self.host_groups), default=0), self.grid_tokens)

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
    order, active, counts, starts = _group(host_slot_ids)
    device_order = _to(order, torch.int64, slot_ids.device)
    return LoraBatchMeta(
        num_tokens=int(slot_ids.shape[0]),
        sorted_token_ids=device_order,
        active_slots=_to(active, torch.int32, slot_ids.device),
        tokens_per_slot=_to(counts, torch.int32, slot_ids.device),
        segment_starts=_to(starts, torch.int32, slot_ids.device),
        host_groups=_host_groups(device_order, active, counts, starts),
        in_order=bool(np.array_equal(order, np.arange(len(order)))),
    )


class LoraMetaBuffers:
    """Fixed-address metadata tensors for steps replayed from CUDA graphs (allocated once)."""

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device):
        self.max_slots = max_slots
        self.sorted_token_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # [max_tokens]
        self.active_slots = torch.full((max_slots,), -1, dtype=torch.int32, device=device)  # [max_slots]
        self.tokens_per_slot = torch.zeros(max_slots, dtype=torch.int32, device=device)
        self.segment_starts = torch.zeros(max_slots, dtype=torch.int32, device=device)

    def fill(self, host_slot_ids: np.ndarray) -> LoraBatchMeta:
        """The metadata of `host_slot_ids` ([T] int32) written into the buffers, with grids fixed
        at every slot and T tokens per slot (so one captured launch fits any step of T tokens)."""
        num_tokens = len(host_slot_ids)
        order, active, counts, starts = _group(host_slot_ids)
        if len(active) > self.max_slots:
            raise ValueError(f"{len(active)} active slots exceed the {self.max_slots} the buffers hold")

        def padded(values: np.ndarray, fill: int) -> torch.Tensor:
            out = np.full(self.max_slots, fill, dtype=np.int32)
            out[: len(values)] = values
            return torch.from_numpy(out)

        sorted_ids = self.sorted_token_ids[:num_tokens]
        sorted_ids.copy_(torch.from_numpy(order), non_blocking=True)
        self.active_slots.copy_(padded(active, -1), non_blocking=True)
        self.tokens_per_slot.copy_(padded(counts, 0), non_blocking=True)
        self.segment_starts.copy_(padded(starts, 0), non_blocking=True)
        return LoraBatchMeta(
            num_tokens=num_tokens,
            sorted_token_ids=sorted_ids,
            active_slots=self.active_slots,
            tokens_per_slot=self.tokens_per_slot,
            segment_starts=self.segment_starts,
            host_groups=_host_groups(sorted_ids, active, counts, starts),
            in_order=bool(np.array_equal(order, np.arange(num_tokens))),
            grid_slots=self.max_slots,
            grid_tokens=num_tokens,
        )


def _group(host_slot_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(order [T], active slots [A], their token counts [A], their run starts in order [A])."""
    ids = host_slot_ids.astype(np.int64)
    order = np.argsort(ids, kind="stable")  # [T]
    sorted_ids = ids[order]
    bounds = np.flatnonzero(np.diff(sorted_ids)) + 1
    starts = np.concatenate(([0], bounds)) if len(ids) else bounds  # [distinct] run starts
    counts = np.diff(np.concatenate((starts, [len(ids)])))
    keep = sorted_ids[starts] >= 0
    return order, sorted_ids[starts][keep], counts[keep], starts[keep]


def _host_groups(
    device_order: torch.Tensor, active: np.ndarray, counts: np.ndarray, starts: np.ndarray
) -> tuple[tuple[int, torch.Tensor], ...]:
    return tuple((int(s), device_order[int(b) : int(b) + int(n)]) for s, b, n in zip(active, starts, counts))


def _to(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(values).to(device=device, dtype=dtype, non_blocking=True)
