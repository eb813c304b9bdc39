"""The alternative: transformers + PEFT serving a trace with static batches.

`PeftServer` holds one base model with every adapter loaded (`load_adapter`) and serves a trace
the way a static-batching server does: when it is free it takes up to `batch_size` requests that
have arrived (waiting for the next arrival if none has), left-pads them into one batch and runs
`generate(adapter_names=[...])` until the longest request is done. Per-token times come from a
streamer that `generate` calls once per step, so time to first token and per-token pace are
measured exactly as for the other systems. Greedy decoding with EOS suppressed (`min_new_tokens`),
so every request yields at least its `output_len` tokens; only those are counted.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.metrics import RequestResult
from bench.workload import TraceRequest

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class StepClock:
    """A `generate` streamer recording when each decoding step's tokens were produced."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class PeftServer:
    """One transformers base model with PEFT adapters, serving traces in static batches."""

    def __init__(self, model_dir: str | Path, adapters: dict[str, str | Path], batch_size: int):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        names = list(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model = model.eval()
        self.batch_size = batch_size

    def run_batch(self, batch: list[TraceRequest]) -> tuple[float, list[float]]:
        """Generate for one static batch: (start time, perf_counter at each step)."""
        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, r in enumerate(batch):  # left padding: every prompt ends at the last column
            ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt) :] = 1
        new = max(r.output_len for r in batch)
        clock = StepClock()
        started = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=[r.adapter_id or BASE for r in batch],
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        return started, clock.times

    def replay(self, requests: list[TraceRequest]) -> list[RequestResult]:
        """Serve `requests` in real time, in arrival order; results in trace order."""
        pending = sorted(requests, key=lambda r: r.arrival_s)
        results: dict[int, RequestResult] = {}
        start, i = time.perf_counter(), 0
        while i < len(pending):
            now = time.perf_counter() - start
            if pending[i].arrival_s > now:
                time.sleep(pending[i].arrival_s - now)
                now = time.perf_counter() - start
            batch = [r for r in pending[i : i + self.batch_size] if r.arrival_s <= now]
            i += len(batch)
            _, steps = self.run_batch(batch)
            for r in batch:
                results[r.index] = RequestResult(
                    index=r.index,
                    adapter_id=r.adapter_id,
                    prompt_tokens=len(r.prompt),
                    output_tokens=r.output_len,
                    arrival_s=r.arrival_s,
                    first_token_s=steps[0] - start,
                    done_s=steps[r.output_len - 1] - start,
                )
        return [results[r.index] for r in requests]

    def prefill_tokens_per_s(self, prompts: list[list[int]], adapter_names: list[str] | None) -> float:
        """Prompt tokens/s of one forward pass over equal-length prompts (logits of the last only)."""
        ids = torch.tensor(prompts)
        start = time.perf_counter()
        with torch.inference_mode():
            if adapter_names is None:
                with self.model.disable_adapter():
                    self.model(input_ids=ids, logits_to_keep=1)
            else:
                self.model(input_ids=ids, adapter_names=adapter_names, logits_to_keep=1)
        return ids.numel() / (time.perf_counter() - start)

    def decode_tokens_per_s(
        self, prompts: list[list[int]], adapter_names: list[str] | None, new: int
    ) -> float:
        """Generated tokens/s of the decode steps of one batch (the prefill step is not timed)."""
        ids = torch.tensor(prompts)
        clock = StepClock()
        kwargs = dict(max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            if adapter_names is None:
                with self.model.disable_adapter():
                    self.model.generate(input_ids=ids, streamer=clock, **kwargs)
            else:
                self.model.generate(input_ids=ids, adapter_names=adapter_names, streamer=clock, **kwargs)
        return len(prompts) * new / (clock.times[-1] - clock.times[0])
