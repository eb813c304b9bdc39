"""The offline engine: requests in, tokens out, one scheduling step at a time.

`LLMEngine.step()` asks the scheduler for a batch, runs one forward pass where every row uses its
own adapter slot (or none), samples, and returns a `RequestOutput` per sequence that produced a
token, finished, or failed. The gRPC service drives the same object from one thread.

The engine is the one owner of a request's lifecycle (`sequences`, the request table; the
scheduler holds the same sequences in its queues). Observers (metrics, the async bridge) learn
what happened from `run_step()`'s `EngineStep` - the scheduler's record, the outputs, and the
`RequestEvent`s (queued, started, first token, finished with its reason: stop, length, abort,
error) since the last record - or from `take_events()` between steps; they never diff its dicts.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from inference_svc import errors
from inference_svc.adapter_cache import HOST_LRU, AdapterCache, ResidencyEvent, ResidentAdapter
from inference_svc.config import EngineConfig
from inference_svc.cuda_graphs import DecodeGraphs
from inference_svc.forward_batch import SequenceChunk, StepInputs
from inference_svc.generation_config import GenerationConfig
from inference_svc.kv_cache import BlockTable, KVCache
from inference_svc.lora_slots import LoraSlots
from inference_svc.memory_plan import MemoryPlan, compute_plan, dtype_name
from inference_svc.model import CausalLM
from inference_svc.sampling import SampledToken, SamplingParams, sample
from inference_svc.scheduler import Scheduler, Sequence, StepRecord
from inference_svc.tokenizer import IncrementalDecoder, Prompt, PromptEncoder, load_tokenizer
from loraserve.model_summary import ModelConfig
from loraserve.peft_format import AdapterFiles, AdapterManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    token: SampledToken | None  # None when the request failed or was aborted
    text: str  # text delta (held back near a possible stop string)
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "abort" | "error"
    usage: Usage
    adapter_id: str | None
    error: Exception | None = None
    logits: torch.Tensor | None = None  # [V] float32, only when engine.record_logits is set


@dataclass(frozen=True)
class RequestEvent:
    """One change in a request's life, as the engine saw it."""

    kind: str  # "queued" | "started" (first scheduled) | "first_token" | "finished"
    request_id: str
    adapter_id: str | None
    at: float  # time.monotonic()
    arrival: float  # time.monotonic() when the request was queued
    prompt_tokens: int
    completion_tokens: int = 0
    first_token_at: float | None = None
    reason: str | None = None  # "finished": "stop" | "length" | "abort" | "error"


@dataclass(frozen=True)
class EngineStep:
    """What one `run_step()` did: the scheduler's record (None: nothing was scheduled, or only
    failures), the outputs, and every request event since the previous record."""

    record: StepRecord | None
    outputs: list[RequestOutput]
    events: list[RequestEvent]

    @property
    def ran(self) -> bool:
        return self.record is not None and self.record.num_seqs > 0


@dataclass(frozen=True)
class Completion:
    """A whole finished request, as returned by `LLMEngine.generate`."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


class LLMEngine:
    """One base model, its KV cache, its LoRA slots and host cache, and the scheduler."""

    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig,
        on_residency_change: Callable[[ResidencyEvent], None] | None = None,
        host_eviction: str = HOST_LRU,
    ):
        """`host_eviction`: who chooses host-cache victims (`adapter_cache.HOST_LRU` standalone,
        `HOST_BY_MANAGER` for a replica of an adapter manager)."""
        self.config = config
        self.model_dir = Path(model_dir)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.device = config.resolved_device()
        self.plan: MemoryPlan = compute_plan(self.model_config, config)
        log.info("memory plan:\n%s", self.plan.render())
        dtype = config.model_dtype(self.model_config.torch_dtype)
        lora_dtype = config.slot_dtype(dtype)
        self.max_model_len = self.plan.max_model_len
        self.model = CausalLM.load(
            model_dir,
            self.model_config,
            dtype,
            self.device,
            self.max_model_len,
            config.max_num_batched_tokens,
            config.attention_backend,
        )
        self.tokenizer = load_tokenizer(model_dir)
        self.generation_config = GenerationConfig.from_dir(model_dir)
        # end-of-sequence ids of config.json, generation_config.json and the tokenizer: all stop
        self.eos_token_ids = frozenset(
            (
                *self.model_config.eos_token_ids,
                *self.generation_config.eos_token_ids,
                *self.tokenizer.eos_token_ids,
            )
        )
        self.kv = KVCache(
            self.model_config,
            self.plan.kv_cache_blocks,
            config.kv_block_size,
            dtype,
            self.device,
            max_tables=config.max_num_seqs,
            max_blocks_per_table=-(-self.max_model_len // config.kv_block_size),
            padding=self._uses_cuda_graphs(),
        )
        # prompts -> ids, refusing text that cannot fit; thread-safe (AsyncEngine runs it off this thread)
        self.prompt_encoder = PromptEncoder(self.tokenizer, self._max_prompt_tokens())
        self.inputs = StepInputs(
            self.kv, config.max_num_batched_tokens, config.max_num_seqs, self.device, config.max_loras
        )
        self.lora = LoraSlots(
            self.model_config,
            config.max_loras,
            config.max_lora_rank,
            config.lora_target_modules,
            lora_dtype,
            self.device,
            config.lora_backend,
            max_tokens=config.max_num_batched_tokens,
            activation_dtype=dtype,
        )
        # decode steps replayed from CUDA graphs, captured by warm_up()
        self.graphs = (
            DecodeGraphs(self.model, self.kv, self.lora, self.inputs, config.max_num_seqs)
            if self._uses_cuda_graphs()
            else None
        )
        self.adapters = AdapterCache(
            self.model_config, config, self.lora, lora_dtype, on_residency_change, host_eviction
        )
        self.scheduler = Scheduler(
            config, self.kv, self.adapters, rope_recompute_len=self.model_config.rope_recompute_len
        )
        self.sequences: dict[str, Sequence] = {}  # request id -> its sequence, until it finishes
        self._events: list[RequestEvent] = []  # since the last run_step() / take_events()
        self.record_logits = False  # attach each sampled row's logits to its RequestOutput
        self._arrivals = itertools.count()
        self._generator = torch.Generator(device=self.device).manual_seed(0)  # unseeded requests
        log.info(
            "allocated: KV cache %d blocks x %d tokens, %d LoRA slots (rank %d, %s), %s",
            self.kv.num_blocks,
            self.kv.block_size,
            config.max_loras,
            config.max_lora_rank,
            dtype_name(lora_dtype),
            self.device,
        )

    # --- adapters -------------------------------------------------------------------------

    def register_adapter(
        self, adapter_id: str, path: str | Path, files: AdapterFiles | None = None
    ) -> AdapterManifest:
        """Validate and remember an adapter directory; `files`: its contents, not yet on disk."""
        return self.adapters.register(adapter_id, path, files)

    def unregister_adapter(self, adapter_id: str) -> None:
        self.adapters.unregister(adapter_id)

    def load_adapter(
        self, adapter_id: str, to_slot: bool = False, pin: bool | None = None, wait: bool = True
    ) -> ResidentAdapter | None:
        """Into the host cache (and a slot with `to_slot`); `pin` True pins, False unpins.

        The loader thread reads the files; `wait` blocks until it is done. Without `wait` (on the
        engine thread) the answer is None while the read runs: see `AsyncEngine.load_adapter`.
        """
        return self.adapters.load(adapter_id, to_slot=to_slot, pin=pin, wait=wait)

    def evict_adapter(self, adapter_id: str) -> bool:
        return self.adapters.evict(adapter_id)

    def list_resident_adapters(self) -> list[ResidentAdapter]:
        return self.adapters.list_resident()

    # --- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        adapter_id: str | None = None,
    ) -> None:
        """Queue a request; raises InvalidRequest / AdapterNotFound / NoEvictableSlot / QueueFull up front.

        An adapter not in the host cache starts loading now, on the loader thread.
        """
        if request_id in self.sequences:
            raise errors.RequestAlreadyExists(f"request {request_id!r} is already in flight")
        adapter_id = adapter_id or None
        if adapter_id is not None and not self.adapters.knows(adapter_id):
            raise errors.AdapterNotFound(adapter_id)
        params.validate(self.model_config.vocab_size)
        ids = self.prompt_encoder.encode(prompt)  # token ids pass through as they are
        self._check_prompt(ids, params)
        if adapter_id is not None:
            self.adapters.check_slot_reachable(adapter_id)
        if len(self.scheduler.waiting) >= self.config.max_queue_len:
            raise errors.QueueFull(f"the waiting queue is full (max_queue_len={self.config.max_queue_len})")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(
            request_id=request_id,
            adapter_id=adapter_id,
            prompt_ids=ids,
            params=params,
            decoder=IncrementalDecoder(self.tokenizer),
            generator=gen,
            arrival=next(self._arrivals),
            arrival_time=time.monotonic(),
        )
        if adapter_id is not None:
            self.adapters.prefetch(adapter_id)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        self._event("queued", seq)

    def _max_prompt_tokens(self) -> int:
        """The most tokens any prompt may have: the sequence limit less one generated token, and
        max_prompt_tokens."""
        longest = min(self.max_model_len, self.kv.num_blocks * self.kv.block_size) - 1
        if self.config.max_prompt_tokens is not None:
            longest = min(longest, self.config.max_prompt_tokens)
        return longest

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """Length limits first (cheap), then each id's range (linear, but in a bounded prompt)."""
        if not ids:
            raise errors.InvalidRequest("prompt", "must contain at least one token")
        if self.config.max_prompt_tokens is not None and len(ids) > self.config.max_prompt_tokens:
            raise errors.PromptTooLong(
                "prompt", f"{len(ids)} tokens exceed max_prompt_tokens ({self.config.max_prompt_tokens})"
            )
        if self.config.max_output_tokens is not None and params.max_tokens > self.config.max_output_tokens:
            raise errors.InvalidRequest(
                "max_tokens",
                f"{params.max_tokens} exceeds max_output_tokens ({self.config.max_output_tokens})",
            )
        limit = min(self.max_model_len, self.kv.num_blocks * self.kv.block_size)
        if len(ids) + params.max_tokens > limit:
            raise errors.PromptTooLong(
                "max_tokens",
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"sequence limit ({limit} tokens)",
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise errors.InvalidRequest("token_ids", f"ids must be in 0..{vocab - 1}")

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now, freeing its KV blocks and slot reference. False if unknown."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return False
        self._retire(seq, "abort")
        return True

    def abort_all(self) -> list[str]:
        """Abort every request in flight; -> their ids."""
        aborted = list(self.sequences)
        for request_id in aborted:
            self.abort_request(request_id)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def take_events(self) -> list[RequestEvent]:
        """The request events since the last call (or the last `run_step()`)."""
        events, self._events = self._events, []
        return events

    def _event(self, kind: str, seq: Sequence, reason: str | None = None) -> None:
        self._events.append(
            RequestEvent(
                kind,
                seq.request_id,
                seq.adapter_id,
                time.monotonic(),
                seq.arrival_time,
                len(seq.prompt_ids),
                len(seq.output_ids),
                seq.first_token_time,
                reason,
            )
        )

    def _retire(self, seq: Sequence, reason: str) -> None:
        """The one exit of a request: out of the scheduler and the request table, with an event."""
        self.scheduler.finish(seq, reason)
        del self.sequences[seq.request_id]
        self._event("finished", seq, reason)

    # --- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling step; -> an output per request that produced a token, finished or failed."""
        return self.run_step().outputs

    def run_step(self) -> EngineStep:
        """One scheduling step and its record (see the module docstring)."""
        schedule = self.scheduler.schedule()
        outputs = [self._fail(seq, err) for seq, err in schedule.failed]
        outputs += self._run(schedule.chunks)
        return EngineStep(schedule.record, outputs, self.take_events())

    def _run(self, chunks) -> list[RequestOutput]:
        if not chunks:
            return []
        for c in chunks:
            if not c.seq.started:
                c.seq.started = True
                self._event("started", c.seq)
        seq_chunks = [
            SequenceChunk(
                token_ids=c.seq.token_slice(c.seq.num_computed, c.seq.num_computed + c.num_tokens),
                start_pos=c.seq.num_computed,
                block_table=c.seq.block_table,
                slot=c.seq.slot,
                want_logits=c.seq.num_computed + c.num_tokens == c.seq.total_len,
                prompt_len=max(len(c.seq.prompt_ids), c.seq.rope_len),
            )
            for c in chunks
        ]
        if self.graphs is not None and self.graphs.fits(seq_chunks):
            logits = self.graphs.run(seq_chunks)  # [n_sampling, V]
        else:
            logits = self.model.forward(self.inputs.build(seq_chunks), self.kv, self.lora)
        sampling = []
        for c, sc in zip(chunks, seq_chunks):
            c.seq.num_computed += c.num_tokens
            if sc.want_logits:
                sampling.append(c.seq)
        if not sampling:
            return []
        tokens = sample(
            logits,
            [s.params for s in sampling],
            [s.generator for s in sampling],
            self._generator,
            [s.prompt_ids for s in sampling],
            [s.output_ids for s in sampling],
        )
        return [
            self._append(seq, tok, logits[i].clone() if self.record_logits else None)
            for i, (seq, tok) in enumerate(zip(sampling, tokens))
        ]

    def _append(self, seq: Sequence, tok: SampledToken, logits: torch.Tensor | None) -> RequestOutput:
        seq.output_ids.append(tok.token_id)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            self._event("first_token", seq)
        seq.decoder.push(tok.token_id)
        p = seq.params
        reason = None
        text = seq.decoder.text
        # text before emitted_chars holds no stop string, so only its tail needs searching
        found = (text.find(s, max(0, seq.emitted_chars - len(s) + 1)) for s in p.stop)
        stop_at = min((i for i in found if i >= 0), default=-1)
        if stop_at >= 0:
            text, reason = text[:stop_at], "stop"
        elif tok.token_id in p.stop_token_ids:
            reason = "stop"
        elif not p.ignore_eos and tok.token_id in self.eos_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is None:
            hold = max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be starting
            end = max(seq.emitted_chars, len(text) - hold)
        else:
            end = len(text)
        delta = text[seq.emitted_chars : end]
        seq.emitted_chars = max(seq.emitted_chars, end)
        if reason is not None:
            self._retire(seq, reason)
        return RequestOutput(
            request_id=seq.request_id,
            token=tok,
            text=delta,
            finished=reason is not None,
            finish_reason=reason,
            usage=Usage(len(seq.prompt_ids), len(seq.output_ids)),
            adapter_id=seq.adapter_id,
            logits=logits,
        )

    def _fail(self, seq: Sequence, err: Exception) -> RequestOutput:
        self._retire(seq, "error")
        return RequestOutput(
            request_id=seq.request_id,
            token=None,
            text="",
            finished=True,
            finish_reason="error",
            usage=Usage(len(seq.prompt_ids), len(seq.output_ids)),
            adapter_id=seq.adapter_id,
            error=err,
        )

    # --- conveniences ---------------------------------------------------------------------

    def generate(
        self,
        prompts: Iterable[str | list[int]],
        params: SamplingParams,
        adapter_ids: Iterable[str | None] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion in one continuous batch; results in prompt order."""
        prompts = list(prompts)
        adapter_ids = list(adapter_ids) if adapter_ids is not None else [None] * len(prompts)
        ids = [f"generate-{next(self._arrivals)}" for _ in prompts]
        for rid, prompt, adapter in zip(ids, prompts, adapter_ids):
            self.add_request(rid, prompt, params, adapter)
        acc = {rid: ([], [], []) for rid in ids}
        reasons = {}
        while len(reasons) < len(ids):
            outputs = self.step()
            if not outputs and not self.scheduler.running:
                self.adapters.wait_for_load()  # nothing to run until an adapter's read is done
            for out in outputs:
                if out.error is not None:
                    raise out.error
                tokens, lps, texts = acc[out.request_id]
                tokens.append(out.token.token_id)
                lps.append(out.token.logprob)
                texts.append(out.text)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        return [Completion(rid, acc[rid][0], "".join(acc[rid][2]), acc[rid][1], reasons[rid]) for rid in ids]

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], adapter_ids: list[str | None]) -> list[torch.Tensor]:
        """Logits [len(prompt), V] at every prompt position, all prompts in one mixed batch."""
        total = sum(len(p) for p in prompts)
        if total > self.config.max_num_batched_tokens:
            raise ValueError(
                f"score takes at most max_num_batched_tokens ({self.config.max_num_batched_tokens}) "
                f"tokens per call, got {total}"
            )
        if len(prompts) > self.config.max_num_seqs:
            raise ValueError(
                f"score takes at most max_num_seqs ({self.config.max_num_seqs}) prompts per call"
            )
        tables = [BlockTable() for _ in prompts]
        held: list[str] = []
        try:
            chunks = []
            for ids, adapter, table in zip(prompts, adapter_ids, tables):
                slot = -1
                if adapter is not None:
                    slot = self.adapters.acquire_slot(adapter)
                    if slot is None:
                        raise errors.NoEvictableSlot("more distinct adapters than max_loras slots")
                    held.append(adapter)
                if not self.kv.allocate(table, len(ids)):
                    raise errors.ResourceExhausted("KV cache too small for these prompts")
                chunks.append(SequenceChunk(list(ids), 0, table, slot, True))
            batch = self.inputs.build(chunks, all_logits=True)
            logits = self.model.forward(batch, self.kv, self.lora)
            return list(logits.split([len(p) for p in prompts]))
        finally:
            for table in tables:
                self.kv.free(table)
            for adapter in held:
                self.adapters.release_slot(adapter)

    @torch.inference_mode()
    def warm_up(self) -> list[tuple[int, int]]:
        """Compile the Triton kernels for every launch shape a step can take, before serving.

        Runs one forward pass per shape, on scratch KV blocks and with every slot in use: decode
        steps of 1, 2, 4, ... up to `max_num_seqs` sequences, and single prompts of 2, 4, ... up to
        `max_num_batched_tokens` tokens; then, on CUDA unless `enforce_eager`, captures the decode
        CUDA graphs. Returns the (sequences, tokens) of each eager pass; nothing when neither the
        LoRA ops nor attention run on Triton (torch compiles nothing).
        """
        device = self.device
        if "triton" not in (
            kernels.select_backend(self.config.lora_backend, device),
            kernels.select_backend(self.config.attention_backend, device),
        ):
            return []
        limit = min(self.config.max_num_batched_tokens, self.max_model_len)
        shapes = [(n, n) for n in _powers_of_two(self.config.max_num_seqs)]
        shapes += [(1, n) for n in _powers_of_two(limit) if n > 1]
        slots = [*range(self.config.max_loras), -1]
        for num_seqs, num_tokens in shapes:
            tables = [BlockTable() for _ in range(num_seqs)]
            try:
                chunks = []
                for i, table in enumerate(tables):
                    n = num_tokens // num_seqs
                    if not self.kv.allocate(table, n):
                        raise errors.ResourceExhausted(
                            f"the KV cache cannot hold a warm-up step of {num_tokens} tokens"
                        )
                    chunks.append(SequenceChunk([0] * n, 0, table, slots[i % len(slots)], True))
                self.model.forward(self.inputs.build(chunks), self.kv, self.lora)
            finally:
                for table in tables:
                    self.kv.free(table)
        if self.graphs is not None:
            self.graphs.capture()
        return shapes

    def _uses_cuda_graphs(self) -> bool:
        """Decode steps run from CUDA graphs: on CUDA, unless enforce_eager, with Triton kernels."""
        device, config = self.device, self.config
        return (
            device.type == "cuda"
            and not config.enforce_eager
            and kernels.select_backend(config.lora_backend, device) == "triton"
            and kernels.select_backend(config.attention_backend, device) == "triton"
        )

    @property
    def step_history(self) -> list[StepRecord]:
        return list(self.scheduler.history)

    def info(self) -> dict:
        """Engine configuration, model summary, memory plan and occupancy (GetEngineInfo)."""
        m = self.model_config
        return {
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "model": {
                "path": str(self.model_dir),
                "architecture": m.architecture,
                "hidden_size": m.hidden_size,
                "num_layers": m.num_layers,
                "num_heads": m.num_heads,
                "num_kv_heads": m.num_kv_heads,
                "vocab_size": m.vocab_size,
                "num_parameters": m.num_parameters(),
                "dtype": dtype_name(self.model.dtype),
                "max_model_len": self.max_model_len,
                "device": str(self.device),
            },
            "memory_plan": self.plan.to_dict(),
            "occupancy": {
                "slots_used": self.adapters.slots_in_use,
                "slots_total": self.config.max_loras,
                "host_cache_used": len(self.adapters.host),
                "host_cache_total": self.config.max_cpu_loras,
                "kv_blocks_free": self.kv.num_free_blocks,
                "kv_blocks_total": self.kv.num_blocks,
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "registered_adapters": len(self.adapters.sources),
            },
            "cache_stats": dict(self.adapters.stats),
        }


def _powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    out = [1 << i for i in range(limit.bit_length()) if 1 << i < limit]
    return [*out, limit]
