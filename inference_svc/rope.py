"""Rotary position embeddings: the rope variants transformers implements, computed as it does.

`inverse_frequencies` mirrors `transformers.modeling_rope_utils` (float32, same operation order) for
default, linear, dynamic NTK, YaRN, llama3 and LongRoPE, so logits match transformers to float32
rounding. `RotaryEmbedding` turns them into each token's cos/sin once per step.

Length-dependent variants (dynamic NTK, LongRoPE) rotate each new token with the frequencies of its
sequence's *rope length*: the prompt length for prompt tokens, position + 1 for generated ones.
That is what transformers computes for one sequence generating with its KV cache (the prefill
forward sees the whole prompt, each decode forward its position + 1); keys already cached keep the
rotation they were written with, there as here. Because it is fixed per token, chunked prefill,
batching with other sequences (transformers would use the batch's longest sequence) and recompute
after preemption give the same rotations as an unchunked, unbatched run.
"""

from __future__ import annotations

import math

import torch

from loraserve.model_summary import ModelConfig, RopeConfig


def inverse_frequencies(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] float32, attention scaling of cos/sin) for a sequence of `seq_len`
    (only dynamic NTK and LongRoPE read it; None = short)."""
    dim, base = head_dim, rope.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [D/2]
    inv_freq = 1.0 / (base**exponents)
    kind = rope.rope_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rope.factor, 1.0
    if kind == "dynamic":
        seq_len = max(seq_len or 0, max_position_embeddings)
        base = base * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (
            dim / (dim - 2)
        )
        return 1.0 / (base**exponents), 1.0
    if kind == "llama3":
        return _llama3(rope, inv_freq), 1.0
    if kind == "yarn":
        return _yarn(rope, dim, max_position_embeddings)
    if kind == "longrope":
        return _longrope(rope, exponents, max_position_embeddings, seq_len)
    raise ValueError(f"unknown rope type {kind!r}")


def _llama3(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, old_len = rope.factor, rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    base, original = rope.theta, rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # [D/2] share of the unscaled frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


def _longrope(
    rope: RopeConfig, exponents: torch.Tensor, max_position_embeddings: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original
    attention = rope.attention_factor
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
    return 1.0 / (ext * rope.theta**exponents), attention


def _table(inv_freq: torch.Tensor, scaling: float, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, D] of every position, in the HF Llama (rotate-half) layout."""
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq  # [max_len, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
    return emb.cos() * scaling, emb.sin() * scaling


class RotaryEmbedding:
    """Each token's cos/sin for its position (and, for dynamic NTK and LongRoPE, its rope length)."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device, rope: RopeConfig | None = None):
        """`rope`: another of the model's ropes (Gemma 3's local layers); default `cfg.rope`."""
        rope, dim, max_pos = rope or cfg.rope, cfg.head_dim, cfg.max_position_embeddings
        self.kind = rope.rope_type
        inv_freq, scaling = inverse_frequencies(rope, dim, max_pos)
        self.cos, self.sin = (t.to(device) for t in _table(inv_freq, scaling, max_len))  # [max_len, D]
        if self.kind == "longrope":  # the long table, for tokens whose rope length exceeds the original
            self.threshold = rope.original_max_position_embeddings
            long_freq, _ = inverse_frequencies(rope, dim, max_pos, seq_len=self.threshold + 1)
            self.long_cos, self.long_sin = (t.to(device) for t in _table(long_freq, scaling, max_len))
        if self.kind == "dynamic":  # frequencies computed per token on the device, as transformers does
            self.threshold = max_pos
            self.factor, self.theta, self.dim = rope.factor, rope.theta, dim
            self.inv_freq = inv_freq.to(device)  # [D/2], for rope lengths up to max_position_embeddings
            self.exponents = (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim).to(device)

    def cos_sin(self, positions: torch.Tensor, rope_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, D] float32 of tokens at `positions` [T] with `rope_lens` [T]."""
        if self.kind == "longrope":
            long = (rope_lens > self.threshold)[:, None]  # [T, 1]
            return (
                torch.where(long, self.long_cos[positions], self.cos[positions]),
                torch.where(long, self.long_sin[positions], self.sin[positions]),
            )
        if self.kind == "dynamic":
            seq_len = torch.clamp(rope_lens, min=self.threshold)  # [T] int64
            base = self.theta * ((self.factor * seq_len / self.threshold) - (self.factor - 1)) ** (
                self.dim / (self.dim - 2)
            )  # [T] float32
            scaled = 1.0 / (base[:, None] ** self.exponents)  # [T, D/2]
            inv_freq = torch.where((rope_lens > self.threshold)[:, None], scaled, self.inv_freq)
            freqs = positions.float()[:, None] * inv_freq  # [T, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos(), emb.sin()
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, D]."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
