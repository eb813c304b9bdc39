"""Per-request timings and what is reported from them: TTFT, TPOT, latency, throughput, SLOs.

Every system under test (our gRPC service, the offline engine, transformers + PEFT) produces the
same `RequestResult` per trace request, so one `summarize` computes every figure the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Slo:
    """A request meets the SLO when its first token and its pace are both within bounds."""

    # Longest acceptable time to first token (request arrival -> first token), seconds.
    ttft_s: float
    # Longest acceptable mean time per output token after the first, seconds.
    tpot_s: float

    def met_by(self, r: RequestResult) -> bool:
        """Whether `r` succeeded within both bounds (a one-token answer has no pace to bound)."""
        if r.error is not None or r.ttft_s is None or r.ttft_s > self.ttft_s:
            return False
        return r.tpot_s is None or r.tpot_s <= self.tpot_s


@dataclass(frozen=True)
class RequestResult:
    """What happened to one request; times are seconds since the start of the replay."""

    index: int
    adapter_id: str
    prompt_tokens: int
    output_tokens: int  # tokens received
    arrival_s: float  # when the trace says it arrives
    first_token_s: float | None  # None when no token came back
    done_s: float
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.done_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def latency_s(self) -> float:
        return self.done_s - self.arrival_s


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results: list[RequestResult], slo: Slo | None = None) -> dict:
    """Throughput over the makespan (first arrival -> last completion) and latency percentiles."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    start = min((r.arrival_s for r in results), default=0.0)
    end = max((r.done_s for r in results), default=0.0)
    makespan = max(end - start, 1e-9)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    latency = [r.latency_s for r in ok]
    out = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "output_tokens": tokens,
        "makespan_s": makespan,
        "tokens_per_s": tokens / makespan,
        "requests_per_s": len(ok) / makespan,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("latency", latency)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = percentile(values, q)
    if slo is not None:
        out["slo_ttft_s"], out["slo_tpot_s"] = slo.ttft_s, slo.tpot_s
        out["slo_attainment"] = sum(slo.met_by(r) for r in results) / max(len(results), 1)
    return out
