"""Sampling parameters and the batched sampler, which runs where the logits are (CUDA or CPU).

`sample` chooses one token for every row of a step with tensor operations over the whole batch and
per-row parameter tensors: penalties, then greedy rows take the argmax and the others are divided
by their temperature, masked by min-p, top-k and top-p (one sort for the batch, only when a row
asks for top-k or top-p), and drawn as `argmax(probs / q)` with `q ~ Exp(1)` (the exponential
race: the same distribution as `multinomial`, without a call per row). Only the chosen ids and
their logprobs leave the device, in one copy at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inference_svc.errors import InvalidRequest

MAX_LOGPROBS = 20
SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS): no logits / 1e-40
MAX_PENALTY = 2.0  # frequency and presence penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)
# Stop conditions are checked for every generated token on the engine thread: bounded, so that one
# request cannot make every step slow for the whole batch.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops."""

    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 (or below SAMPLING_EPS) = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one, [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # prompt and output tokens: logits > 0 divided, < 0 multiplied; 1 = off
    frequency_penalty: float = 0.0  # subtracted once per occurrence of a token in the output so far
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
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
        if not (0 <= self.min_p <= 1):
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequest(
                "repetition_penalty", f"must be > 0 and finite (1 = off), got {self.repetition_penalty}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (-MAX_PENALTY <= value <= MAX_PENALTY):
                raise InvalidRequest(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequest("logprobs", f"must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest("stop", f"{len(self.stop)} stop strings; at most {MAX_STOP_STRINGS}")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidRequest("stop", f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(
                "stop_token_ids", f"{len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}"
            )
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest("stop_token_ids", f"{bad} outside the vocabulary 0..{vocab_size - 1}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


@dataclass(frozen=True)
class SampledToken:
    """One row's choice and its logprobs under the model's unmodified distribution."""

    token_id: int
    logprob: float  # of the chosen token under the model's distribution
    top_logprobs: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first


def sample(
    logits: torch.Tensor,  # [n, V] float32, one row per sequence that samples this step; not changed
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],  # a seeded row's own generator; None = `shared`
    shared: torch.Generator,  # the unseeded rows draw from it together
    prompt_ids: Sequence[list[int]],  # each row's prompt (for repetition_penalty)
    output_ids: Sequence[list[int]],  # each row's tokens generated so far (for every penalty)
) -> list[SampledToken]:
    """Choose one token per row, as vLLM does.

    Penalties apply to every row (greedy ones too); greedy rows then take the argmax, the others
    are divided by their temperature, masked by min-p, top-k (ties with the k-th kept), then top-p
    over what min-p and top-k kept, and drawn. A seeded row draws its noise from its own generator,
    so its tokens do not depend on the rest of the batch. Logprobs (the chosen token's and the top
    `logprobs` alternatives) are of `log_softmax(logits)`, before any penalty or temperature.
    Every tensor stays on `logits.device`, where the generators must live too. A row whose
    logits are not finite still gets an id in the vocabulary; nothing here raises for it.
    """
    adjusted = apply_penalties(logits, params, prompt_ids, output_ids)  # [n, V]
    chosen = adjusted.argmax(dim=-1)  # [n], what greedy rows take
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        rows = torch.tensor(drawn, device=logits.device)  # [r]
        probs = sampling_probs(
            adjusted if len(drawn) == len(params) else adjusted[rows], [params[i] for i in drawn]
        )
        chosen[rows] = _exponential_race(probs, [generators[i] for i in drawn], shared)
    return _results(logits, chosen, params)


def apply_penalties(
    logits: torch.Tensor,  # [n, V]; not changed
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[list[int]],
    output_ids: Sequence[list[int]],
) -> torch.Tensor:
    """Logits [n, V] after each row's penalties; `logits` itself when no row has one.

    repetition_penalty (vLLM/Hugging Face) covers prompt and output tokens: a seen token's logit is
    divided by it when positive, multiplied when negative. frequency_penalty and presence_penalty
    (OpenAI) cover output tokens only: logit - frequency_penalty * count - presence_penalty * (count > 0).
    """
    penalised = [i for i, p in enumerate(params) if p.penalised]
    if not penalised:
        return logits
    device, vocab = logits.device, logits.shape[1]
    rows = torch.tensor(penalised, device=device)  # [r]
    per_row = [params[i] for i in penalised]
    counts = _token_counts([output_ids[i] for i in penalised], vocab, device)  # [r, V]
    in_output = counts > 0  # [r, V]
    sub = logits[rows]  # [r, V], a copy
    if any(p.repetition_penalty != 1 for p in per_row):
        seen = in_output | (_token_counts([prompt_ids[i] for i in penalised], vocab, device) > 0)  # [r, V]
        rep = torch.where(seen, _column([p.repetition_penalty for p in per_row], device), 1.0)  # [r, V]
        sub = torch.where(sub > 0, sub / rep, sub * rep)
    sub -= _column([p.frequency_penalty for p in per_row], device) * counts
    sub -= _column([p.presence_penalty for p in per_row], device) * in_output
    adjusted = logits.clone()
    adjusted[rows] = sub
    return adjusted


def _token_counts(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(ids), vocab] float32: how often each token occurs in each row's ids."""
    width = max(map(len, ids))
    padded = torch.tensor([row + [vocab] * (width - len(row)) for row in ids], dtype=torch.long)  # [r, W]
    padded = padded.to(device)
    counts = torch.zeros(len(ids), vocab + 1, device=device)  # [r, V + 1]; column V counts the padding
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def sampling_probs(
    logits: torch.Tensor,  # [r, V] float32, rows that are not greedy; not changed
    params: Sequence[SamplingParams],
) -> torch.Tensor:
    """The distribution [r, V] each row draws from: temperature, then min-p, top-k, top-p (as vLLM).

    Masked tokens have probability exactly 0. top-k keeps ties with the k-th token; top-p keeps the
    smallest most-likely-first prefix (ties in index order) whose mass, renormalised over what
    min-p and top-k kept, reaches top_p.
    """
    device, vocab = logits.device, logits.shape[1]
    scaled = logits / _column([p.temperature for p in params], device)  # [r, V]
    if any(p.min_p > 0 for p in params):
        _mask_min_p(scaled, _column([p.min_p for p in params], device))
    if any(p.top_k or p.top_p < 1 for p in params):
        top_k = [min(p.top_k, vocab) if p.top_k else vocab for p in params]
        top_p = [p.top_p if p.top_p < 1 else math.inf for p in params]  # inf: rounding cannot cut the tail
        _mask_top_k_top_p(scaled, _column(top_k, device, torch.long), _column(top_p, device))
    return scaled.softmax(dim=-1)


def _mask_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place on logits [r, V]: drop tokens whose probability is below min_p [r, 1] x the row's largest."""
    # p < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf keeps every token
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()  # [r, 1]
    logits.masked_fill_(logits < threshold, -math.inf)


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """In place on logits [r, V]: keep each row's top_k [r, 1] largest (ties with the k-th kept), then
    the smallest most-likely-first prefix of those whose renormalised mass reaches top_p [r, 1]."""
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)  # [r, V] each
    kth = ordered.gather(1, top_k - 1)  # [r, 1]
    ordered.masked_fill_(ordered < kth, -math.inf)
    probs = ordered.softmax(dim=-1)  # [r, V]
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # [r, V], mass of the more likely tokens
    ordered.masked_fill_(mass_before >= top_p, -math.inf)  # the first token always stays (0 < top_p)
    logits.scatter_(1, order, ordered)


def _exponential_race(
    probs: torch.Tensor,  # [r, V], changed in place
    generators: list[torch.Generator | None],
    shared: torch.Generator,
) -> torch.Tensor:
    """One token per row [r] int64: argmax(probs / q), q ~ Exp(1), draws each token with its probability.

    Seeded rows draw q from their own generator, the others from `shared` at once.
    """
    q = torch.empty_like(probs)  # [r, V]
    if any(g is None for g in generators):
        q.exponential_(generator=shared)
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    # CPU exponential_ can draw 0 (pytorch#22557): a masked token's 0 / 0 would be a NaN argmax picks
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)  # a row of NaN (non-finite logits) still yields an id


def _column(values: list[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row parameters as a column [r, 1] on `device`."""
    return torch.tensor(values, dtype=dtype, device=device)[:, None]


def _results(
    logits: torch.Tensor,  # [n, V]
    chosen: torch.Tensor,  # [n] int64
    params: Sequence[SamplingParams],
) -> list[SampledToken]:
    """SampledTokens with logprobs of log_softmax(logits), copied to the host once."""
    k = max(p.logprobs for p in params)
    lse = logits.logsumexp(dim=-1, keepdim=True)  # [n, 1]
    top = logits.topk(k, dim=-1)  # [n, k] each
    host = torch.cat(  # [n, 2 + 2k] float64: exact for ids below 2**53 and for float32 logprobs
        [
            chosen[:, None].double(),
            (logits.gather(1, chosen[:, None]) - lse).double(),
            top.indices.double(),
            (top.values - lse).double(),
        ],
        dim=1,
    ).tolist()
    out = []
    for p, row in zip(params, host):
        ids, values = row[2 : 2 + p.logprobs], row[2 + k : 2 + k + p.logprobs]
        out.append(SampledToken(int(row[0]), row[1], tuple((int(t), v) for t, v in zip(ids, values))))
    return out
