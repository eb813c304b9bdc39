"""Triton implementations of the batched multi-LoRA ops (segmented gather matmul, "SGMV").

Semantics are those of `torch_ops.py` (DESIGN.md section 4); tests compare the two.

Tokens are grouped by slot through `LoraBatchMeta` (a stable sort of `slot_ids`, built once per
step). The grid has one program per (active slot, token block, output block[, K split]): a
program gathers its slot's tokens, streams that adapter's weight tile once for all of them and
scatters its results back to the tokens' rows. Tokens with slot -1 belong to no segment, so no
program touches them; programs past the end of their slot's segment exit at once. The decode case
where every token has its own adapter is simply one single-token segment per slot.

Numerics: fp32 accumulation everywhere. Shrink multiplies x and lora_a in their own dtype (both
upcast to fp32 when they differ). Expand rounds `t` to lora_b's dtype before the dot, so fp16/bf16
adapters run on tensor cores, and adds into `out` in fp32 before one rounding to out's dtype.
fp32 dots use IEEE precision (no TF32), to match the torch reference.

Under TRITON_INTERPRET=1 (CPU tensors) the interpreter cannot `tl.dot` bfloat16 (it multiplies
the raw bits, triton-lang/triton#11584), so bf16 operands are upcast to fp32 after the same
roundings; the result is the one the GPU path computes up to summation order.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels.launch_configs import LaunchConfig, get_config
from kernels.metadata import LoraBatchMeta
from kernels.workspace import LoraWorkspace

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _slot_tile(
    pid_mn,
    pid_a,
    active_slots_ptr,
    tokens_per_slot_ptr,
    segment_starts_ptr,
    sorted_token_ids_ptr,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The tile of the program at grid (pid_mn = token block x output block over N, active slot
    pid_a): (slot, rows, tokens [BLOCK_M], mask_m, offs_n [BLOCK_N], mask_n). `rows` <= 0 means
    the program has nothing to do (slot -1, or a token block past the end of the slot's segment)."""
    slot = tl.load(active_slots_ptr + pid_a)
    num_tokens = tl.load(tokens_per_slot_ptr + pid_a)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n_blocks
    pid_n = pid_mn % num_n_blocks
    rows = tl.where(slot < 0, 0, num_tokens - pid_m * BLOCK_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_tokens
    segment = tl.load(segment_starts_ptr + pid_a)
    tokens = tl.load(sorted_token_ids_ptr + segment + offs_m, mask=mask_m, other=0)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    return slot, rows, tokens, mask_m, offs_n, mask_n


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b with IEEE fp32 precision, both operands upcast to fp32 first when DOT_FP32."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _sgmv_kernel(
    # pointers
    x_ptr,  # [T, K]: x (shrink) or t (expand)
    w_ptr,  # [S, N, K]: lora_a (shrink, N = R) or lora_b (expand, K = R)
    out_ptr,  # [T, >= out_offset + N]: float32, zero-initialised (shrink)
    sorted_token_ids_ptr,  # [T] int64, token indices grouped by slot
    active_slots_ptr,  # [A] int32
    tokens_per_slot_ptr,  # [A] int32
    segment_starts_ptr,  # [A] int32
    # sizes
    N,
    K,
    out_offset,
    scale,  # read only by shrink
    # strides
    stride_xt,
    stride_xk,
    stride_ws,
    stride_wn,
    stride_wk,
    stride_ot,
    stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs sharing one reduction (shrink only)
    EXPAND: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """out[tok, out_offset + n] (+)= scale * sum_k x[tok, k] * w[slot, n, k] for one tile of one slot.

    Shrink writes its fp32 sums (adds them atomically when K is split). EXPAND rounds x (float32)
    to w's dtype before the dot and adds the sums into out in fp32, with one rounding to its dtype.
    """
    slot, rows, tokens, mask_m, offs_n, mask_n = _slot_tile(
        tl.program_id(0),  # token block x output block
        tl.program_id(2),  # active slot
        active_slots_ptr,
        tokens_per_slot_ptr,
        segment_starts_ptr,
        sorted_token_ids_ptr,
        N,
        BLOCK_M,
        BLOCK_N,
    )
    if rows <= 0:
        return
    offs_k = tl.arange(0, BLOCK_K)
    k_first = tl.program_id(1) * BLOCK_K  # this program's share of a split K
    if EXPAND:
        k_first = 0  # expand never splits K; a constant start takes fewer registers

    x_rows = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_M, 1]
    w_cols = w_ptr + slot.to(tl.int64) * stride_ws + offs_n[None, :] * stride_wn  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_first, K, BLOCK_K * SPLIT_K):
        ks = k0 + offs_k
        mask_k = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if EXPAND:
            x = x.to(w_ptr.dtype.element_ty)  # tensor-core dot for fp16/bf16 adapters
        acc = _dot(x, w, acc, DOT_FP32)  # [BLOCK_M, BLOCK_N]

    cols = offs_n  # shrink writes all of out: its stores stay aligned
    if EXPAND:
        cols = out_offset + offs_n
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + cols[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if EXPAND:
        current = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (current + acc).to(out_ptr.dtype.element_ty), mask=mask)
    elif SPLIT_K == 1:
        tl.store(out_ptrs, acc * scale, mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc * scale, mask=mask)


# ---------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------

# Whether the kernel above runs in the Triton interpreter (TRITON_INTERPRET=1 when triton was
# imported): `triton.jit` then returns an interpreted function instead of a `JITFunction`.
INTERPRETED = not isinstance(_sgmv_kernel, triton.runtime.JITFunction)


def lora_shrink(
    x: torch.Tensor,  # [T, K], unit stride in K
    lora_a: torch.Tensor,  # [S, R, K], unit stride in K
    slot_ids: torch.Tensor,  # [T] int32 or int64, -1 = no adapter
    scale: float,
    meta: LoraBatchMeta,
    out: torch.Tensor | None = None,  # [T, R] float32, written (allocated when None)
    workspace: LoraWorkspace | None = None,  # unused: the kernels need no scratch memory
) -> torch.Tensor:  # [T, R] float32
    """Return `scale * x[i] @ lora_a[slot_ids[i]].T` per row in float32; rows with slot -1 are 0.

    Raises:
        ValueError: on a wrong dtype, rank, shape, device or layout of any argument, or a slot id
            outside lora_a.
    """
    _check_float("x", x, 2)
    _check_float("lora_a", lora_a, 3)
    num_tokens, hidden = x.shape
    num_slots, rank, _ = lora_a.shape
    if lora_a.shape[2] != hidden:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} must be [S, R, K] with K = x.shape[1] ({hidden})")
    _check_slots(slot_ids, meta, num_tokens, num_slots, "lora_a")
    _check_device(x, lora_a=lora_a, slot_ids=slot_ids, meta=meta.sorted_token_ids)
    if out is None:
        out = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)  # [T, R]
    else:
        out.zero_()  # programs accumulate (split-K) into it
    if not meta.has_lora or rank == 0:
        return out

    dot_fp32 = x.dtype != lora_a.dtype or _interpreted_bf16(x, lora_a)
    itemsize = 4 if x.dtype != lora_a.dtype else x.element_size()
    cfg = get_config("shrink", meta.max_tokens_per_slot, rank, x.device, itemsize)
    block_r, block_k = _fit(cfg.block_n, rank), _fit(cfg.block_k, hidden)
    split_k = max(1, min(cfg.split_k, triton.cdiv(hidden, block_k)))
    _launch(x, lora_a, out, meta, cfg, block_r, block_k, split_k=split_k, dot_fp32=dot_fp32, scale=scale)
    return out


def lora_expand(
    out: torch.Tensor,  # [T, >= out_offset + N], unit stride in N
    t: torch.Tensor,  # [T, R] float32, unit stride in R
    lora_b: torch.Tensor,  # [S, N, R], unit stride in R
    slot_ids: torch.Tensor,  # [T] int32 or int64, -1 = no adapter
    out_offset: int,
    meta: LoraBatchMeta,
    workspace: LoraWorkspace | None = None,  # unused: the kernels need no scratch memory
) -> None:
    """Add `t[i] @ lora_b[slot_ids[i]].T` into `out[i, out_offset:out_offset+N]` in place.

    Rows with slot -1 and columns outside the slice are not touched.

    Raises:
        ValueError: on a wrong dtype, rank, shape, device or layout of any argument, a slice that
            does not fit in `out`, or a slot id outside lora_b.
    """
    _check_float("out", out, 2)
    _check_float("t", t, 2)
    if t.dtype != torch.float32:
        raise ValueError(f"t dtype ({t.dtype}) must be float32 (the output of lora_shrink)")
    _check_float("lora_b", lora_b, 3)
    num_tokens, rank = t.shape
    num_slots, width, _ = lora_b.shape
    if lora_b.shape[2] != rank:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} must be [S, N, R] with R = t.shape[1] ({rank})")
    if out.shape[0] != num_tokens:
        raise ValueError(f"out has {out.shape[0]} rows, but t has {num_tokens}")
    if out_offset < 0 or out_offset + width > out.shape[1]:
        raise ValueError(
            f"out_offset ({out_offset}) + N ({width}) must lie within out's {out.shape[1]} columns"
        )
    _check_slots(slot_ids, meta, num_tokens, num_slots, "lora_b")
    _check_device(out, t=t, lora_b=lora_b, slot_ids=slot_ids, meta=meta.sorted_token_ids)
    if not meta.has_lora or rank == 0 or width == 0:
        return

    cfg = get_config("expand", meta.max_tokens_per_slot, rank, out.device, lora_b.element_size())
    block_n, block_r = _fit(cfg.block_n, width), _fit(cfg.block_k, rank)
    dot_fp32 = _interpreted_bf16(lora_b)
    _launch(
        t, lora_b, out, meta, cfg, block_n, block_r, dot_fp32=dot_fp32, out_offset=out_offset, expand=True
    )


def _launch(
    x: torch.Tensor,  # [T, K]
    w: torch.Tensor,  # [S, N, K]
    out: torch.Tensor,  # [T, >= out_offset + N]
    meta: LoraBatchMeta,
    cfg: LaunchConfig,
    block_n: int,
    block_k: int,
    *,
    dot_fp32: bool,
    split_k: int = 1,
    scale: float = 1.0,  # shrink
    out_offset: int = 0,  # expand
    expand: bool = False,
) -> None:
    """One `_sgmv_kernel` launch over the step's active slots, on checked arguments."""
    width, reduction = w.shape[1], w.shape[2]
    block_m = _fit(cfg.block_m, meta.max_tokens_per_slot)
    grid = (
        triton.cdiv(meta.max_tokens_per_slot, block_m) * triton.cdiv(width, block_n),
        split_k,
        meta.num_active,
    )
    with _on_device(x):
        _sgmv_kernel[grid](
            x,
            w,
            out,
            meta.sorted_token_ids,
            meta.active_slots,
            meta.tokens_per_slot,
            meta.segment_starts,
            width,
            reduction,
            int(out_offset),
            float(scale),
            *x.stride(),
            *w.stride(),
            *out.stride(),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            SPLIT_K=split_k,
            EXPAND=expand,
            DOT_FP32=dot_fp32,
            **_launch_options(cfg),
        )


def _check_float(name: str, tensor: torch.Tensor, ndim: int) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype ({tensor.dtype}) must be one of float16, bfloat16, float32")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1), got strides {tensor.stride()}"
        )


def _check_slots(
    slot_ids: torch.Tensor, meta: LoraBatchMeta, num_tokens: int, num_slots: int, weights: str
) -> None:
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_ids dtype ({slot_ids.dtype}) must be int32 (or int64)")
    if slot_ids.shape != (num_tokens,):
        raise ValueError(f"slot_ids shape {tuple(slot_ids.shape)} must be [T] with T = {num_tokens}")
    if meta.num_tokens != num_tokens:
        raise ValueError(f"meta was built for {meta.num_tokens} tokens, the batch has {num_tokens}")
    if meta.max_active_slot >= num_slots:
        raise ValueError(f"slot_ids use slot {meta.max_active_slot}, but {weights} has {num_slots} slots")


def _check_device(first: torch.Tensor, **others: torch.Tensor) -> None:
    for name, tensor in others.items():
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device}, expected {first.device}")
    if first.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before kernels.triton_ops is "
            "imported to run on CPU tensors; use backend='torch' on CPU"
        )


def _fit(block: int, size: int) -> int:
    """`block` shrunk to the problem: the next power of two >= size, and never below 16."""
    return max(16, min(block, triton.next_power_of_2(max(size, 1))))


def _interpreted_bf16(*tensors: torch.Tensor) -> bool:
    return INTERPRETED and any(x.dtype == torch.bfloat16 for x in tensors)


def _on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _launch_options(cfg: LaunchConfig) -> dict[str, int]:
    # FMA fusion is requested explicitly: Triton 3.9 warns that its default will change.
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}
