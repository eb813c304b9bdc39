"""Triton LoRA ops against the torch reference, and the torch reference against a naive loop.

Without a GPU the Triton kernels run in the Triton interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1), so shapes stay small; the `gpu`-marked sweep uses serving-size shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import launch_configs
from kernels.metadata import LoraBatchMeta, make_batch_meta

from tolerances import assert_close

REPO = Path(__file__).resolve().parents[2]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BACKENDS = ["triton", "torch"]
SCALE = 0.75


@dataclass
class Case:
    x: torch.Tensor  # [T, K]
    lora_a: torch.Tensor  # [S, R, K]
    lora_b: torch.Tensor  # [S, N, R]
    t: torch.Tensor  # [T, R] float32
    out: torch.Tensor  # [T, width]
    slot_ids: torch.Tensor  # [T] int32


def unsorted_slot_map(num_tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """Random slots in an unsorted order, every third row -1 (a single token gets a slot)."""
    ids = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    if num_tokens > 1:
        ids[::3] = -1
    return ids[torch.randperm(num_tokens, generator=gen)].to(torch.int32)


def make_case(
    num_tokens: int,
    num_slots: int,
    rank: int,
    hidden_in: int,
    hidden_out: int,
    dtype: torch.dtype,
    seed: int = 0,
    slot_ids: list[int] | None = None,
    width: int | None = None,
) -> Case:
    """Inputs scaled so that x @ A.T and t @ B.T are O(1), on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    ids = (
        torch.tensor(slot_ids, dtype=torch.int32)
        if slot_ids is not None
        else unsorted_slot_map(num_tokens, num_slots, gen)
    )
    case = Case(
        x=torch.randn(num_tokens, hidden_in, generator=gen).to(dtype),
        lora_a=(torch.randn(num_slots, rank, hidden_in, generator=gen) / hidden_in**0.5).to(dtype),
        lora_b=(torch.randn(num_slots, hidden_out, rank, generator=gen) / rank**0.5).to(dtype),
        t=torch.randn(num_tokens, rank, generator=gen),
        out=torch.randn(num_tokens, width or hidden_out, generator=gen).to(dtype),
        slot_ids=ids,
    )
    return Case(*(getattr(case, f).to(DEVICE) for f in Case.__dataclass_fields__))


def run_shrink(case: Case, backend: str, scale: float = SCALE) -> torch.Tensor:
    meta = make_batch_meta(case.slot_ids)
    return kernels.lora_shrink(case.x, case.lora_a, case.slot_ids, scale, meta=meta, backend=backend)


def run_expand(case: Case, backend: str, out_offset: int = 0) -> torch.Tensor:
    out = case.out.clone()
    meta = make_batch_meta(case.slot_ids)
    kernels.lora_expand(out, case.t, case.lora_b, case.slot_ids, out_offset, meta=meta, backend=backend)
    return out


def check_shrink(case: Case, dtype: torch.dtype, scale: float = SCALE) -> None:
    got = run_shrink(case, "triton", scale)
    assert got.dtype == torch.float32
    assert_close(got, run_shrink(case, "torch", scale), dtype)
    assert torch.all(got[case.slot_ids < 0] == 0)


def check_expand(case: Case, dtype: torch.dtype, out_offset: int = 0) -> None:
    n = case.lora_b.shape[1]
    got = run_expand(case, "triton", out_offset)
    assert got.dtype == case.out.dtype
    assert_close(got, run_expand(case, "torch", out_offset), dtype)
    base = case.slot_ids < 0
    assert torch.equal(got[base], case.out[base]), "rows with slot -1 must be untouched"
    assert torch.equal(got[:, :out_offset], case.out[:, :out_offset]), "columns left of the slice"
    assert torch.equal(got[:, out_offset + n :], case.out[:, out_offset + n :]), "right of slice"


# --- the interpreter sweep: dtype x rank x slots x tokens x hidden --------------------------

SWEEP_RANKS = [1, 8, 16, 64]
SWEEP_SLOTS = [1, 4, 8]
SWEEP_TOKENS = [1, 7, 64]
# (K, N): block-aligned, then sizes no block size (a power of two >= 16) divides; 520 and 200
# also take several K steps, K splits and N blocks with the default table.
SWEEP_HIDDEN = [(128, 64), (100, 33), (520, 200)]


def sweep(test):
    """`test` over dtype x rank x slots x tokens x hidden (ids in that order)."""
    test = pytest.mark.parametrize("dtype", DTYPES, ids=str)(test)
    test = pytest.mark.parametrize("rank", SWEEP_RANKS)(test)
    test = pytest.mark.parametrize("num_slots", SWEEP_SLOTS)(test)
    test = pytest.mark.parametrize("num_tokens", SWEEP_TOKENS)(test)
    return pytest.mark.parametrize("hidden_in,hidden_out", SWEEP_HIDDEN)(test)


@sweep
def test_shrink_matches_reference(dtype, rank, num_slots, num_tokens, hidden_in, hidden_out):
    case = make_case(num_tokens, num_slots, rank, hidden_in, hidden_out, dtype, seed=rank + num_tokens)
    check_shrink(case, dtype)


@sweep
def test_expand_matches_reference(dtype, rank, num_slots, num_tokens, hidden_in, hidden_out):
    case = make_case(
        num_tokens, num_slots, rank, hidden_in, hidden_out, dtype, seed=rank, width=hidden_out + 10
    )
    check_expand(case, dtype, out_offset=3)


# --- slot maps and shapes the sweep does not reach ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_rows_base_only_leave_output_untouched(dtype, backend):
    case = make_case(9, 3, 8, 40, 24, dtype, slot_ids=[-1] * 9)
    assert torch.equal(run_shrink(case, backend), torch.zeros(9, 8, device=DEVICE))
    assert torch.equal(run_expand(case, backend), case.out)
    y = case.out.clone()
    kernels.add_lora(y, case.x, case.lora_a, case.lora_b, case.slot_ids, backend=backend)
    assert torch.equal(y, case.out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slot_ids", [[1, -1, 0, -1, 2, 1], [-1, -1, 0, 1], [2, 0, -1]])
def test_shrink_into_a_used_buffer_zeroes_every_row_without_an_adapter(backend, slot_ids):
    """`out=` given (the engine's workspace, holding the last step's values): rows with slot -1 are
    0 wherever they stand, also when the slots are not in order."""
    case = make_case(len(slot_ids), 3, 8, 64, 32, torch.float32, slot_ids=slot_ids)
    meta = make_batch_meta(case.slot_ids)
    out = torch.full((len(slot_ids), 8), 7.0, device=DEVICE)
    got = kernels.lora_shrink(case.x, case.lora_a, case.slot_ids, SCALE, meta=meta, backend=backend, out=out)
    assert torch.all(got[case.slot_ids < 0] == 0)
    assert_close(got, run_shrink(case, "torch"), torch.float32)


@pytest.mark.parametrize(
    "slot_ids",
    [[2, 0, 1, -1, 0, 2, 1], [3, 3, -1, 3], [1, 2, 3, 0, 3]],
    ids=["last-slot-unused", "only-last-slot", "first-slot-last"],
)
def test_slot_maps(slot_ids):
    case = make_case(len(slot_ids), 4, 16, 48, 40, torch.float32, slot_ids=slot_ids)
    check_shrink(case, torch.float32)
    check_expand(case, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_every_token_has_its_own_adapter(dtype):
    ids = torch.randperm(8, generator=torch.Generator().manual_seed(1)).tolist()
    case = make_case(8, 8, 16, 72, 56, dtype, slot_ids=ids)
    check_shrink(case, dtype)
    check_expand(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_offset_writes_only_its_slice(dtype):
    case = make_case(12, 3, 8, 32, 20, dtype, seed=5, width=60)
    check_expand(case, dtype, out_offset=20)
    check_expand(case, dtype, out_offset=40)  # the slice ends at the last column


@pytest.mark.parametrize("rank", [300, 512])
def test_large_ranks(rank):
    case = make_case(10, 3, rank, 40, 24, torch.float16, seed=rank)
    check_shrink(case, torch.float16)
    check_expand(case, torch.float16)


def test_long_segments_and_split_k():
    """150 tokens of one slot (several token blocks) and K = 1000 (several K splits in decode)."""
    prefill = make_case(150, 2, 16, 60, 40, torch.float16, slot_ids=[1] * 140 + [-1] * 5 + [0] * 5)
    check_shrink(prefill, torch.float16)
    check_expand(prefill, torch.float16)
    decode = make_case(6, 3, 16, 1000, 16, torch.float32, seed=2)
    check_shrink(decode, torch.float32)


def test_empty_batch():
    case = make_case(0, 2, 8, 16, 16, torch.float32, slot_ids=[])
    assert run_shrink(case, "triton").shape == (0, 8)
    assert run_expand(case, "triton").shape == (0, 16)


def test_scale_is_applied():
    case = make_case(7, 2, 8, 32, 16, torch.float32, seed=3)
    base = run_shrink(case, "triton", scale=1.0)
    assert_close(run_shrink(case, "triton", scale=-2.5), -2.5 * base, torch.float32)
    check_shrink(case, torch.float32, scale=-2.5)


@pytest.mark.parametrize(
    "x_dtype,w_dtype,out_dtype",
    [
        (torch.float16, torch.float32, torch.float32),
        (torch.bfloat16, torch.float16, torch.float32),
        (torch.float32, torch.bfloat16, torch.float16),
    ],
    ids=["fp16-fp32", "bf16-fp16", "fp32-bf16"],
)
def test_mixed_dtypes(x_dtype, w_dtype, out_dtype):
    case = make_case(9, 3, 8, 40, 24, w_dtype, seed=4)
    case.x = case.x.to(x_dtype)
    case.out = case.out.to(out_dtype)
    worst = torch.bfloat16 if torch.bfloat16 in (x_dtype, w_dtype, out_dtype) else torch.float16
    check_shrink(case, worst)
    check_expand(case, worst)


def test_strided_views():
    """Row strides that are not the row length: views into wider tensors."""
    case = make_case(11, 3, 16, 40, 24, torch.float16, seed=6)
    wide_x = torch.randn(11, 50, device=DEVICE).to(torch.float16)
    wide_x[:, 4:44] = case.x
    wide_a = torch.zeros(3, 16, 48, device=DEVICE, dtype=torch.float16)
    wide_a[:, :, 8:48] = case.lora_a
    strided = Case(wide_x[:, 4:44], wide_a[:, :, 8:48], case.lora_b, case.t, case.out, case.slot_ids)
    assert_close(run_shrink(strided, "triton"), run_shrink(case, "torch"), torch.float16)

    wide_out = torch.randn(11, 40, device=DEVICE).to(torch.float16)
    view = wide_out[:, 8:32]  # [T, 24], row stride 40
    before = wide_out.clone()
    meta = make_batch_meta(case.slot_ids)
    kernels.lora_expand(view, case.t, case.lora_b, case.slot_ids, meta=meta, backend="triton")
    expected = before.clone()
    kernels.lora_expand(expected[:, 8:32], case.t, case.lora_b, case.slot_ids, meta=meta, backend="torch")
    assert_close(wide_out, expected, torch.float16)
    assert torch.equal(wide_out[:, :8], before[:, :8]) and torch.equal(wide_out[:, 32:], before[:, 32:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_lora_backends_agree(dtype):
    case = make_case(20, 4, 16, 48, 30, dtype, seed=8, width=40)
    results = []
    for backend in BACKENDS:
        y = case.out.clone()
        kernels.add_lora(
            y, case.x, case.lora_a, case.lora_b, case.slot_ids, 0.5, out_offset=5, backend=backend
        )
        results.append(y)
    assert_close(results[0], results[1], dtype)
    assert not torch.equal(results[0], case.out)


@settings(max_examples=25, deadline=None, database=None)
@given(
    num_tokens=st.integers(0, 20),
    num_slots=st.integers(1, 5),
    rank=st.integers(1, 40),
    hidden_in=st.integers(1, 70),
    hidden_out=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_random_shapes_match_reference(num_tokens, num_slots, rank, hidden_in, hidden_out, dtype, data):
    ids = data.draw(st.lists(st.integers(-1, num_slots - 1), min_size=num_tokens, max_size=num_tokens))
    case = make_case(num_tokens, num_slots, rank, hidden_in, hidden_out, dtype, slot_ids=ids)
    check_shrink(case, dtype)
    check_expand(case, dtype)


def test_tuned_table_from_json(tmp_path, monkeypatch):
    """A tuned file replaces table entries; tiny tiles exercise every multi-block code path."""
    tiny = {"block_m": 16, "block_n": 16, "block_k": 16, "split_k": 3, "num_warps": 2, "num_stages": 1}
    buckets = {str(b): tiny for b in launch_configs.RANK_BUCKETS}
    table = {op: {cls: buckets for cls in launch_configs.SHAPE_CLASSES} for op in launch_configs.OPS}
    name = launch_configs.device_name(torch.device(DEVICE))
    (tmp_path / f"{launch_configs.config_file_stem(name)}.json").write_text(json.dumps(table))
    monkeypatch.setattr(launch_configs, "CONFIG_DIR", tmp_path)
    launch_configs.device_table.cache_clear()
    try:
        cfg = launch_configs.get_config("shrink", 1, 40, torch.device(DEVICE), 2)
        assert cfg == launch_configs.LaunchConfig(**tiny)
        case = make_case(40, 2, 40, 100, 70, torch.float16, seed=9)  # 3 rank blocks, 7 K steps
        check_shrink(case, torch.float16)
        check_expand(case, torch.float16, out_offset=0)
    finally:
        launch_configs.device_table.cache_clear()


# (replacements for a valid case, the message the ValueError must contain)
BAD_SHRINK_ARGS = [
    (lambda c: {"x": c.x.int()}, "x dtype"),
    (lambda c: {"x": c.x[None]}, "x must be 2-D"),
    (lambda c: {"x": c.x[:, :8]}, "lora_a"),
    (lambda c: {"x": c.x.t().contiguous().t()}, "contiguous"),
    (lambda c: {"lora_a": c.lora_a[:2]}, "use slot 2"),
    (lambda c: {"slot_ids": c.slot_ids[:3]}, "slot_ids shape"),
    (lambda c: {"x": c.x[:3], "slot_ids": c.slot_ids[:3]}, "meta was built for 6"),
]
BAD_EXPAND_ARGS = [
    (lambda c: {"out": c.out[:, 1:]}, "out_offset"),
    (lambda c: {"t": c.t[:, :4]}, "lora_b"),
    (lambda c: {"t": c.t.half()}, "t dtype"),
    (lambda c: {"out": c.out[:3]}, "out has 3 rows"),
    (lambda c: {"lora_b": c.lora_b.int()}, "lora_b dtype"),
]


def bad_case(bad) -> tuple[Case, LoraBatchMeta]:
    """A valid case with `bad`'s replacements, and the batch metadata of the valid one."""
    case = make_case(6, 3, 8, 16, 12, torch.float16, slot_ids=[0, 2, -1, 1, 2, 0])
    return replace(case, **bad(case)), make_batch_meta(case.slot_ids)


@pytest.mark.parametrize("bad,message", BAD_SHRINK_ARGS, ids=[m for _, m in BAD_SHRINK_ARGS])
def test_shrink_rejects_bad_arguments(bad, message):
    case, meta = bad_case(bad)
    with pytest.raises(ValueError, match=message):
        kernels.lora_shrink(case.x, case.lora_a, case.slot_ids, meta=meta, backend="triton")


@pytest.mark.parametrize("bad,message", BAD_EXPAND_ARGS, ids=[m for _, m in BAD_EXPAND_ARGS])
def test_expand_rejects_bad_arguments(bad, message):
    case, meta = bad_case(bad)
    with pytest.raises(ValueError, match=message):
        kernels.lora_expand(case.out, case.t, case.lora_b, case.slot_ids, meta=meta, backend="triton")


def test_backend_selection():
    cpu = torch.zeros(1)
    assert kernels.select_backend("auto", cpu) == "torch"
    assert kernels.select_backend("triton", cpu) == "triton"
    with pytest.raises(ValueError, match="backend"):
        kernels.select_backend("cuda", cpu)


# --- the torch reference against a naive per-row loop ---------------------------------------


def naive_shrink(x, lora_a, slot_ids, scale):
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float64)
    for i, slot in enumerate(slot_ids.tolist()):
        if slot >= 0:
            out[i] = scale * (lora_a[slot].double().cpu() @ x[i].double().cpu())
    return out


def naive_expand(out, t, lora_b, slot_ids, out_offset):
    result = out.double().cpu()
    n = lora_b.shape[1]
    for i, slot in enumerate(slot_ids.tolist()):
        if slot >= 0:
            result[i, out_offset : out_offset + n] += lora_b[slot].double().cpu() @ t[i].double().cpu()
    return result.to(out.dtype)


@pytest.mark.parametrize(
    "slot_ids",
    [[2, 0, -1, 2, 1, -1, 0], [-1, -1, -1], [1], [3, 0, 2, 1], [], [0, 1, 2, 3], [-1, -1, 0, 0, 2, 3, 3]],
    ids=["unsorted", "all-base", "single", "decode", "empty", "in-order-decode", "in-order-prefill"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_naive_loop(dtype, slot_ids):
    case = make_case(len(slot_ids), 4, 8, 37, 21, dtype, slot_ids=slot_ids, width=30)
    got = run_shrink(case, "torch")
    assert got.dtype == torch.float32
    expected = naive_shrink(case.x, case.lora_a, case.slot_ids, SCALE)
    assert_close(got.cpu(), expected, dtype)
    got = run_expand(case, "torch", out_offset=4)
    assert_close(got.cpu(), naive_expand(case.out, case.t, case.lora_b, case.slot_ids, 4), dtype)


# --- metadata -------------------------------------------------------------------------------


def test_make_batch_meta_example():
    meta = make_batch_meta(torch.tensor([2, 0, -1, 2, 1], dtype=torch.int32))
    assert meta.sorted_token_ids.tolist() == [2, 1, 4, 0, 3]
    assert meta.active_slots.tolist() == [0, 1, 2]
    assert meta.tokens_per_slot.tolist() == [1, 1, 2]
    assert meta.segment_starts.tolist() == [1, 2, 3]
    assert [(s, rows.tolist()) for s, rows in meta.groups()] == [(0, [1]), (1, [4]), (2, [0, 3])]
    assert (meta.max_tokens_per_slot, meta.max_active_slot, meta.num_active) == (2, 2, 3)
    assert not meta.in_order
    assert make_batch_meta(torch.tensor([-1, 0, 0, 3], dtype=torch.int32)).in_order


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.integers(-1, 6), max_size=40))
def test_make_batch_meta_groups_tokens_by_slot(ids):
    slot_ids = torch.tensor(ids, dtype=torch.int32)
    meta = make_batch_meta(slot_ids)
    order = meta.sorted_token_ids.tolist()
    assert meta.num_tokens == len(ids) and sorted(order) == list(range(len(ids)))
    active = sorted({s for s in ids if s >= 0})
    assert meta.active_slots.tolist() == active and meta.has_lora == bool(active)
    for a, slot in enumerate(active):
        start, count = int(meta.segment_starts[a]), int(meta.tokens_per_slot[a])
        rows = order[start : start + count]
        assert rows == [i for i, s in enumerate(ids) if s == slot]  # all of them, stable order
        assert meta.groups()[a][0] == slot and meta.groups()[a][1].tolist() == rows
    counts = [ids.count(s) for s in active]
    assert meta.max_tokens_per_slot == max(counts, default=0)
    assert meta.max_active_slot == max(active, default=-1)


def test_make_batch_meta_rejects_2d():
    with pytest.raises(ValueError, match="slot_ids must be 1-D"):
        make_batch_meta(torch.zeros(2, 2, dtype=torch.int32))


# --- launch configs -------------------------------------------------------------------------


def test_launch_config_keys():
    assert [launch_configs.rank_bucket(r) for r in (1, 16, 17, 64, 320, 512, 600)] == [
        16,
        16,
        32,
        64,
        512,
        512,
        512,
    ]
    assert launch_configs.shape_class(1) == "decode"
    assert launch_configs.shape_class(launch_configs.DECODE_MAX_TOKENS + 1) == "prefill"
    for op in launch_configs.OPS:
        for cls in launch_configs.SHAPE_CLASSES:
            for bucket in launch_configs.RANK_BUCKETS:
                assert (op, cls, bucket) in launch_configs.DEFAULT_CONFIGS
    fp16 = launch_configs.get_config("shrink", 1, 16, torch.device("cpu"), 2)
    fp32 = launch_configs.get_config("shrink", 1, 16, torch.device("cpu"), 4)
    assert fp32.block_k == fp16.block_k // 2


def test_config_table_json_round_trip_and_errors():
    entries = launch_configs.DEFAULT_CONFIGS
    table = launch_configs.config_table_to_json(entries)
    assert launch_configs.parse_config_table(json.loads(json.dumps(table)), "t") == entries
    good = {"block_m": 16, "block_n": 16, "block_k": 16}
    bad_tables = [
        ({"gemm": {}}, "op 'gemm'"),
        ({"shrink": {"mid": {}}}, "shape class 'mid'"),
        ({"shrink": {"decode": {"24": good}}}, "rank bucket '24'"),
        ({"shrink": {"decode": {"16": {**good, "warps": 4}}}}, "unknown fields"),
        ({"shrink": {"decode": {"16": {**good, "block_k": 48}}}}, "block_k \\(48\\)"),
    ]
    for bad, message in bad_tables:
        with pytest.raises(ValueError, match=message):
            launch_configs.parse_config_table(bad, "file.json")


# --- scripts --------------------------------------------------------------------------------


def run_module(*args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_bench_interpret_smoke():
    result = run_module("kernels.bench", "--interpret-smoke")
    assert result.returncode == 0, result.stderr
    assert "| op |" in result.stdout and "shrink" in result.stdout and "expand" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_without_cuda_explains():
    result = run_module("kernels.bench", "--quick", interpret=False)
    assert result.returncode != 0 and "CUDA" in result.stderr


def test_tune_interpret_smoke(tmp_path):
    result = run_module("kernels.tune", "--interpret-smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (written,) = tmp_path.glob("*.json")
    assert launch_configs.parse_config_table(json.loads(written.read_text()), str(written))


def test_kernels_compile_for_cuda_without_gpu():
    """The GPU (not interpreter) compile path: cubins for sm_90, no register spills."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    result = run_module("kernels.compile_check", "--quick", "--arch", "90", interpret=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- GPU sweep ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_in,hidden_out", [(4096, 4096), (4099, 1000)])
@pytest.mark.parametrize("num_slots,num_tokens", [(1, 1), (64, 64), (8, 256), (64, 4096), (4, 1000)])
@pytest.mark.parametrize("rank", [8, 16, 64, 128, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sweep_matches_reference(dtype, rank, num_slots, num_tokens, hidden_in, hidden_out):
    case = make_case(num_tokens, num_slots, rank, hidden_in, hidden_out, dtype, seed=rank)
    check_shrink(case, dtype)
    check_expand(case, dtype, out_offset=0)
