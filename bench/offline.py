"""Replay a trace through an in-process `LLMEngine`, honouring arrival times.

The driver adds every request whose arrival time has passed, runs one engine step, and repeats;
when nothing is running it sleeps until the next arrival. Timings are taken when `step()` returns
the token, so they are the engine's own, without any RPC.
"""

from __future__ import annotations

import time

from bench.metrics import RequestResult
from bench.workload import TraceRequest
from inference_svc.engine import LLMEngine
from inference_svc.sampling import SamplingParams


def replay_offline(engine: LLMEngine, requests: list[TraceRequest], tag: str = "") -> list[RequestResult]:
    """Run `requests` through `engine` in real time; results in trace order."""
    pending = sorted(requests, key=lambda r: r.arrival_s)
    first: dict[int, float] = {}
    count: dict[int, int] = {}
    done: dict[int, RequestResult] = {}
    by_id = {f"{tag}trace-{r.index}": r for r in requests}
    start, i = time.perf_counter(), 0
    while len(done) < len(requests):
        now = time.perf_counter() - start
        while i < len(pending) and pending[i].arrival_s <= now:
            r = pending[i]
            params = SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
            engine.add_request(f"{tag}trace-{r.index}", list(r.prompt), params, r.adapter_id or None)
            i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[i].arrival_s - now))
            continue
        for out in engine.step():
            r = by_id[out.request_id]
            t = time.perf_counter() - start
            if out.token is not None:
                first.setdefault(r.index, t)
                count[r.index] = count.get(r.index, 0) + 1
            if out.finished:
                done[r.index] = RequestResult(
                    index=r.index,
                    adapter_id=r.adapter_id,
                    prompt_tokens=len(r.prompt),
                    output_tokens=count.get(r.index, 0),
                    arrival_s=r.arrival_s,
                    first_token_s=first.get(r.index),
                    done_s=t,
                    error=None if out.error is None else repr(out.error),
                )
    return [done[r.index] for r in requests]
