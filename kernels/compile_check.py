"""Compile the Triton LoRA kernels for a CUDA architecture without a GPU, and report resources.

    python -m kernels.compile_check [--arch 90] [--quick] [--configs PATH.json]

Every launch-config table entry (or, with `--quick`, one entry per op and shape class) is
compiled for fp16, bf16 and fp32 to a cubin with Triton's bundled `ptxas`, which then reports
registers, spills and shared memory per kernel. A compile error, a register spill or shared
memory over `--max-shared-kb` fails the check (exit 1). Use it after editing the kernels or
before committing tuned entries (`--configs`); it needs no GPU and runs with TRITON_INTERPRET
unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPES = ("fp16", "bf16", "fp32")
# Last-dimension strides are 1 in every launch (the host wrappers require it); Triton specialises
# such arguments to constants, which is what enables vectorised and asynchronous loads.
UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_on")
ARGS = (
    "x_ptr w_ptr out_ptr sorted_token_ids_ptr active_slots_ptr tokens_per_slot_ptr segment_starts_ptr "
    "N K out_offset scale stride_xt stride_xk stride_ws stride_wn stride_wk stride_ot stride_on"
).split()


def _signature(names: list[str], pointer_types: dict[str, str], consts: dict) -> dict[str, str]:
    sig = {}
    for name in names:
        if name in pointer_types:
            sig[name] = pointer_types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name == "sorted_token_ids_ptr" else "*i32"
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    sig.update({name: "constexpr" for name in consts})
    return sig


def _launch_attrs(sig: dict[str, str]) -> dict[tuple[int, ...], list]:
    """What a real launch specialises on: pointers and sizes/strides divisible by 16."""
    aligned = [
        i
        for i, (name, kind) in enumerate(sig.items())
        if kind.startswith("*") or (kind == "i32" and name != "out_offset")
    ]
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


def compile_kernel(op: str, dtype: str, cfg, rank: int, arch: int):
    """Compile one kernel variant as the host wrapper would launch it with `cfg` (already passed
    through `for_dtype`); returns Triton's compiled kernel (asm and metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import triton_ops

    if op == "shrink":
        block_r = max(16, min(cfg.block_n, triton.next_power_of_2(rank)))
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": block_r, "BLOCK_K": cfg.block_k}
        consts |= {"SPLIT_K": cfg.split_k, "EXPAND": False}
        types = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": "*fp32"}
    else:
        block_r = max(16, min(cfg.block_k, triton.next_power_of_2(rank)))
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": block_r}
        consts |= {"SPLIT_K": 1, "EXPAND": True}
        types = {"x_ptr": "*fp32", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    consts |= {"DOT_FP32": False} | {name: 1 for name in UNIT_STRIDES}
    sig = _signature(ARGS, types, consts)
    source = ASTSource(triton_ops._sgmv_kernel, sig, consts, _launch_attrs(sig))
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) of a PTX module, from the bundled ptxas in verbose mode."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        result = subprocess.run(
            [get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    regs = re.search(r"Used (\d+) registers", result.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="one entry per op and shape class")
    parser.add_argument("--configs", type=Path, help="check a tuned JSON table instead")
    parser.add_argument("--max-shared-kb", type=int, default=227, help="shared memory per block")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2

    from kernels.launch_configs import DEFAULT_CONFIGS, for_dtype, parse_config_table

    table = DEFAULT_CONFIGS
    if args.configs:
        table = parse_config_table(json.loads(args.configs.read_text()), str(args.configs))
    keys = sorted(table)
    if args.quick:
        keys = [k for k in keys if k[2] == 64]
    failures = 0
    print("| op | class | rank | dtype | regs | spill B | shared KiB | status |")
    print("|---|---|---|---|---|---|---|---|")
    for op, cls, rank in keys:
        for dtype in DTYPES:
            try:
                cfg = for_dtype(table[(op, cls, rank)], 4 if dtype == "fp32" else 2)
                kernel = compile_kernel(op, dtype, cfg, rank, args.arch)
                regs, spills = ptxas_report(kernel.asm["ptx"], args.arch)
                shared_kb = kernel.metadata.shared / 1024
                ok = spills == 0 and shared_kb <= args.max_shared_kb
                status = "ok" if ok else "SPILL/SHARED"
            except Exception as e:  # noqa: BLE001 - report every failing variant, then fail
                regs, spills, shared_kb, ok, status = -1, -1, -1.0, False, f"ERROR {e}"
            failures += not ok
            print(f"| {op} | {cls} | {rank} | {dtype} | {regs} | {spills} | {shared_kb:.1f} | {status} |")
    print(f"\n{failures} failing variant(s) for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
