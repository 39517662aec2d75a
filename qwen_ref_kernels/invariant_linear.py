"""A batch-invariant linear for decode steps on the CPU: y = x @ weight.T (+ bias), where every output element is
summed in one fixed order that depends only on the input size K, never on how many rows x has.

Why: a BLAS matmul picks its kernel by shape, so row i of a [32, K] product can differ in the last bits from the
same row computed alone. This kernel makes a batched decode step bit-equal to each row decoded alone, which
lets n seeded samples share one read of the weights (issue 8) and still equal running each sample alone. It
also reads the weights of a decode step at close to memory speed, which BLAS's one-row products do not here.

Order of the sum for y[m, n], all in float32 (x and the weight share one dtype):
  float32: lane j (0..15) accumulates x[m, k] * w[n, k] for k = j, j + 16, ... < 16 * (K // 16), each step a
    fused multiply-add (acc = fmaf(x, w, acc): one rounding).
  bfloat16: the inputs go in pairs; lane j (0..15) takes, for each block of 32 inputs starting at b = 0, 32, ...
    < 32 * (K // 32), the pair k = b + 2j, b + 2j + 1: acc = fmaf(x[k + 1], w[k + 1], acc), then
    acc = fmaf(x[k], w[k], acc), with a subnormal input or result read as a zero of its sign. That is what the
    avx512_bf16 instruction VDPBF16PS computes (its products are exact in float32; it runs with denormals-are-zero
    and flush-to-zero); on a CPU without it the kernel performs the same steps one by one, and the tests check
    the two bit for bit. A bfloat16 subnormal is below 1.2e-38.
  float16: every input widens exactly to float32 (a float16 subnormal is a normal float32), then float32's order.
  Then, all: the 16 lanes are folded in halves (lane j += lane j + 8, then j + 4, j + 2, j + 1); the tail (the
    last K % 16, or K % 32, inputs) is added in order, again by fmaf; then the bias is added. The float32 result
    is rounded once to the output dtype (bfloat16 and float16: to nearest even; float16 overflows to infinity).
Every step is a correctly rounded IEEE operation, so the result is the same on any CPU (a CPU without FMA
instructions computes fmaf in software, slowly). It is not bit-equal to BLAS, which sums in another order:
against a float64 reference its error is that of a float32 dot product (tests/test_invariant_linear.py).

The C++ source (invariant_linear.cpp, beside this file) is compiled on first use with torch.utils.cpp_extension
(needs a C++ compiler and ninja, a core dependency), for this CPU (-march=native), and cached.
`invariant_linear_ref` is the PyTorch reference, computed in float64.
"""

from __future__ import annotations

import hashlib
import platform
import threading
from pathlib import Path

import torch

# one module: flash_prefill.cpp uses invariant_linear.cpp's vector helpers
_SOURCE = "\n".join((Path(__file__).parent / name).read_text(encoding="utf-8")
                     for name in ("invariant_linear.cpp", "flash_prefill.cpp"))

# -ffp-contract=off: no multiply-add is fused unless the source says so (fmadd, fmaf), whatever the compiler decides
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
FUNCTIONS = ["linears", "head_scores", "weighted_rows", "attend_rows", "write_rows", "rms_norm_rows", "rope_qk",
             "silu_mul_rows", "decode_layer", "native_bf16_pairs", "flash_prefill"]
_lock = threading.Lock()
_module = None
_failure: str | None = None  # why the build failed, once it has

SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class InvariantLinearUnavailable(RuntimeError):
    """The C++ kernel could not be built here (no compiler, no ninja, no Python headers)."""


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU model: the build name carries the CPU's flags
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    key = "\n".join([platform.machine(), flags, torch.__version__, _SOURCE, " ".join(_FLAGS)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def extension():
    """The compiled module (built on first call, then cached on disk by torch.utils.cpp_extension). A failed
    build is not tried again in this process: load()'s default asks on every load."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                from torch.utils.cpp_extension import load_inline

                _module = load_inline(name=f"qwen_ref_invariant_linear_{_cpu_signature()}", cpp_sources=_SOURCE,
                                      functions=FUNCTIONS, extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"])
            except Exception as e:  # compiler, ninja or headers missing: say which
                _failure = (f"the batch-invariant CPU linear could not be built ({type(e).__name__}: {e}); it needs "
                            "a C++ compiler, Python headers and ninja")
        if _module is None:
            raise InvariantLinearUnavailable(_failure)
    return _module


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times weight [N, K] (+ bias [N]) -> [..., N] in weight's dtype; see the module docstring."""
    return invariant_linears(x, [weight], [bias])[0]


def invariant_linears(x: torch.Tensor, weights: list[torch.Tensor],
                      biases: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Several linears of the same input in one call (q/k/v, gate/up): each output equals invariant_linear(x, w, b)
    bit for bit; the weights share one pass of the thread pool instead of one each."""
    biases = [None] * len(weights) if biases is None else list(biases)
    if not isinstance(x, torch.Tensor) or not all(isinstance(w, torch.Tensor) for w in weights):
        raise TypeError(f"invariant_linear: x and weight must be tensors, got {type(x).__name__}, "
                        f"{[type(w).__name__ for w in weights]}")
    if not weights or len(biases) != len(weights):
        raise ValueError(f"invariant_linear: {len(weights)} weights and {len(biases)} biases; want one bias (or None) "
                         "per weight, and at least one weight")
    for weight, bias in zip(weights, biases):
        check(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    ys = linears_unchecked(x2, weights, biases)
    return [y.view(*lead, y.shape[-1]) for y in ys]


def check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dtype not in SUPPORTED_WEIGHT_DTYPES:
        raise ValueError(f"invariant_linear: weight dtype {weight.dtype} is not supported; allowed: float32, "
                         "bfloat16, float16")
    if x.dtype != weight.dtype:
        raise ValueError(f"invariant_linear: x dtype {x.dtype} differs from weight dtype {weight.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"invariant_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit "
                         "(want x [..., K], weight [N, K])")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"invariant_linear: bias {tuple(bias.shape)} {bias.dtype} must be [{weight.shape[0]}] "
                         f"{weight.dtype}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"invariant_linear: {name} is on {t.device}; this kernel runs on the CPU")


def linears_unchecked(x: torch.Tensor, weights: list[torch.Tensor],
                      biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The kernel call without the checks (the model checks its weights once): x [M, K] -> [M, N_i] each.
    numerics: activations, weights and biases widen exactly to float32 inside; sums and bias adds are float32;
    each output is rounded once to the weight dtype."""
    empty = torch.empty(0, dtype=weights[0].dtype)
    return extension().linears(x.contiguous(), [w.contiguous() for w in weights],
                               [empty if b is None else b.contiguous() for b in biases])


def invariant_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: the same product in float64 (no rounding inside the sum), returned in float64."""
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out
