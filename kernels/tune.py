"""Tune the launch-config table for this GPU and write `kernels/configs/<device>.json`.

    python -m kernels.tune [--dtype bf16] [--hidden 4096] [--iters 20] [--out kernels/configs]
    python -m kernels.tune --interpret-smoke --out DIR   # no GPU: checks the script end to end

For every (op, shape class, rank bucket) key of `launch_configs`, each candidate `LaunchConfig`
from a small grid is run on one representative shape (decode: 64 tokens over 16 adapters;
prefill: 2048 tokens over 4 adapters), checked against the torch reference and timed with
`kernels.bench.time_us`; the fastest correct candidate is kept. Candidates that fail to compile
(e.g. out of shared memory) or disagree with the reference are skipped. Each candidate is a
fresh Triton compile (about a second), so the full table (24 keys, about 40 candidates each)
takes roughly 15-30 minutes; `--ops` and `--ranks` limit it.

The written file holds only tuned keys; `launch_configs.device_table` overlays it on the
defaults whenever the device name matches. Check it with
`python -m kernels.compile_check --configs FILE`, run `python -m kernels.bench` before and after,
and commit it with the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

from kernels import launch_configs
from kernels.launch_configs import LaunchConfig

REPRESENTATIVE = {"decode": (64, 16), "prefill": (2048, 4)}  # class -> (tokens, adapters)
SMOKE_REPRESENTATIVE = {"decode": (4, 2), "prefill": (40, 2)}
TOLERANCES = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-3}


def candidates(op: str, cls: str, bucket: int) -> list[LaunchConfig]:
    """The grid searched for one key (block sizes shrink to the problem at launch anyway)."""
    block_m = 16 if cls == "decode" else 64
    if op == "shrink":
        split_k = (1, 4, 8, 16) if cls == "decode" else (1, 2, 4)
        grid = itertools.product((min(bucket, 128),), (64, 128, 256), split_k)
    else:
        grid = itertools.product((64, 128, 256), (16, 32, 64), (1,))
    configs = [
        LaunchConfig(block_m, n, k, sk, warps, stages)
        for (n, k, sk), warps, stages in itertools.product(grid, (4, 8), (2, 3))
    ]
    if op == "expand":
        configs = [c for c in configs if c.block_k <= max(bucket, 16)]
    return configs


def tune_key(
    key: tuple[str, str, int],
    cands: list[LaunchConfig],
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    iters: int,
    device: torch.device,
) -> dict[LaunchConfig, float]:
    """Median microseconds of every candidate that runs and matches the torch reference, for
    `key` on `shape` = (tokens, adapters, hidden)."""
    import kernels
    from kernels.bench import time_us

    op, _, bucket = key
    tokens, adapters, hidden = shape
    gen = torch.Generator(device=device).manual_seed(bucket)
    slot_ids = (torch.arange(tokens, device=device) % adapters).to(torch.int32)
    meta = kernels.make_batch_meta(slot_ids)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)  # [T, H]
    lora_a = torch.randn(adapters, bucket, hidden, device=device, generator=gen) / hidden**0.5
    lora_b = torch.randn(adapters, hidden, bucket, device=device, generator=gen) / bucket**0.5
    lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)  # [A, R, H], [A, H, R]
    t = kernels.lora_shrink(x, lora_a, slot_ids, meta=meta, backend="torch")  # [T, R]
    out = torch.zeros(tokens, hidden, device=device, dtype=dtype)  # [T, H], stays zero
    scratch = out.clone()  # [T, H], accumulates while timing
    expected = t
    if op == "expand":
        expected = out.clone()
        kernels.lora_expand(expected, t, lora_b, slot_ids, meta=meta, backend="torch")

    def run(target: torch.Tensor) -> torch.Tensor:
        if op == "shrink":
            return kernels.lora_shrink(x, lora_a, slot_ids, meta=meta, backend="triton")
        kernels.lora_expand(target, t, lora_b, slot_ids, meta=meta, backend="triton")
        return target

    timings = {}
    for cfg in cands:
        with launch_configs.overridden(device, key, cfg):
            try:
                error = (run(out.clone()).float() - expected.float()).abs().max().item()
            except Exception as e:  # noqa: BLE001 - e.g. OutOfResources: skip the candidate
                print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            if error > TOLERANCES[dtype]:
                print(f"  skip {cfg}: error {error:.1e}", file=sys.stderr)
                continue
            timings[cfg] = time_us(lambda: run(scratch), iters, device)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tune kernel launch configs (see module doc).")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="bf16")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ops", nargs="+", choices=launch_configs.OPS, default=list(launch_configs.OPS))
    parser.add_argument("--ranks", nargs="+", type=int, default=list(launch_configs.RANK_BUCKETS))
    parser.add_argument("--out", type=Path, default=launch_configs.CONFIG_DIR)
    parser.add_argument("--interpret-smoke", action="store_true", help="CPU: tiny run, interpreted")
    args = parser.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.triton_ops imports triton
        device, name = torch.device("cpu"), "cpu"
        keys = [("shrink", "decode", 16), ("expand", "prefill", 16)]
        shapes, hidden, iters = SMOKE_REPRESENTATIVE, 48, 1
    elif not torch.cuda.is_available():
        print("kernels.tune needs a CUDA GPU (or --interpret-smoke)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
        buckets = sorted({launch_configs.rank_bucket(r) for r in args.ranks})
        keys = list(itertools.product(args.ops, launch_configs.SHAPE_CLASSES, buckets))
        shapes, hidden, iters = REPRESENTATIVE, args.hidden, args.iters

    tuned = {}
    for key in keys:
        op, cls, bucket = key
        current = launch_configs.device_table(name)[key]
        grid = candidates(op, cls, bucket)[: 1 if args.interpret_smoke else None]
        cands = [current] + [c for c in grid if c != current]
        timings = tune_key(key, cands, (*shapes[cls], hidden), dtype, iters, device)
        if not timings:
            print(f"{op}/{cls}/{bucket}: no candidate passed; the current entry stays")
            continue
        best = min(timings, key=timings.get)
        tuned[key] = best
        now = f"{timings[current]:.1f} us" if current in timings else "failed"
        print(f"{op}/{cls}/{bucket}: {timings[best]:.1f} us with {best} (current: {now})", flush=True)

    path = args.out / f"{launch_configs.config_file_stem(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(launch_configs.config_table_to_json(tuned), indent=2) + "\n")
    print(f"wrote {len(tuned)} tuned entries for {name!r} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
