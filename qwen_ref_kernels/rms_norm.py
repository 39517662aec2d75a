"""RMSNorm with HF Qwen2's casting order, optionally fused with the residual add that precedes it.

    y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)

With `residual`, the kernel first forms h = x + residual in the activation dtype (HF keeps no fp32 residual
stream), stores h, and normalises h. Each program owns ROWS whole rows: a row is read once, reduced in registers
and written once, so the kernel is bound by memory bandwidth. Hidden sizes up to 65536, any value (masked).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_last_dim_contiguous, interpreted, round_to

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [M, N], row stride stride_x, unit column stride
    res_ptr,  # [M, N] residual (row stride stride_r), read only when HAS_RESIDUAL
    w_ptr,  # [N]
    out_ptr,  # [M, N] contiguous, dtype = promote(x, weight)
    res_out_ptr,  # [M, N] contiguous, x.dtype: x + residual, written only when HAS_RESIDUAL
    M,
    N,
    stride_x,
    stride_r,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # numerics: the sum of two values of one dtype is exact in fp32, so one rounding gives torch's x + residual
        h = round_to(x + r, res_out_ptr.dtype.element_ty, INTERPRET)
        tl.store(res_out_ptr + rows[:, None] * N + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    # numerics: mean of squares and rsqrt in fp32 (padded columns load 0 and add nothing)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # [ROWS]
    # numerics: round the normalised row to the activation dtype *before* the weight multiply (HF order)
    normed = round_to(x * rstd[:, None], x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    # numerics: a product of two 16-bit floats is exact in fp32, so this rounds once, like torch's weight * h
    y = round_to(normed * w[None, :], out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y, mask=mask)


def _launch_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps): about 4k elements per program so small hidden sizes still move big tiles."""
    block_n = triton.next_power_of_2(n)
    rows = max(1, min(16, 4096 // block_n))
    num_warps = 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16
    return block_n, rows, num_warps


def _as_rows(name: str, arg: str, t: torch.Tensor) -> torch.Tensor:
    check_last_dim_contiguous(name, arg, t)
    try:
        return t.view(-1, t.shape[-1])  # [M, N] without a copy
    except RuntimeError:
        raise ValueError(
            f"{name}: {arg} of shape {tuple(t.shape)} and strides {tuple(t.stride())} cannot be viewed as rows "
            "without a copy; pass a tensor whose leading dims are contiguous"
        ) from None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * normalise(x) over the last dim; with residual, returns (normed(x + residual), x + residual)."""
    name = "rms_norm"
    for arg, t in (("x", x), ("weight", weight), ("residual", residual)):
        if not (t is None and arg == "residual") and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    check_float(name, "x", x)
    check_float(name, "weight", weight)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {n} exceeds the supported maximum {MAX_HIDDEN}")
    if tuple(weight.shape) != (n,):
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}; expected ({n},) to match x {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
    check_last_dim_contiguous(name, "weight", weight)
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)}; expected {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{name}: residual has dtype {residual.dtype}; expected x's dtype {x.dtype}")
    tensors = (x, weight) if residual is None else (x, weight, residual)
    check_device(_rms_norm_kernel, name, *tensors)

    x2 = _as_rows(name, "x", x)  # [M, N]
    r2 = _as_rows(name, "residual", residual) if residual is not None else x2  # [M, N]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else out
    m = x2.shape[0]
    if m > 0:
        block_n, rows, num_warps = _launch_config(n)
        _rms_norm_kernel[(triton.cdiv(m, rows),)](
            x2, r2, weight, out, res_out, m, n, x2.stride(0), r2.stride(0), float(eps),
            HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_N=block_n,
            INTERPRET=interpreted(_rms_norm_kernel), num_warps=num_warps,
        )  # fmt: skip
    return out if residual is None else (out, res_out)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The model's RMSNorm in PyTorch (fp64 inputs stay fp64: that is the exact reference)."""
    if residual is not None:
        x = x + residual  # the activation dtype, as HF
    h = x if x.dtype == torch.float64 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)
