"""Pieces shared by the kernels: interpreter detection, bf16 rounding that the interpreter gets right, and the
argument checks every launcher runs before a launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreted(kernel) -> bool:
    """True when `kernel` was built under TRITON_INTERPRET=1 (Triton decides at decoration, i.e. at import)."""
    return not isinstance(kernel, JITFunction)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. The interpreter truncates fp32 -> bf16 (triton 3.9), so there
    the rounding is done on the fp32 bits first and the final cast is exact."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000  # ties to even on the 16 dropped bits
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def check_device(kernel, name: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreted(kernel):
        raise ValueError(
            f"{name}: CPU tensors run only under the Triton interpreter; set TRITON_INTERPRET=1 before importing "
            "qwen_ref_kernels, or pass CUDA tensors"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: unsupported device {device}; expected cuda (or cpu under TRITON_INTERPRET=1)")


def check_float(name: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise TypeError(f"{name}: {arg} has dtype {t.dtype}; expected one of {allowed}")


def check_last_dim_contiguous(name: str, arg: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: {arg} must have a contiguous last dim, got strides {tuple(t.stride())}")


INTERPRET = interpreted(round_to)  # whether this process runs the kernels in the Triton interpreter
