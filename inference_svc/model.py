"""A Llama-family decoder (Llama, Mistral, Qwen2) with batched multi-LoRA on its projections.

Reads top to bottom: rotary embedding -> decoder layer -> causal LM. Projections are fused
(q/k/v into one matmul, gate/up into one); each adds its rows' LoRA deltas through `LoraSlots`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from inference_svc.forward_batch import ForwardBatch
from inference_svc.kv_cache import KVCache
from inference_svc.lora_slots import LoraSlots
from inference_svc.weights import load_state_dict
from kernels.attention import paged_attention
from loraserve.errors import InvalidModel
from loraserve.model_summary import ModelConfig


class RotaryEmbedding:
    """cos/sin tables for every position up to `max_len`, in the HF Llama convention."""

    def __init__(self, head_dim: int, theta: float, max_len: int, device: torch.device):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [max_len, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated by each token's position."""
        cos = self.cos[positions][:, None, :].to(x.dtype)  # [T, 1, D]
        sin = self.sin[positions][:, None, :].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class DecoderLayer:
    def __init__(self, index: int, cfg: ModelConfig, w: dict, prefix: str):
        self.index = index
        self.cfg = cfg
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        self.input_norm = w.pop(f"{prefix}.input_layernorm.weight")
        self.post_attn_norm = w.pop(f"{prefix}.post_attention_layernorm.weight")
        self.qkv_w = torch.cat([w.pop(f"{attn}.{m}.weight") for m in ("q_proj", "k_proj", "v_proj")])
        self.qkv_b = (
            torch.cat([w.pop(f"{attn}.{m}.bias") for m in ("q_proj", "k_proj", "v_proj")])
            if cfg.attention_bias
            else None
        )
        self.o_w = w.pop(f"{attn}.o_proj.weight")
        self.o_b = w.pop(f"{attn}.o_proj.bias", None)
        self.gate_up_w = torch.cat([w.pop(f"{mlp}.gate_proj.weight"), w.pop(f"{mlp}.up_proj.weight")])
        self.gate_up_b = (
            torch.cat([w.pop(f"{mlp}.gate_proj.bias"), w.pop(f"{mlp}.up_proj.bias")])
            if cfg.mlp_bias
            else None
        )
        self.down_w = w.pop(f"{mlp}.down_proj.weight")
        self.down_b = w.pop(f"{mlp}.down_proj.bias", None)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        h: torch.Tensor,
        batch: ForwardBatch,
        kv: KVCache,
        rope: RotaryEmbedding,
        lora: LoraSlots,
        attn_out: torch.Tensor,  # [T, q_size], scratch the attention writes
        attention_backend: str,
    ) -> torch.Tensor:  # h: [T, hidden]
        cfg, i = self.cfg, self.index
        x = rms_norm(h, self.input_norm, cfg.rms_norm_eps)
        qkv = F.linear(x, self.qkv_w, self.qkv_b)  # [T, q + 2 kv]
        lora.apply(i, "qkv_proj", qkv, x, batch.slot_ids, batch.lora_meta)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = rope.apply(q.view(-1, cfg.num_heads, cfg.head_dim), batch.positions)
        k = rope.apply(k.view(-1, cfg.num_kv_heads, cfg.head_dim), batch.positions)
        k_cache, v_cache = kv.layer(i)  # [blocks, block_size, KVH, D]
        k_cache.view(-1, cfg.num_kv_heads, cfg.head_dim).index_copy_(0, batch.kv_write, k)
        v_cache.view(-1, cfg.num_kv_heads, cfg.head_dim).index_copy_(
            0, batch.kv_write, v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        )
        paged_attention(
            q,
            k_cache,
            v_cache,
            batch.attention,
            self.scale,
            attn_out.view(-1, cfg.num_heads, cfg.head_dim),
            attention_backend,
        )
        o = F.linear(attn_out, self.o_w, self.o_b)  # [T, hidden]
        lora.apply(i, "o_proj", o, attn_out, batch.slot_ids, batch.lora_meta)
        h = h + o
        x = rms_norm(h, self.post_attn_norm, cfg.rms_norm_eps)
        gate_up = F.linear(x, self.gate_up_w, self.gate_up_b)  # [T, 2 * intermediate]
        lora.apply(i, "gate_up_proj", gate_up, x, batch.slot_ids, batch.lora_meta)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up  # [T, intermediate]
        down = F.linear(act, self.down_w, self.down_b)
        lora.apply(i, "down_proj", down, act, batch.slot_ids, batch.lora_meta)
        return h + down


class CausalLM:
    """The whole decoder; `forward` runs one step of a `ForwardBatch` and returns logits."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict,
        max_len: int,
        device: torch.device,
        max_tokens: int,
        attention_backend: str = "auto",
    ):
        self.cfg = cfg
        self.attention_backend = attention_backend
        self.embed = weights.pop("model.embed_tokens.weight")  # [vocab, hidden]
        self.layers = [DecoderLayer(i, cfg, weights, f"model.layers.{i}") for i in range(cfg.num_layers)]
        self.norm = weights.pop("model.norm.weight")
        head = weights.pop("lm_head.weight", None)
        if head is None and not cfg.tie_word_embeddings:
            raise InvalidModel("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        self.lm_head = self.embed if head is None or cfg.tie_word_embeddings else head
        leftover = [k for k in weights if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise InvalidModel(f"checkpoint holds tensors this model does not use: {leftover[:5]}")
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, max_len, device)
        self.dtype = self.embed.dtype
        # the attention output of the largest step, reused by every layer
        self.attn_out = torch.empty(max_tokens, cfg.num_heads * cfg.head_dim, dtype=self.dtype, device=device)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        max_tokens: int,
        attention_backend: str = "auto",
    ):
        try:
            weights = load_state_dict(model_dir, dtype, device)
            return cls(cfg, weights, max_len, device, max_tokens, attention_backend)
        except KeyError as e:
            raise InvalidModel(f"{model_dir}: checkpoint lacks tensor {e.args[0]!r}") from e

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache, lora: LoraSlots) -> torch.Tensor:
        """Logits [len(batch.logits_index), vocab] in float32."""
        h = F.embedding(batch.token_ids, self.embed)  # [T, hidden]
        attn_out = self.attn_out[: batch.num_tokens]
        for layer in self.layers:
            h = layer.forward(h, batch, kv, self.rope, lora, attn_out, self.attention_backend)
        h = rms_norm(h[batch.logits_index], self.norm, self.cfg.rms_norm_eps)
        return F.linear(h, self.lm_head).float()
