"""The batch-invariant CPU linear (qwen_ref_kernels/invariant_linear.py) against its references.

1. Accuracy against float64 (invariant_linear_ref), with the worst-case bound of a float32 dot product:
   |y - ref| <= K * 2**-24 * (|x| @ |w|.T) (+ one rounding of the output, 2**-8 * |y| for bfloat16 and 2**-11 * |y|
   for float16).
2. Bit-exact batch invariance: a row's output is the same alone, in any slice, and among other rows.
3. The documented summation order, replayed by an independent implementation in exact rational arithmetic
   (Fractions, one rounding to float32 per step, as a fused multiply-add does), gives the same bits.
   The order is the same on every CPU, so this holds on any machine; a build without AVX-512 (the scalar steps)
   gives the same bits as this CPU's vector build.
4. Bad inputs raise errors that name the problem.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from qwen_ref_kernels.invariant_linear import invariant_linear, invariant_linear_ref, invariant_linears

SHAPES = [(1, 1), (15, 3), (16, 4), (17, 5), (33, 7), (123, 37), (896, 1152), (4864, 96)]
ROWS = [1, 2, 3, 4, 5, 9, 33]


def _inputs(M, K, N, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N", SHAPES)
def test_accuracy_within_the_float32_dot_product_bound(K, N, dtype):
    for M, bias in [(1, False), (5, True), (33, True)]:
        x, w, b = _inputs(M, K, N, dtype, bias)
        y = invariant_linear(x, w, b)
        assert y.dtype == dtype and y.shape == (M, N)
        ref = invariant_linear_ref(x, w, b)
        bound = (K + 1) * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
        if b is not None:
            bound = bound + 2.0**-24 * b.double().abs()
        if dtype != torch.float32:  # the output's one rounding to bfloat16 or float16
            bound = bound + (2.0**-8 if dtype == torch.bfloat16 else 2.0**-11) * ref.abs()
        err = (y.double() - ref).abs()
        assert bool((err <= bound + 1e-30).all()), (M, K, N, float((err - bound).max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N", [(17, 5), (123, 37), (896, 1152), (2100, 21)])  # 2100: x of 3+ rows in chunks
def test_rows_are_bit_equal_in_any_batch(K, N, dtype):
    x, w, b = _inputs(40, K, N, dtype, bias=True, seed=1)
    full = invariant_linear(x, w, b)
    for M in ROWS:
        part = invariant_linear(x[:M], w, b)
        assert torch.equal(part, full[:M]), M
    for i in [0, 3, 17, 39]:
        assert torch.equal(invariant_linear(x[i : i + 1], w, b), full[i : i + 1]), i
    others = torch.randn(40, K).to(dtype)  # the same rows among other rows, at other positions
    mixed = torch.cat([others[:7], x[10:20], others[7:9]])
    assert torch.equal(invariant_linear(mixed, w, b)[7:17], full[10:20])
    x3 = x[:12].reshape(3, 4, K)  # leading dims are rows too
    assert torch.equal(invariant_linear(x3, w, b), full[:12].reshape(3, 4, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_several_weights_in_one_call_equal_separate_calls(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=g).to(dtype)
    weights = [torch.randn(n, 64, generator=g).to(dtype) for n in (64, 8, 8, 3)]  # q, k, v-like, and an odd one
    biases = [torch.randn(64, generator=g).to(dtype), None, torch.randn(8, generator=g).to(dtype), None]
    together = invariant_linears(x, weights, biases)
    for y, w, b in zip(together, weights, biases, strict=True):
        assert torch.equal(y, invariant_linear(x, w, b))
    with pytest.raises(ValueError, match="4 weights and 3 biases"):
        invariant_linears(x, weights, biases[:3])


def _f32(v: Fraction) -> Fraction:
    """v rounded to the nearest float32, ties to even: the float64 route may round twice, so the answer is the
    nearest of that float32 and its two neighbours."""
    a = np.float32(float(v))
    near = [np.nextafter(a, np.float32(-np.inf)), a, np.nextafter(a, np.float32(np.inf))]
    best = min(near, key=lambda c: (abs(Fraction(float(c)) - v), int(c.view(np.uint32)) & 1))
    return Fraction(float(best))


def _fold_and_tail(lanes: list[Fraction], xs: list[Fraction], ws: list[Fraction], body: int) -> Fraction:
    """The lanes folded in halves (lane j += lane j + width), then the inputs from `body` on added in order."""
    width = len(lanes) // 2
    while width >= 1:
        for j in range(width):
            lanes[j] = _f32(lanes[j] + lanes[j + width])
        width //= 2
    s = lanes[0]
    for k in range(body, len(xs)):
        s = _f32(xs[k] * ws[k] + s)
    return s


def _documented_order(x: np.ndarray, w: np.ndarray) -> np.float32:
    K, L = len(x), 16
    xs, ws = [Fraction(float(a)) for a in x], [Fraction(float(a)) for a in w]
    lanes = [Fraction(0)] * L
    body = L * (K // L)
    for k in range(body):
        j = k % L
        lanes[j] = _f32(xs[k] * ws[k] + lanes[j])  # a fused multiply-add: one rounding
    return np.float32(float(_fold_and_tail(lanes, xs, ws, body)))


# 3 rows of x: K = 1100 takes the steps in chunks of 512. N = 12: where K >= 16, the first block of 8 weight rows
# prefetches the next and interleaves its rows' steps; a block with nothing to prefetch runs each weight row through
# on its own (K = 7 has no whole steps, only the tail)
@pytest.mark.parametrize("K", [7, 16, 37, 53, 1100])
@pytest.mark.parametrize("N", [1, 4, 7, 12])
def test_the_documented_summation_order_bit_for_bit(K, N):
    x, w, _ = _inputs(3, K, N, torch.float32, bias=False, seed=K)
    y = invariant_linear(x, w).numpy()
    for m in range(3):
        for n in range(N):
            want = _documented_order(x[m].numpy(), w[n].numpy())
            assert y[m, n] == want, (K, m, n, y[m, n], want)


@pytest.mark.parametrize("K", [7, 16, 37, 1100])
def test_the_documented_float16_order_bit_for_bit(K):
    # float16 inputs widen exactly to float32 (subnormals too: they are normal float32s, never flushed), then the
    # float32 order; the sum is rounded once to float16, to nearest even, and past 65504 to infinity
    x, w, _ = _inputs(3, K, 12, torch.float16, bias=False, seed=K)
    w[1, 1::4] = 3e-6  # float16 subnormals (below 6.1e-5)
    x[2, :5] = -4e-7
    w[2] = 200.0  # row 1 of x times weight 2: beyond float16's range
    x[1] = 1.0
    y = invariant_linear(x, w)
    for m in range(3):
        for n in range(12):
            want = torch.tensor(float(_documented_order(x[m].float().numpy(), w[n].float().numpy()))).half()
            assert y[m, n].view(torch.int16) == want.view(torch.int16), (K, m, n, y[m, n], want)
    assert K < 328 or y[1, 2].item() == float("inf")  # 200 * K > 65504


TINY = Fraction(1, 2**126)  # the smallest normal float32 (and bfloat16)


def _flush(v: Fraction) -> Fraction:
    return Fraction(0) if abs(v) < TINY else v  # a subnormal is a zero (the sign of a zero adds nothing here)


def _documented_order_bf16(x: np.ndarray, w: np.ndarray) -> float:
    """The bfloat16 order of the module docstring, in exact arithmetic with one float32 rounding per step."""
    K, L = len(x), 16
    xs, ws = [Fraction(float(a)) for a in x], [Fraction(float(a)) for a in w]
    lanes = [Fraction(0)] * L
    body = 2 * L * (K // (2 * L))
    for b in range(0, body, 2 * L):
        for j in range(L):
            for k in (b + 2 * j + 1, b + 2 * j):  # the pair's odd element first, as VDPBF16PS
                lanes[j] = _flush(_f32(_flush(xs[k]) * _flush(ws[k]) + lanes[j]))
    return float(_fold_and_tail(lanes, xs, ws, body))


@pytest.mark.parametrize("K", [7, 32, 45, 64, 101, 2100])  # 2100: chunks of 1,024
def test_the_documented_bfloat16_order_bit_for_bit(K):
    x, w, _ = _inputs(3, K, 12, torch.bfloat16, bias=False, seed=K)  # 12: both step orders, as above
    x[0] *= 1e-20  # row 0 times weight 0: products and sums below the float32 normal range, flushed
    w[0] *= 1e-19
    w[1, 1::4] = 3e-39  # subnormal bfloat16 inputs: read as zero
    x[2, :5] = -4e-39
    y = invariant_linear(x, w)
    for m in range(3):
        for n in range(12):
            want = torch.tensor(_documented_order_bf16(x[m].float().numpy(), w[n].float().numpy())).bfloat16()
            assert y[m, n].view(torch.int16) == want.view(torch.int16), (K, m, n, y[m, n], want)


def test_a_build_without_avx512_gives_the_same_bits():
    # the scalar steps a CPU without AVX-512 runs (fmaf per lane, the bfloat16 pairs' steps spelled out instead of
    # VDPBF16PS, float16 widened one by one, outputs rounded by c10's conversions) against this CPU's vector build,
    # in every dtype: linears (bfloat16 weights down to subnormals, which the pair steps read as zero), attention,
    # RMSNorm, and the flash prefill. One build serves both checks (each build costs most of a minute).
    from pathlib import Path

    from torch.utils.cpp_extension import load_inline

    from qwen_ref_kernels import invariant_linear as il

    if " avx512f " not in Path("/proc/cpuinfo").read_text() + " ":
        pytest.skip("this CPU has no AVX-512: the scalar steps are what runs, checked by the order tests")
    vector = il.extension()
    scalar = load_inline(name=f"qwen_ref_invariant_linear_{il._cpu_signature()}_no_avx512", cpp_sources=il._SOURCE,
                         functions=il.FUNCTIONS, extra_cflags=[*il._FLAGS, "-mno-avx512f"],
                         extra_ldflags=["-fopenmp"])
    assert scalar.native_bf16_pairs() == 0
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for M, K, N in [(1, 896, 40), (5, 2100, 24), (3, 77, 9)]:
            x = torch.randn(M, K, generator=g).to(dtype)
            low = -40 if dtype == torch.bfloat16 else -8  # subnormals to large
            w = (torch.randn(N, K, generator=g) * torch.logspace(low, 2, K)).to(dtype)
            b = torch.randn(N, generator=g).to(dtype)
            assert torch.equal(scalar.linears(x, [w], [b])[0], invariant_linear(x, w, b)), (dtype, M, K, N)
        q = torch.randn(2, 1, 7, 64, generator=g).to(dtype)  # [B, KV, G, D]
        k, v = (torch.randn(1, 1, 40, 64, generator=g).to(dtype) for _ in range(2))
        want = vector.attend_rows(q, [k, k], [v, v], 0.125)
        assert torch.equal(scalar.attend_rows(q, [k, k], [v, v], 0.125), want), dtype
        x, w = (torch.randn(3, 100, generator=g) * 5).to(dtype), torch.randn(100, generator=g).to(dtype)
        assert torch.equal(scalar.rms_norm_rows(x, w, 1e-6), vector.rms_norm_rows(x, w, 1e-6)), dtype
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(1, 4, 70, 64, generator=g).to(dtype)
        k, v = (torch.randn(1, 2, 90, 64, generator=g).to(dtype) for _ in range(2))
        assert torch.equal(scalar.flash_prefill(q, k, v, 0.125), vector.flash_prefill(q, k, v, 0.125)), dtype


def test_bad_inputs_name_the_problem():
    x, w, _ = _inputs(2, 8, 3, torch.float32, bias=True)
    with pytest.raises(ValueError, match="float64 is not supported; allowed: float32, bfloat16, float16"):
        invariant_linear(x.double(), w.double())
    with pytest.raises(ValueError, match=r"x dtype torch\.bfloat16 differs"):
        invariant_linear(x.bfloat16(), w)
    with pytest.raises(ValueError, match=r"x \(2, 7\) and weight \(3, 8\) do not fit"):
        invariant_linear(x[:, :7], w)
    with pytest.raises(ValueError, match=r"bias \(4,\)"):
        invariant_linear(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="on meta"):
        invariant_linear(x.to("meta"), w.to("meta"))
    with pytest.raises(TypeError, match="must be tensors"):
        invariant_linear([[1.0]], w)
