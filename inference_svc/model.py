"""A Llama-family decoder (Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3, Phi-3) with batched
multi-LoRA.

Reads top to bottom: norm -> decoder layer -> causal LM (rotary embeddings: `rope.py`). Projections
are fused (q/k/v into one matmul, gate/up into one; Phi-3 checkpoints store them so); each adds its
rows' LoRA deltas through `LoraSlots`. Family differences come from `ModelConfig`: biases, per-head
q/k norms (Qwen3, Gemma 3), an explicit head_dim, each layer's sliding attention window, and
Gemma's (1 + w) sandwich norms, scaled embeddings, GeGLU, attention scale, logit soft-capping and
local-layer rope.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from inference_svc.forward_batch import ForwardBatch
from inference_svc.kv_cache import KVCache
from inference_svc.lora_slots import LoraSlots
from inference_svc.rope import RotaryEmbedding, apply_rotary
from inference_svc.weights import load_state_dict
from kernels.attention import paged_attention
from loraserve.errors import InvalidModel
from loraserve.model_summary import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:  # (1 + w), multiplied in float32 before the cast
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap if cap else x


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def _fused(w: dict, prefix: str, fused: str, parts: tuple[str, ...], kind: str = "weight") -> torch.Tensor:
    """The fused projection's tensor: stored so (Phi-3), else its parts concatenated in order."""
    if f"{prefix}.{fused}.{kind}" in w:
        return w.pop(f"{prefix}.{fused}.{kind}")
    return torch.cat([w.pop(f"{prefix}.{m}.{kind}") for m in parts])


class DecoderLayer:
    def __init__(self, index: int, cfg: ModelConfig, w: dict, prefix: str):
        self.index = index
        self.cfg = cfg
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        self.input_norm = w.pop(f"{prefix}.input_layernorm.weight")
        self.post_attn_norm = w.pop(f"{prefix}.post_attention_layernorm.weight")
        # Gemma: the attention output is normed too (post_attn_norm), and the MLP's input and output
        self.pre_mlp_norm = w.pop(f"{prefix}.pre_feedforward_layernorm.weight") if cfg.gemma else None
        self.post_mlp_norm = w.pop(f"{prefix}.post_feedforward_layernorm.weight") if cfg.gemma else None
        qkv = ("q_proj", "k_proj", "v_proj")
        self.qkv_w = _fused(w, attn, "qkv_proj", qkv)
        self.qkv_b = _fused(w, attn, "qkv_proj", qkv, "bias") if cfg.attention_bias else None
        self.o_w = w.pop(f"{attn}.o_proj.weight")
        self.o_b = w.pop(f"{attn}.o_proj.bias") if cfg.o_proj_bias else None
        # Qwen3: RMSNorm weights [D] of every q and k head, applied before rope
        self.q_norm = w.pop(f"{attn}.q_norm.weight") if cfg.qk_norm else None
        self.k_norm = w.pop(f"{attn}.k_norm.weight") if cfg.qk_norm else None
        self.gate_up_w = _fused(w, mlp, "gate_up_proj", ("gate_proj", "up_proj"))
        self.gate_up_b = (
            torch.cat([w.pop(f"{mlp}.gate_proj.bias"), w.pop(f"{mlp}.up_proj.bias")])
            if cfg.mlp_bias
            else None
        )
        self.down_w = w.pop(f"{mlp}.down_proj.weight")
        self.down_b = w.pop(f"{mlp}.down_proj.bias") if cfg.mlp_bias else None
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.attn_scale or cfg.head_dim**-0.5
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.window = cfg.layer_windows[index] if cfg.layer_windows else 0  # 0 = full attention

    def forward(
        self,
        h: torch.Tensor,
        batch: ForwardBatch,
        kv: KVCache,
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [T, D] of the step's tokens
        lora: LoraSlots,
        attn_out: torch.Tensor,  # [T, q_size], scratch the attention writes
        attention_backend: str,
    ) -> torch.Tensor:  # h: [T, hidden]
        cfg, i = self.cfg, self.index
        x = rms_norm(h, self.input_norm, cfg.rms_norm_eps, cfg.gemma)
        qkv = F.linear(x, self.qkv_w, self.qkv_b)  # [T, q + 2 kv]
        lora.apply(i, "qkv_proj", qkv, x, batch.slot_ids, batch.lora_meta)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)  # [T, H, D]
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)  # [T, KVH, D]
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps, cfg.gemma)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps, cfg.gemma)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
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
            window=self.window,
            softcap=cfg.attn_softcap,
        )
        o = F.linear(attn_out, self.o_w, self.o_b)  # [T, hidden]
        lora.apply(i, "o_proj", o, attn_out, batch.slot_ids, batch.lora_meta)
        if cfg.gemma:
            h = h + rms_norm(o, self.post_attn_norm, cfg.rms_norm_eps, True)
            x = rms_norm(h, self.pre_mlp_norm, cfg.rms_norm_eps, True)
        else:
            h = h + o
            x = rms_norm(h, self.post_attn_norm, cfg.rms_norm_eps)
        gate_up = F.linear(x, self.gate_up_w, self.gate_up_b)  # [T, 2 * intermediate]
        lora.apply(i, "gate_up_proj", gate_up, x, batch.slot_ids, batch.lora_meta)
        gate, up = gate_up.chunk(2, dim=-1)
        act = self.act(gate) * up  # [T, intermediate]
        down = F.linear(act, self.down_w, self.down_b)
        lora.apply(i, "down_proj", down, act, batch.slot_ids, batch.lora_meta)
        if cfg.gemma:
            down = rms_norm(down, self.post_mlp_norm, cfg.rms_norm_eps, True)
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
        self.rope = RotaryEmbedding(cfg, max_len, device)
        # Gemma 3: sliding-window layers rotate with their own rope
        self.local_rope = RotaryEmbedding(cfg, max_len, device, cfg.local_rope) if cfg.local_rope else None
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
        cfg = self.cfg
        h = F.embedding(batch.token_ids, self.embed)  # [T, hidden]
        if cfg.gemma:  # x sqrt(hidden), the factor rounded to the model dtype as transformers does
            h = h * torch.tensor(cfg.hidden_size**0.5, dtype=h.dtype)
        attn_out = self.attn_out[: batch.num_tokens]
        rope = self.rope.cos_sin(batch.positions, batch.rope_lens)  # [T, D] each
        local = self.local_rope.cos_sin(batch.positions, batch.rope_lens) if self.local_rope else rope
        for layer in self.layers:
            layer_rope = local if layer.window else rope
            h = layer.forward(h, batch, kv, layer_rope, lora, attn_out, self.attention_backend)
        h = rms_norm(h[batch.logits_index], self.norm, cfg.rms_norm_eps, cfg.gemma)
        return softcap(F.linear(h, self.lm_head), cfg.final_softcap).float()
