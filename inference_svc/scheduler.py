"""Iteration-level scheduling: which sequences run in the next step, and with how many tokens.

Each step takes every running sequence (one decode token, or its next prefill chunk) and then admits
waiting sequences in arrival order while the step has room: `max_num_seqs`, the token budget
`max_num_batched_tokens` and free KV blocks (memory is first come, first served: nobody passes a
sequence that waits for KV blocks). When KV blocks run out mid-decode, the newest running sequence
is preempted (its blocks freed, to be recomputed) rather than failing anyone.

Adapters: at most `max_loras` distinct ones per step, one per slot. A sequence that waits for its
adapter never holds back the sequences behind it:
  - not in the host tier: it waits while the loader reads the files (the read started when the
    request was queued; one that fails fails exactly the requests waiting for that adapter);
  - in a slot: admitted, unless its adapter is yielding (below);
  - in the host tier without a slot: it waits for a free slot - an unused one, or one whose
    adapter has no running requests, no pin, and is yielding or has nothing waiting. Free slots
    go to the adapters that have waited longest, counted in steps from the first step the adapter
    was passed over for want of a slot (waiting for a read does not count).
Rotation (bounded wait, as in S-LoRA / LoRAX): for every adapter that has waited `aging_limit`
steps or more, one slot holder yields - the one that has held its slot longest, pins excepted. A
yielding adapter admits no new requests; its running ones finish, its slot becomes free and goes to
the longest waiter, and its own waiting requests then wait like any other adapter's. Holders yield
only while waiters need them (decided after each step's admissions, for the next step). With
`n` adapters wanting slots, an adapter waits at most about `aging_limit` + ceil(n / max_loras)
rounds of one request's length; base-model requests and requests for adapters in a slot that is
not yielding are admitted meanwhile.
"""

from __future__ import annotations

import itertools
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
    finish_reason: str | None = None
    emitted_chars: int = 0  # text returned so far (stop strings hold some back)
    first_token_time: float | None = None
    started: bool = False  # scheduled at least once
    rope_len: int = 0  # the rope length of a recompute past the prompt (Phi-3 LongRoPE); 0 = none

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
class Schedule:
    """What `Scheduler.schedule` decided for one step."""

    chunks: list[ScheduledChunk]
    failed: list[tuple[Sequence, Exception]]  # taken out of the queue: their adapter failed to load
    record: StepRecord


@dataclass(frozen=True)
class StepRecord:
    """What one step ran: the scheduler's own record, for tests and metrics."""

    num_seqs: int
    num_tokens: int
    adapters: frozenset  # distinct adapter ids (None = base) in the step
    slots: frozenset  # distinct slots >= 0 in the step
    preemptions_total: int = 0  # sequences preempted (KV blocks freed, to recompute) so far


class Scheduler:
    """Owns the waiting queue and the running set; asks `AdapterCache` for loads and slots.

    Args:
        aging_limit: steps an adapter may wait for a slot before a slot holder yields to it.
    """

    def __init__(
        self,
        config: EngineConfig,
        kv: KVCache,
        adapters: AdapterCache,
        aging_limit: int = 8,
        rope_recompute_len: int = 0,
    ):
        """`rope_recompute_len` L > 0: a sequence whose cache holds <= L positions (with short
        rope) and that grows past L is recomputed whole with the long rope, as transformers' Phi-3
        `prepare_inputs_for_generation` does."""
        self.config = config
        self.rope_recompute_len = rope_recompute_len
        self.kv = kv
        self.adapters = adapters
        self.aging_limit = aging_limit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.history: deque[StepRecord] = deque(maxlen=4096)
        self._failed: list[tuple[Sequence, Exception]] = []  # this schedule() call's failures
        self.steps = 0  # schedule() calls so far
        self.preemptions = 0  # sequences preempted so far
        self.slot_wait_since: dict[str, int] = {}  # adapter without a slot -> step it was first passed over
        self.yielding: dict[str, None] = {}  # slot holders admitting nothing new, in the order they yielded

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Schedule:
        """Pick this step's chunks; sequences whose adapter failed to load come back as `failed`
        (out of every queue; the caller retires them)."""
        self.steps += 1
        self._failed = []
        for adapter_id, error in self.adapters.install_loaded().items():
            self._fail_waiting(adapter_id, error)
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[Sequence] = set()  # the sequences of `chunks`: never preempted this step
        for seq in list(self.running):
            if seq.status != RUNNING:
                continue
            limit = self.rope_recompute_len
            if limit and 0 < seq.num_computed <= limit < seq.total_len:
                if max(len(seq.prompt_ids), seq.rope_len) <= limit:  # its keys have the short rope
                    seq.num_computed, seq.rope_len = 0, seq.total_len
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
        self._rotate_slots()
        slots = frozenset(c.seq.slot for c in chunks if c.seq.slot >= 0)
        assert len(slots) <= self.config.max_loras, "more distinct adapters than slots in a step"
        record = StepRecord(
            len(chunks),
            sum(c.num_tokens for c in chunks),
            frozenset(c.seq.adapter_id for c in chunks),
            slots,
            self.preemptions,
        )
        self.history.append(record)
        return Schedule(chunks, self._failed, record)

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        admissible, keep = self._slot_plan()
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_num_seqs or budget <= 0:
                return
            if seq.adapter_id is not None and seq.adapter_id not in admissible:
                continue  # waits for a read or a slot without holding back anyone behind it
            n = min(seq.total_len - seq.num_computed, budget)
            blocks = self.kv.blocks_needed(seq.num_computed + n) - len(seq.block_table)
            if blocks > self.kv.num_free_blocks:
                return  # capacity is FCFS: nobody jumps a sequence that waits for memory
            if seq.adapter_id is not None:
                seq.slot = self.adapters.acquire_slot(seq.adapter_id, keep)
                assert seq.slot is not None, "a slot counted free was not"
            self.kv.allocate(seq.block_table, seq.num_computed + n)
            self.waiting.remove(seq)
            seq.status = RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n

    def _slot_plan(self) -> tuple[set[str], set[str]]:
        """Adapters whose waiting requests may be admitted this step, and the slot holders whose
        slots stay theirs (they have admissible requests). Starts reads for adapters not in the
        host tier; fails requests whose adapter was unregistered or can never get a slot."""
        cache = self.adapters
        admissible: set[str] = set()
        wanting: list[str] = []  # in the host tier, no slot: in arrival order of their first request
        waiting_for: set[str] = set()
        for seq in list(self.waiting):
            adapter_id = seq.adapter_id
            if adapter_id is None or adapter_id in waiting_for:
                continue
            waiting_for.add(adapter_id)
            if adapter_id in cache.slot_of:
                if adapter_id not in self.yielding:
                    admissible.add(adapter_id)
                continue
            try:
                cache.check_slot_reachable(adapter_id)  # pins may have come after it queued
                if cache.prefetch(adapter_id) is None:  # None: in the host tier
                    wanting.append(adapter_id)
            except errors.LoraServeError as e:  # unregistered meanwhile, or every slot pinned
                self._fail_waiting(adapter_id, e)
        for adapter_id in [a for a in self.slot_wait_since if a not in waiting_for or a in cache.slot_of]:
            del self.slot_wait_since[adapter_id]
        wanting.sort(key=lambda a: self.slot_wait_since.get(a, self.steps))  # stable: ties by arrival
        keep = set(admissible)
        granted = wanting[: cache.free_slots(keep)]
        for adapter_id in wanting[len(granted) :]:
            self.slot_wait_since.setdefault(adapter_id, self.steps)
        cache.touch(reversed(wanting))  # the longest waiter is the last the host tier evicts
        return admissible | set(granted), keep

    def _rotate_slots(self) -> None:
        """After admissions: one yielding slot holder per adapter that has waited `aging_limit`
        steps for a slot (holders that yielded and lost their slot are done yielding)."""
        holders = self.adapters.slot_of
        self.yielding = {a: None for a in self.yielding if a in holders}
        starving = sum(
            1
            for adapter_id, since in self.slot_wait_since.items()
            if adapter_id not in holders and self.steps - since >= self.aging_limit
        )
        while len(self.yielding) > starving:  # the waiter it yielded for is gone
            del self.yielding[next(reversed(self.yielding))]
        candidates = (
            a
            for a in self.adapters.holders_oldest_first()
            if a not in self.yielding and a not in self.adapters.pinned
        )
        for adapter_id in itertools.islice(candidates, max(0, starving - len(self.yielding))):
            self.yielding[adapter_id] = None

    def _fail_waiting(self, adapter_id: str, error: Exception) -> None:
        """Fail every waiting sequence for `adapter_id` (its read failed, or it can never run)."""
        failing = [seq for seq in self.waiting if seq.adapter_id == adapter_id]
        for seq in failing:
            self.waiting.remove(seq)
            self._failed.append((seq, error))

    def _preempt_newest(self, keep: set) -> bool:
        for seq in reversed(self.running):
            if seq not in keep:
                self._preempt(seq)
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and slot; it is recomputed when admitted again."""
        self.running.remove(seq)
        self.preemptions += 1
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
