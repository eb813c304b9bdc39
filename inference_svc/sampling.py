"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inference_svc.errors import InvalidRequest

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops."""

    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    seed: int | None = None  # per-request generator: same seed, same tokens
    stop: tuple[str, ...] = ()  # stop when the text contains one (not returned)
    stop_token_ids: tuple[int, ...] = ()  # stop after one of these (returned)
    ignore_eos: bool = False  # keep going past the model's EOS
    logprobs: int = 0  # top alternatives returned with each token (the chosen one's is always)

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequest naming the first bad field."""
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature", f"must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0 (0 = disabled), got {self.top_k}")
        if not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequest("logprobs", f"must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop", "stop strings must be non-empty")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest("stop_token_ids", f"{bad} outside the vocabulary 0..{vocab_size - 1}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float  # of the chosen token under the model's distribution
    top_logprobs: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first


def sample(
    logits: torch.Tensor,  # [n, V] float32, one row per sequence that samples this step
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[SampledToken]:
    """Choose one token per row; logprobs are of the unmodified distribution."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
    chosen = logits.argmax(dim=-1)  # [n]
    for i, p in enumerate(params):
        if not p.greedy:
            chosen[i] = _sample_row(logits[i], p, generators[i])
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    chosen = chosen.tolist()
    k = max((p.logprobs for p in params), default=0)
    top = logprobs.topk(k, dim=-1) if k else None
    out = []
    for i, p in enumerate(params):
        alts = ()
        if p.logprobs:
            ids, vals = top.indices[i, : p.logprobs].tolist(), top.values[i, : p.logprobs].tolist()
            alts = tuple(zip(ids, vals))
        out.append(SampledToken(chosen[i], chosen_lp[i], alts))
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    scaled = logits / p.temperature  # [V]
    if p.top_k and p.top_k < scaled.shape[0]:
        kth = scaled.topk(p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = scaled.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = scaled.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
