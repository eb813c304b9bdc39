"""The engine's mixed-adapter logits with the Triton kernels forced (interpreter on CPU)."""

import os

import pytest
import torch

from inference_svc.sampling import SamplingParams

from oracles import peft_model_with

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


def test_triton_backend_matches_peft_on_tiny_models(hf_checkpoint):
    from test_engine_vs_peft import ATOL, engine_for, hf_logits, rows

    kind, model_dir, adapters = hf_checkpoint
    if kind not in ("llama", "mistral"):  # mistral: the kernel's sliding window inside the engine
        pytest.skip("two models are enough under the interpreter")
    reference = peft_model_with(model_dir, adapters)
    engine = engine_for(model_dir, adapters, backend="triton")
    batch = rows(adapters)
    got = engine.score([ids for ids, _ in batch], [a for _, a in batch])
    for (ids, adapter), logits in zip(batch, got):
        torch.testing.assert_close(logits, hf_logits(reference, ids, adapter), atol=ATOL, rtol=0)
    torch_engine = engine_for(model_dir, adapters, backend="torch")
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts, names = [ids for ids, _ in batch], [a for _, a in batch]
    triton_tokens = [c.token_ids for c in engine.generate(prompts, params, names)]
    torch_tokens = [c.token_ids for c in torch_engine.generate(prompts, params, names)]
    assert triton_tokens == torch_tokens


def test_warm_up_runs_every_launch_shape_and_leaves_the_engine_clean(model_dir, adapter_root):
    from helpers import tiny_engine

    engine = tiny_engine(
        model_dir,
        adapter_root,
        max_loras=2,
        max_num_seqs=3,
        max_num_batched_tokens=12,
        lora_backend="triton",
        attention_backend="triton",
    )
    free = engine.kv.num_free_blocks
    assert engine.warm_up() == [(1, 1), (2, 2), (3, 3), (1, 2), (1, 4), (1, 8), (1, 12)]
    assert engine.kv.num_free_blocks == free and not engine.adapters.refcount
    assert (
        tiny_engine(model_dir, adapter_root, lora_backend="torch", attention_backend="torch").warm_up() == []
    )
