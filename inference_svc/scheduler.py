"""Iteration-level scheduling: which sequences run in the next step, and with how many tokens.

Each step takes every running sequence (one decode token, or its next prefill chunk) and then admits
waiting sequences in arrival order while the step has room: `max_num_seqs`, the token budget
`max_num_batched_tokens`, free KV blocks, and at most `max_loras` distinct adapters (a new adapter
needs a free or evictable slot). A waiting sequence whose adapter cannot get a slot may be passed by
later ones, but only `aging_limit` times: after that nothing behind it is admitted until it is, so
no adapter starves. When KV blocks run out mid-decode, the newest running sequence is preempted
(its blocks freed, to be recomputed) rather than failing anyone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from inference_svc import errors
from inference_svc.adapter_cache import AdapterCache
from inference_svc.config import EngineConfig
from inference_svc.kv_cache import BlockTable, KVCache
from inference_svc.sampling import SamplingParams
from inference_svc.tokenizer import IncrementalDecoder

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state across steps."""

    request_id: str
    adapter_id: str | None
    prompt_ids: list[int]
    params: SamplingParams
    decoder: IncrementalDecoder
    generator: torch.Generator | None  # a seeded request's own; None = the engine's
    arrival: int  # arrival order
    arrival_time: float
    output_ids: list[int] = field(default_factory=list)
    block_table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0  # tokens whose K/V are in the cache
    slot: int = -1  # LoRA slot while running
    status: str = WAITING
    skipped: int = 0  # times passed over for want of a slot
    finish_reason: str | None = None
    emitted_chars: int = 0  # text returned so far (stop strings hold some back)
    first_token_time: float | None = None

    def token_slice(self, begin: int, end: int) -> list[int]:
        """Tokens [begin, end) of prompt + output, without concatenating the two."""
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[begin:end]
        if begin >= prompt:
            return self.output_ids[begin - prompt : end - prompt]
        return self.prompt_ids[begin:] + self.output_ids[: end - prompt]

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # new tokens this step: num_computed .. num_computed + num_tokens


@dataclass(frozen=True)
class StepRecord:
    """What one step ran: the scheduler's own record, for tests and metrics."""

    num_seqs: int
    num_tokens: int
    adapters: frozenset  # distinct adapter ids (None = base) in the step
    slots: frozenset  # distinct slots >= 0 in the step


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCache, adapters: AdapterCache, aging_limit: int = 8):
        self.config = config
        self.kv = kv
        self.adapters = adapters
        self.aging_limit = aging_limit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.history: deque[StepRecord] = deque(maxlen=4096)
        self.failed: list[tuple[Sequence, Exception]] = []  # drained by the engine each step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledChunk]:
        """Pick this step's chunks. Sequences whose adapter failed to load land in `failed`."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[Sequence] = set()  # the sequences of `chunks`: never preempted this step
        for seq in list(self.running):
            if seq.status != RUNNING:
                continue
            n = min(seq.total_len - seq.num_computed, budget)
            if n <= 0:
                continue
            scheduled.add(seq)
            while not self.kv.allocate(seq.block_table, seq.num_computed + n):
                if not self._preempt_newest(keep=scheduled):
                    scheduled.discard(seq)
                    self._preempt(seq)  # nothing left to take blocks from: this one waits too
                    break
            else:
                chunks.append(ScheduledChunk(seq, n))
                budget -= n
        self._admit(chunks, budget)
        slots = frozenset(c.seq.slot for c in chunks if c.seq.slot >= 0)
        assert len(slots) <= self.config.max_loras, "more distinct adapters than slots in a step"
        self.history.append(
            StepRecord(
                len(chunks),
                sum(c.num_tokens for c in chunks),
                frozenset(c.seq.adapter_id for c in chunks),
                slots,
            )
        )
        return chunks

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_num_seqs or budget <= 0:
                return
            n = min(seq.total_len - seq.num_computed, budget)
            blocks = self.kv.blocks_needed(seq.num_computed + n) - len(seq.block_table)
            if blocks > self.kv.num_free_blocks:
                return  # capacity is FCFS: nobody jumps a sequence that waits for memory
            if seq.adapter_id is not None:
                try:
                    slot = self.adapters.acquire_slot(seq.adapter_id)
                    if slot is None:
                        self.adapters.check_slot_reachable(seq.adapter_id)  # pins came after it queued
                except errors.LoraServeError as e:  # the adapter cannot be loaded, or never get a slot
                    self.waiting.remove(seq)
                    self.failed.append((seq, e))
                    continue
                if slot is None:
                    seq.skipped += 1
                    if seq.skipped >= self.aging_limit:
                        return  # aged: hold everyone behind it until a slot frees
                    continue
                seq.slot = slot
            self.kv.allocate(seq.block_table, seq.num_computed + n)
            self.waiting.remove(seq)
            seq.status = RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n

    def _preempt_newest(self, keep: set) -> bool:
        for seq in reversed(self.running):
            if seq not in keep:
                self._preempt(seq)
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and slot; it is recomputed when admitted again."""
        self.running.remove(seq)
        self.kv.free(seq.block_table)
        seq.num_computed = 0
        self._release_slot(seq)
        seq.status = WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence from whichever queue holds it, freeing its KV blocks and slot."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.block_table)
        self._release_slot(seq)
        seq.status = FINISHED
        seq.finish_reason = reason

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.adapters.release_slot(seq.adapter_id)
            seq.slot = -1

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)
