"""S-LoRA-style synthetic workloads, written to JSONL trace files so a run can be replayed exactly.

    spec = WorkloadSpec(num_adapters=100, alpha=0.3, rate=8.0, cv=1.0, num_requests=200,
                        input_len=(8, 512), output_len=(8, 512), vocab_size=32000, seed=0)
    requests = generate(spec)
    write_trace(path, spec, requests)
    spec, requests = read_trace(path)           # the same requests, field for field

Adapter popularity follows S-LoRA: request i uses adapter `floor(power(alpha) * n)`, where numpy's
power distribution has density `alpha * x**(alpha - 1)` on [0, 1]: alpha = 1 is uniform, alpha in
0.1-0.6 puts most requests on the first few adapters. Inter-arrival times are Gamma-distributed
with mean `1 / rate` and coefficient of variation `cv` (shape `1 / cv**2`; cv = 1 is a Poisson
process, cv > 1 burstier). Input and output lengths are uniform integers in `[lo, hi)`. Prompt
token ids are drawn too and stored in the trace, so replaying never depends on this generator.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_FORMAT = "loraserve-trace/1"


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a trace; the same spec always yields the same requests."""

    # Adapters requests are spread over (`{adapter_prefix}{i}`, i in 0..n-1); 0 = base model only.
    num_adapters: int
    # Popularity exponent: 1 = uniform, 0.1-0.6 = skewed towards low indices.
    alpha: float
    # Mean arrival rate, requests per second.
    rate: float
    # Coefficient of variation of inter-arrival times (1 = Poisson).
    cv: float
    # Requests in the trace.
    num_requests: int
    # Prompt lengths in tokens, uniform in [lo, hi).
    input_len: tuple[int, int]
    # Tokens to generate per request, uniform in [lo, hi).
    output_len: tuple[int, int]
    # Prompt token ids are drawn from [0, vocab_size).
    vocab_size: int
    # Seed of every random draw.
    seed: int = 0
    # Adapter ids are this prefix plus the adapter's index.
    adapter_prefix: str = "lora-"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_len", tuple(self.input_len))
        object.__setattr__(self, "output_len", tuple(self.output_len))
        _require(self.num_adapters >= 0, "num_adapters", self.num_adapters, "must be >= 0")
        _require(self.alpha > 0, "alpha", self.alpha, "must be > 0")
        _require(self.rate > 0, "rate", self.rate, "must be > 0")
        _require(self.cv > 0, "cv", self.cv, "must be > 0")
        _require(self.num_requests >= 1, "num_requests", self.num_requests, "must be >= 1")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            _require(1 <= lo < hi, name, (lo, hi), "must be a range [lo, hi) with 1 <= lo < hi")
        _require(self.vocab_size >= 1, "vocab_size", self.vocab_size, "must be >= 1")

    def adapter_ids(self) -> list[str]:
        return [f"{self.adapter_prefix}{i}" for i in range(self.num_adapters)]


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    index: int
    arrival_s: float  # seconds after the start of the replay
    adapter_id: str  # "" = base model
    prompt: tuple[int, ...]  # token ids
    output_len: int  # tokens to generate (EOS ignored)


def generate(spec: WorkloadSpec) -> list[TraceRequest]:
    """The requests of `spec`, in arrival order."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    if spec.num_adapters:
        which = np.floor(rng.power(spec.alpha, n) * spec.num_adapters).astype(np.int64)
        which = np.minimum(which, spec.num_adapters - 1)  # power() can return exactly 1.0
        ids = spec.adapter_ids()
        adapters = [ids[i] for i in which]
    else:
        adapters = [""] * n
    input_lens = rng.integers(*spec.input_len, size=n)
    output_lens = rng.integers(*spec.output_len, size=n)
    shape = 1.0 / spec.cv**2
    gaps = rng.gamma(shape, 1.0 / (shape * spec.rate), size=n)  # mean 1/rate, std cv/rate
    arrivals = np.cumsum(gaps) - gaps[0]  # the first request arrives at t = 0
    return [
        TraceRequest(
            index=i,
            arrival_s=round(float(arrivals[i]), 6),
            adapter_id=adapters[i],
            prompt=tuple(int(t) for t in rng.integers(0, spec.vocab_size, size=int(input_lens[i]))),
            output_len=int(output_lens[i]),
        )
        for i in range(n)
    ]


def offline_hits(adapter_ids: list[str], capacity: int) -> int:
    """Hits of Belady's optimal offline cache of `capacity` entries on this request sequence
    (evict the entry asked for again furthest in the future). No routing over caches of
    `capacity` entries in all can hit more: their union is one such cache."""
    never = len(adapter_ids)
    next_use, seen = [never] * len(adapter_ids), {}
    for i in range(len(adapter_ids) - 1, -1, -1):
        next_use[i] = seen.get(adapter_ids[i], never)
        seen[adapter_ids[i]] = i
    held: dict[str, int] = {}  # adapter -> when it is asked for next
    hits = 0
    for i, adapter in enumerate(adapter_ids):
        if adapter in held:
            hits += 1
        elif len(held) >= capacity:
            del held[max(held, key=held.__getitem__)]
        held[adapter] = next_use[i]
    return hits


def write_trace(path: str | Path, spec: WorkloadSpec, requests: list[TraceRequest]) -> Path:
    """JSONL: a header line with the spec, then one line per request."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"format": TRACE_FORMAT, "spec": dataclasses.asdict(spec)})]
    lines += [json.dumps({**dataclasses.asdict(r), "prompt": list(r.prompt)}) for r in requests]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_trace(path: str | Path) -> tuple[WorkloadSpec, list[TraceRequest]]:
    """The spec and requests `write_trace` wrote; ValueError naming the file if it is not a trace."""
    lines = Path(path).read_text().splitlines()
    header = json.loads(lines[0]) if lines else {}
    if header.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: not a trace file (first line must carry format {TRACE_FORMAT!r})")
    spec = WorkloadSpec(**header["spec"])
    requests = []
    for line in lines[1:]:
        row = json.loads(line)
        requests.append(TraceRequest(**{**row, "prompt": tuple(row["prompt"])}))
    return spec, requests


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} ({value!r}) {rule}")
