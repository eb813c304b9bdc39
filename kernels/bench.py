"""Benchmark the batched LoRA ops on a GPU: Triton vs the torch reference vs a dense loop.

    python -m kernels.bench [--quick] [--dtype bf16] [--iters 50] [--peak-gbps 4800]
    python -m kernels.bench --interpret-smoke   # no GPU: one tiny shape through the interpreter

Each case is (tokens T, hidden size H, rank R, distinct adapters A), with tokens spread over the
adapters in an unsorted order; shrink is `[T,H] -> [T,R]`, expand is `[T,R] -> [T,H]`. Each
implementation is timed with CUDA events: the median of `--iters` runs, the L2 cache flushed
before every run, the per-step metadata built once outside the timing (as the engine does).

Columns:
  - triton, torch, dense: median microseconds. torch is `kernels.torch_ops` (one matmul per
    adapter plus gather/scatter); dense is a loop of plain matmuls, one per adapter, on tokens
    already grouped contiguously - what a host loop costs without any gather or scatter.
  - GB/s: bytes the op must move over the Triton time, where bytes are
      shrink: x (T*H) + weights of the A adapters present (A*R*H) + output (T*R*4)
      expand: t (T*R*4) + weights of the A adapters present (A*H*R) + out read and written (2*T*H)
    (fp16/bf16 elements are 2 bytes).
  - %peak: GB/s over the device's peak memory bandwidth (PEAK_GBPS by device name, or
    `--peak-gbps`); decode shapes are memory bound, so this is the number to watch.
  - x torch: torch time / triton time.
  - err: max |triton - torch| of the first run (a check that the timed code is right).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Peak memory bandwidth in GB/s, matched in order as substrings of torch.cuda.get_device_name().
PEAK_GBPS = (
    ("B200", 8000.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB parts
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    rank: int
    adapters: int


def shapes(quick: bool) -> list[Shape]:
    """Decode and prefill shapes; adapters never exceed tokens."""
    if quick:
        tokens, hiddens, ranks, adapters = (1, 64, 1024), (4096,), (16, 64), (1, 8)
    else:
        tokens, hiddens, ranks = (1, 16, 64, 256, 1024, 4096), (4096, 8192), (8, 16, 64, 128)
        adapters = (1, 8, 64)
    return [Shape(t, h, r, a) for t in tokens for h in hiddens for r in ranks for a in adapters if a <= t]


SMOKE_SHAPES = [Shape(5, 64, 8, 2)]


def peak_gbps(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((gbps for key, gbps in PEAK_GBPS if key in device_name), None)


def time_us(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Median microseconds of `fn` after one warm-up call (which also compiles kernels)."""
    fn()
    if device.type != "cuda":  # interpreter smoke run: wall clock is all there is
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters * 1e6
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device)  # 256 MiB > any L2
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
    ]
    torch.cuda.synchronize(device)
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3


def op_bytes(op: str, s: Shape, elem: int) -> int:
    """Bytes an op must move at least (see the module docstring)."""
    weights = s.adapters * s.rank * s.hidden * elem
    if op == "shrink":
        return s.tokens * s.hidden * elem + weights + s.tokens * s.rank * 4
    return s.tokens * s.rank * 4 + weights + 2 * s.tokens * s.hidden * elem


def bench_shape(s: Shape, dtype: torch.dtype, device: torch.device, iters: int) -> list[dict]:
    """Time shrink and expand of one shape with the three implementations."""
    import kernels

    gen = torch.Generator(device=device).manual_seed(0)
    slot_ids = (torch.arange(s.tokens, device=device) % s.adapters).to(torch.int32)
    slot_ids = slot_ids[torch.randperm(s.tokens, device=device, generator=gen)]
    meta = kernels.make_batch_meta(slot_ids)
    x = torch.randn(s.tokens, s.hidden, device=device, dtype=dtype, generator=gen)  # [T, H]
    lora_a = torch.randn(s.adapters, s.rank, s.hidden, device=device, dtype=dtype, generator=gen)
    lora_a /= s.hidden**0.5  # [A, R, H]
    lora_b = torch.randn(s.adapters, s.hidden, s.rank, device=device, dtype=dtype, generator=gen)
    lora_b /= s.rank**0.5  # [A, H, R]
    out = torch.zeros(s.tokens, s.hidden, device=device, dtype=dtype)  # [T, H]
    t = kernels.lora_shrink(x, lora_a, slot_ids, meta=meta, backend="torch")  # [T, R] float32

    groups = [(slot, rows) for slot, rows in meta.groups()]
    x_groups = [x[rows].contiguous() for _, rows in groups]  # [n, H] each
    t_groups = [t[rows].to(dtype) for _, rows in groups]  # [n, R] each
    out_groups = [out[rows].contiguous() for _, rows in groups]  # [n, H] each

    def shrink(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: kernels.lora_shrink(x, lora_a, slot_ids, meta=meta, backend=backend)

    def expand(backend: str, target: torch.Tensor) -> Callable[[], None]:
        return lambda: kernels.lora_expand(target, t, lora_b, slot_ids, meta=meta, backend=backend)

    def dense_shrink() -> None:
        for (slot, _), xg in zip(groups, x_groups):
            torch.matmul(xg, lora_a[slot].t())

    def dense_expand() -> None:
        for (slot, _), tg, og in zip(groups, t_groups, out_groups):
            og.addmm_(tg, lora_b[slot].t())

    shrink_err = (shrink("triton")() - shrink("torch")()).abs().max().item()
    got, want = out.clone(), out.clone()
    expand("triton", got)()
    expand("torch", want)()
    expand_err = (got.float() - want.float()).abs().max().item()

    return [
        {
            "op": "shrink",
            "triton": time_us(shrink("triton"), iters, device),
            "torch": time_us(shrink("torch"), iters, device),
            "dense": time_us(dense_shrink, iters, device),
            "err": shrink_err,
        },
        {
            "op": "expand",
            "triton": time_us(expand("triton", out), iters, device),
            "torch": time_us(expand("torch", out), iters, device),
            "dense": time_us(dense_expand, iters, device),
            "err": expand_err,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the batched LoRA ops (see module doc).")
    parser.add_argument("--quick", action="store_true", help="a handful of shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=50, help="timed runs per measurement")
    parser.add_argument("--peak-gbps", type=float, help="peak memory bandwidth of this GPU, GB/s")
    parser.add_argument("--interpret-smoke", action="store_true", help="CPU: one tiny shape, interpreted")
    args = parser.parse_args(argv)

    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.triton_ops imports triton
        device, cases, iters, name = torch.device("cpu"), SMOKE_SHAPES, 2, "cpu (Triton interpreter)"
    elif not torch.cuda.is_available():
        print(
            "kernels.bench needs a CUDA GPU, and torch.cuda.is_available() is False here. Run it on "
            "a GPU machine, or pass --interpret-smoke to check the script through the Triton "
            "interpreter on CPU.",
            file=sys.stderr,
        )
        return 2
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.bench: unset TRITON_INTERPRET to time the compiled kernels", file=sys.stderr)
        return 2
    else:
        device, cases, iters = torch.device("cuda"), shapes(args.quick), args.iters
        name = torch.cuda.get_device_name(device)

    dtype = DTYPES[args.dtype]
    peak = peak_gbps(name, args.peak_gbps)
    print(
        f"device: {name}; dtype: {args.dtype}; peak: {f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbps)'}"
    )
    print()
    print(
        "| op | tokens | hidden | rank | adapters | triton us | torch us | dense us | GB/s | %peak | x torch | err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in cases:
        for row in bench_shape(s, dtype, device, iters):
            gbps = op_bytes(row["op"], s, dtype.itemsize) / (row["triton"] * 1e3)
            pct = f"{100 * gbps / peak:.0f}%" if peak else "n/a"
            print(
                f"| {row['op']} | {s.tokens} | {s.hidden} | {s.rank} | {s.adapters} "
                f"| {row['triton']:.1f} | {row['torch']:.1f} | {row['dense']:.1f} | {gbps:.0f} "
                f"| {pct} | {row['torch'] / row['triton']:.2f} | {row['err']:.1e} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
