"""The LoRA path of a step allocates nothing: its intermediates live in the engine's workspace.

Allocations are observed with torch's own profiler (`profile_memory=True` records every CPU
allocation made through aten, including those inside an op), so a temporary added to any LoRA op
makes these tests fail.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from inference_svc.lora_slots import PROJECTION_GROUPS
from inference_svc.sampling import SamplingParams

from helpers import run_to_completion, tiny_engine

DECODE = [0, 1, 2, 3]  # one token per slot, in slot order: batched matmuls on the tensors' own rows
MIXED = [2, -1, 0, 0, 3, -1, 2, 1, 1, 1, 0]  # prefill chunks, base rows, unsorted: gather, per-slot
SORTED = [-1, -1, 0, 0, 0, 1, 3, 3]  # in slot order but uneven: per-slot matmuls on row slices
UNIFORM = [3, 2, 1, 0]  # one token per slot, out of order: gather, batched matmuls, scatter


def allocations(fn) -> list[tuple[str, int]]:
    """(op, bytes) of every CPU allocation `fn` makes."""
    fn()  # warm up: first calls may set up lazily-initialised library state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]


def activations(engine, group: str, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [T, in], y [T, fused out]) for one fused projection, in the model's dtype."""
    shapes = engine.model_config.module_shapes()
    modules = PROJECTION_GROUPS[group]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, shapes[modules[0]][0], generator=gen).to(engine.model.dtype)
    y = torch.randn(num_tokens, sum(shapes[m][1] for m in modules), generator=gen).to(engine.model.dtype)
    return x, y


@pytest.mark.parametrize(
    "dtype, lora_dtype", [("float32", "auto"), ("bfloat16", "auto"), ("float32", "bfloat16")]
)
@pytest.mark.parametrize(
    "slots", [DECODE, MIXED, SORTED, UNIFORM], ids=["decode", "mixed", "sorted", "uniform"]
)
def test_every_projection_of_every_layer_applies_lora_without_allocating(
    model_dir, adapter_root, dtype, lora_dtype, slots
):
    engine = tiny_engine(model_dir, adapter_root, 4, max_loras=4, dtype=dtype, lora_dtype=lora_dtype)
    for i in range(4):
        assert engine.adapters.acquire_slot(f"a{i}") == i
    lora = engine.lora
    slot_ids = torch.tensor(slots, dtype=torch.int32)
    meta = kernels.make_batch_meta(slot_ids)
    calls = []
    for layer in range(engine.model_config.num_layers):
        for group in PROJECTION_GROUPS:
            x, y = activations(engine, group, len(slots), seed=layer)
            calls.append((layer, group, x, y, y.clone()))

    def apply_all():
        for layer, group, x, y, _ in calls:
            lora.apply(layer, group, y, x, slot_ids, meta)

    assert allocations(apply_all) == []

    # And it computes the right thing: each row's delta, per row in float64, added twice (the
    # warm-up call and the profiled one).
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    for layer, group, x, y, y0 in calls:
        expected = y0.double()
        for i, slot in enumerate(slots):
            if slot < 0:
                continue
            shrunk = lora.a[layer][group][slot].double() @ x[i].double()  # [n*R]
            for m in lora.groups[group]:
                row, b = lora.rank_offset[m], lora.b[layer][m][slot].double()  # [N, R]
                offset = lora.out_offset[m]
                expected[i, offset : offset + b.shape[0]] += 2 * (b @ shrunk[row : row + lora.max_rank])
        torch.testing.assert_close(y.double(), expected, **tolerance)
        assert not torch.equal(y, y0)  # the adapters really changed the output


def test_plan_counts_the_workspace_the_engine_allocates(model_dir, adapter_root):
    for config in (dict(), dict(dtype="bfloat16"), dict(lora_dtype="float16", max_num_batched_tokens=96)):
        engine = tiny_engine(model_dir, adapter_root, **config)
        assert engine.plan.lora_workspace_bytes == engine.lora.workspace.nbytes > 0
        assert engine.plan.device_total_bytes == (
            engine.plan.weights_bytes
            + engine.plan.kv_cache_bytes
            + engine.plan.slots_bytes
            + engine.plan.lora_workspace_bytes
            + engine.plan.attention_workspace_bytes
        )
        assert engine.plan.attention_workspace_bytes >= engine.model.attn_out.nbytes + engine.kv.tables.nbytes


def test_full_token_budget_steps_fit_the_workspace(model_dir, adapter_root):
    """Steps of exactly max_num_batched_tokens tokens (chunked prefill fills the budget)."""
    engine = tiny_engine(model_dir, adapter_root, 3, max_loras=3, max_num_seqs=4, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i, adapter in enumerate(["a0", None, "a1", "a2"]):
        engine.add_request(f"r{i}", [(7 * i + j) % 90 + 1 for j in range(11 + i)], params, adapter)
    results = run_to_completion(engine)
    assert max(r.num_tokens for r in engine.step_history) == 16
    assert all(len(outputs) == 3 for outputs in results.values())


def test_score_refuses_more_tokens_than_one_step_holds(model_dir, adapter_root):
    engine = tiny_engine(model_dir, adapter_root, max_num_seqs=2, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\).*got 9"):
        engine.score([[1, 2, 3, 4, 5], [6, 7, 8, 9]], [None, None])
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
