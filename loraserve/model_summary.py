"""The base model's shape, read from a Hugging Face `config.json` (and nothing else); torch-free.

Each supported family reads its own fields the way its transformers config class does (defaults
included); rope parameters are normalised from transformers-4 (`rope_theta` + `rope_scaling`) or
transformers-5 (`rope_parameters`) fields. Anything else is refused with `InvalidModel` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import InvalidModel


@dataclass(frozen=True)
class Family:
    """What differs between the supported decoder families (their transformers config classes)."""

    architecture: str
    max_position_embeddings: int  # the config class's default
    qkv_bias: str  # "always" | "never" | "attention_bias" (q/k/v biases)
    o_bias: bool  # o_proj carries a bias when attention_bias is set
    mlp_bias: bool  # reads mlp_bias
    qk_norm: bool  # per-head RMSNorm of q and k before rope (Qwen3)
    windows: str  # "none" | "all" (sliding_window) | "layer_types" (Qwen2/3) | "pattern" (Gemma)
    default_head_dim: int | None  # None = hidden_size // num_attention_heads
    default_window: int | None = 4096  # sliding_window's default
    # Gemma 2/3: (1 + w) RMSNorms, four per layer, embeddings x sqrt(hidden), query_pre_attn_scalar,
    # logit soft-capping, `hidden_activation`; the value is the default local/global pattern length
    gemma_pattern: int = 0
    fused: bool = False  # Phi-3: checkpoints (and adapters) hold qkv_proj and gate_up_proj
    tie_default: bool = False  # tie_word_embeddings' default


FAMILIES = {
    "llama": Family("LlamaForCausalLM", 2048, "attention_bias", True, True, False, "none", None),
    "mistral": Family("MistralForCausalLM", 4096 * 32, "never", False, False, False, "all", None),
    "qwen2": Family("Qwen2ForCausalLM", 32768, "always", False, False, False, "layer_types", None),
    "qwen3": Family("Qwen3ForCausalLM", 32768, "attention_bias", True, False, True, "layer_types", 128),
    "gemma2": Family(
        "Gemma2ForCausalLM",
        8192,
        "attention_bias",
        True,
        False,
        False,
        "pattern",
        256,
        gemma_pattern=2,
        tie_default=True,
    ),
    "gemma3_text": Family(
        "Gemma3ForCausalLM",
        131072,
        "attention_bias",
        True,
        False,
        True,
        "pattern",
        256,
        gemma_pattern=6,
        tie_default=True,
    ),
    "phi3": Family(
        "Phi3ForCausalLM", 4096, "never", False, False, False, "all", None, default_window=None, fused=True
    ),
}
# Gemma 3's default rope bases (Gemma3TextConfig.default_theta) of global and local layers
GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
# activations of the MLP's gate (transformers' ACT2FN names)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
SUPPORTED_ARCHITECTURES = {f.architecture: name for name, f in FAMILIES.items()}

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# rope types that read original_max_position_embeddings (transformers' standardize_rope_params)
_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, as transformers' `rope_parameters` holds them after
    `standardize_rope_params`; `inference_svc/rope.py` turns them into frequencies."""

    rope_type: str = "default"  # one of ROPE_TYPES
    theta: float = 10000.0
    factor: float | None = None  # linear, dynamic, yarn, llama3; longrope (None = derived)
    original_max_position_embeddings: int | None = None  # llama3, yarn, longrope
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn, longrope (None = derived from factor)
    beta_fast: float | None = None  # yarn (None = 32)
    beta_slow: float | None = None  # yarn (None = 1)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] | None = None  # longrope, head_dim / 2 values
    long_factor: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a supported decoder that the engine needs."""

    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # a key of FAMILIES
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # may differ from hidden_size / num_heads
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (Qwen2 always has them)
    mlp_bias: bool
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    o_proj_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of each q and k head, before rope
    rope: RopeConfig = RopeConfig()
    # per layer: the sliding attention window (a query at p sees keys in (p - w, p]), 0 = full
    layer_windows: tuple[int, ...] = ()
    hidden_act: str = "silu"  # one of ACTIVATIONS
    gemma: bool = False  # (1 + w) norms (four per layer), embeddings x sqrt(hidden_size)
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    attn_softcap: float = 0.0  # attention logits -> tanh(s / c) * c before the softmax; 0 = off
    final_softcap: float = 0.0  # the same on the output logits
    local_rope: RopeConfig | None = None  # Gemma 3: the rope of sliding-window layers
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj are the checkpoint's (and LoRA's) modules

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise InvalidModel(f"{path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InvalidModel(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        model_type, family = _family(raw)
        act_field = "hidden_activation" if family.gemma_pattern else "hidden_act"
        act = raw.get(act_field) or ("gelu_pytorch_tanh" if family.gemma_pattern else "silu")
        if act not in ACTIVATIONS or (act != "silu") != bool(family.gemma_pattern):
            raise InvalidModel(f"{model_type}: {act_field} {act!r} is not supported")
        if raw.get("use_bidirectional_attention"):
            raise InvalidModel(f"{model_type}: use_bidirectional_attention is not supported (causal only)")
        if raw.get("quantization_config"):
            method = raw["quantization_config"].get("quant_method", "?")
            raise InvalidModel(f"{model_type}: quantized checkpoints ({method}) are not supported")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            layers = int(raw["num_hidden_layers"])
            head_dim = int(raw.get("head_dim") or family.default_head_dim or hidden // heads)
            max_pos = int(raw.get("max_position_embeddings", family.max_position_embeddings))
            attention_bias = bool(raw.get("attention_bias", False))
            local_rope = None
            if model_type == "gemma3_text":
                rope, local_rope = _gemma3_ropes(raw, head_dim, max_pos)
            else:
                rope = _rope(raw, model_type, head_dim, max_pos)
            gemma = bool(family.gemma_pattern)
            return cls(
                architecture=family.architecture,
                model_type=model_type,
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                vocab_size=int(raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope.theta,
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", family.tie_default)),
                attention_bias={"always": True, "never": False}.get(family.qkv_bias, attention_bias),
                mlp_bias=family.mlp_bias and bool(raw.get("mlp_bias", False)),
                torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                o_proj_bias=family.o_bias and attention_bias,
                qk_norm=family.qk_norm,
                rope=rope,
                layer_windows=_windows(raw, model_type, family, layers),
                hidden_act=act,
                gemma=gemma,
                attn_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
                attn_softcap=float(raw.get("attn_logit_softcapping", _softcap(model_type, "attn")) or 0),
                final_softcap=float(raw.get("final_logit_softcapping", _softcap(model_type, "final")) or 0),
                local_rope=local_rope,
                fused=family.fused,
            )
        except KeyError as e:
            raise InvalidModel(f"config.json lacks required field {e.args[0]!r}") from e

    @property
    def max_context_len(self) -> int:
        """The default max_model_len: max_position_embeddings, stretched by linear and dynamic
        scaling's factor and to YaRN's original_max_position_embeddings x factor (as vLLM does);
        llama3 and LongRoPE configs already state the extended length."""
        rope = self.rope
        if rope.rope_type in ("linear", "dynamic"):
            return int(self.max_position_embeddings * rope.factor)
        if rope.rope_type == "yarn" and rope.factor:
            return max(self.max_position_embeddings, int(rope.original_max_position_embeddings * rope.factor))
        return self.max_position_embeddings

    @property
    def rope_recompute_len(self) -> int:
        """Phi-3 with LongRoPE: the length past which a sequence cached with the short rope is
        recomputed with the long one (transformers' Phi-3 generation does); 0 = never."""
        if self.model_type == "phi3" and self.rope.rope_type == "longrope":
            return self.rope.original_max_position_embeddings
        return 0

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-capable linear layer of one decoder layer."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        if self.fused:
            return {
                "qkv_proj": (self.hidden_size, q_out + 2 * kv_out),
                "o_proj": (q_out, self.hidden_size),
                "gate_up_proj": (self.hidden_size, 2 * self.intermediate_size),
                "down_proj": (self.intermediate_size, self.hidden_size),
            }
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }

    def num_parameters(self) -> int:
        norms = 4 if self.gemma else 2
        per_layer = sum(i * o for i, o in self.module_shapes().values()) + norms * self.hidden_size
        if self.attention_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.o_proj_bias:
            per_layer += self.hidden_size
        if self.mlp_bias:
            per_layer += 2 * self.intermediate_size + self.hidden_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + embed + head + self.hidden_size

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        """Bytes of keys + values one token takes across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size


def _family(raw: dict) -> tuple[str, Family]:
    """The family named by `model_type` (or, without one, by `architectures`), consistent with both."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type is None:
        model_type = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if model_type is None:
            raise InvalidModel(
                f"architectures {archs} not supported; expected one of {sorted(SUPPORTED_ARCHITECTURES)}"
            )
    if model_type == "gemma3":
        raise InvalidModel(
            f"model_type 'gemma3' (architectures {archs}) is the multimodal Gemma 3; only its text-only "
            "form is supported (Gemma3ForCausalLM, model_type gemma3_text)"
        )
    if model_type not in FAMILIES:
        raise InvalidModel(
            f"model_type {model_type!r} (architectures {archs}) is not supported; "
            f"supported model types: {', '.join(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    if archs and family.architecture not in archs:
        raise InvalidModel(
            f"architectures {archs} not supported for model_type {model_type!r}; "
            f"expected {family.architecture}"
        )
    return model_type, family


def _rope(raw: dict, model_type: str, head_dim: int, max_pos: int) -> RopeConfig:
    """Rope parameters from transformers-4 or -5 fields, the way `standardize_rope_params` reads them:
    `rope_scaling` wins over `rope_parameters`; rope_theta from the dict, else the top level; a
    top-level original_max_position_embeddings wins over the dict's, which defaults to
    max_position_embeddings."""
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise InvalidModel(f"{model_type}: per-layer-type rope parameters {sorted(params)} are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config's renaming
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise InvalidModel(
            f"{model_type}: rope scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise InvalidModel(f"{model_type}: partial_rotary_factor {partial} is not supported (only 1.0)")
    missing = [k for k in _REQUIRED.get(rope_type, ()) if k not in params]
    if missing:
        raise InvalidModel(
            f"{model_type}: rope type {rope_type!r} needs {', '.join(missing)} in rope_scaling"
        )
    original = None
    if rope_type in _ORIGINAL_MAX:
        original = int(
            raw.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or max_pos
        )

    def opt(key: str) -> float | None:
        return None if params.get(key) is None else float(params[key])

    def factors(key: str) -> tuple[float, ...] | None:
        if params.get(key) is None:
            return None
        values = tuple(float(v) for v in params[key])
        if len(values) != head_dim // 2:
            raise InvalidModel(
                f"{model_type}: longrope {key} has {len(values)} values, expected {head_dim // 2}"
            )
        return values

    if rope_type in ("linear", "dynamic", "llama3") and params["factor"] is None:
        raise InvalidModel(f"{model_type}: rope type {rope_type!r} needs a factor")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(params.get("rope_theta", raw.get("rope_theta", 10000.0))),
        factor=opt("factor"),
        original_max_position_embeddings=original,
        low_freq_factor=opt("low_freq_factor"),
        high_freq_factor=opt("high_freq_factor"),
        attention_factor=opt("attention_factor"),
        beta_fast=opt("beta_fast"),
        beta_slow=opt("beta_slow"),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        short_factor=factors("short_factor"),
        long_factor=factors("long_factor"),
    )


def _windows(raw: dict, model_type: str, family: Family, layers: int) -> tuple[int, ...]:
    """Each layer's sliding window (0 = full attention), as the family's transformers model reads it:
    Mistral and Phi-3 every layer from `sliding_window`; Qwen2/3 only with `use_sliding_window`, on
    the layers `layer_types` names "sliding_attention" (by default those at index >=
    `max_window_layers`); Gemma 2/3 always, on the `layer_types` sliding layers (by default all but
    every `sliding_window_pattern`-th)."""
    if family.windows == "none":
        return (0,) * layers
    if family.windows == "all":
        window = raw.get("sliding_window", family.default_window)
        return (int(window or 0),) * layers
    if family.windows == "pattern":  # Gemma: always on, local/global by layer_types
        window = raw.get("sliding_window", family.default_window)
        pattern = int(raw.get("sliding_window_pattern", family.gemma_pattern))
        types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        ]
        if not window and "sliding_attention" in types:
            raise InvalidModel(
                f"{model_type}: sliding_attention layers need a sliding_window, got {window!r}"
            )
    else:
        window = raw.get("sliding_window", 4096) if raw.get("use_sliding_window", False) else None
        types = raw.get("layer_types") or [
            "sliding_attention"
            if window is not None and i >= raw.get("max_window_layers", 28)
            else "full_attention"
            for i in range(layers)
        ]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown or len(types) != layers:
        raise InvalidModel(
            f"{model_type}: layer_types {types} not supported (full/sliding_attention per layer)"
        )
    return tuple(int(window or 0) if t == "sliding_attention" else 0 for t in types)


def _softcap(model_type: str, which: str) -> float | None:
    """The config class's default of attn_logit_softcapping / final_logit_softcapping."""
    return {("gemma2", "attn"): 50.0, ("gemma2", "final"): 30.0}.get((model_type, which))


def _gemma3_ropes(raw: dict, head_dim: int, max_pos: int) -> tuple[RopeConfig, RopeConfig]:
    """Global and local rope of Gemma 3, as `Gemma3TextConfig.convert_rope_params_to_dict` reads
    them: transformers-5 `rope_parameters` per layer type, or transformers-4 `rope_theta` +
    `rope_scaling` (global layers) and `rope_local_base_freq` (local layers)."""
    params = raw.get("rope_parameters") or {}
    if params and not all(k in GEMMA3_THETA for k in params):
        raise InvalidModel(
            f"gemma3_text: rope_parameters keys {sorted(params)} are not full/sliding_attention"
        )
    ropes = {t: dict(params.get(t) or {"rope_type": "default"}) for t in GEMMA3_THETA}
    if raw.get("rope_scaling"):
        ropes["full_attention"].update(raw["rope_scaling"])
    top = {"full_attention": raw.get("rope_theta"), "sliding_attention": raw.get("rope_local_base_freq")}
    rest = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    out = []
    for layer_type, theta in GEMMA3_THETA.items():
        ropes[layer_type].setdefault("rope_theta", top[layer_type] or theta)
        out.append(_rope({**rest, "rope_parameters": ropes[layer_type]}, "gemma3_text", head_dim, max_pos))
    return out[0], out[1]
