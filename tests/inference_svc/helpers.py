"""Small builders shared by the inference_svc tests."""

from inference_svc.adapter_cache import HOST_LRU
from inference_svc.config import EngineConfig
from inference_svc.demo_model import write_demo_adapter
from inference_svc.engine import LLMEngine

# config.json of a tiny Llama-style model, for tests that read only the config
TINY_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 128,
    "torch_dtype": "float32",
}


def tiny_engine(
    model_dir, adapter_root, n_adapters=0, on_residency_change=None, host_eviction=HOST_LRU, **config
):
    """An engine on the tiny model with adapters a0..a{n-1} registered (rank 4 and 8 alternating)."""
    defaults = dict(
        max_loras=2, max_cpu_loras=4, max_lora_rank=8, device="cpu", kv_cache_bytes=1 << 20, kv_block_size=4
    )
    engine = LLMEngine(model_dir, EngineConfig(**{**defaults, **config}), on_residency_change, host_eviction)
    for i in range(n_adapters):
        path = adapter_root / f"a{i}"
        if not path.exists():
            write_demo_adapter(path, engine.model_config, rank=4 + 4 * (i % 2), seed=100 + i)
        engine.register_adapter(f"a{i}", path)
    return engine


def run_to_completion(engine, after_step=None):
    """Step until idle, calling `after_step(engine)` after each step; {request_id: [RequestOutput, ...]}."""
    outputs = {}
    while engine.has_unfinished_requests():
        step = engine.step()
        if after_step is not None:
            after_step(engine)
        if not step and not engine.scheduler.running:
            engine.adapters.wait_for_load()  # only adapter reads are left to wait for
        for out in step:
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def tokens_of(outputs):
    return [o.token.token_id for o in outputs if o.token is not None]
