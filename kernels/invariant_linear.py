"""A batch-invariant linear for decode steps on the CPU: y = x @ weight.T (+ bias), where every output element is
summed in one fixed order that depends only on the input size K, never on how many rows x has.

Why: a BLAS matmul picks its kernel by shape, so row i of a [32, K] product can differ in the last bits from the
same row computed alone. This kernel makes a batched decode step bit-equal to each row decoded alone, which
lets n seeded samples share one read of the weights (issue 8) and still equal running each sample alone. It
also reads bfloat16 weights at memory speed on CPUs without bfloat16 instructions, where the BLAS path is
compute-bound.

Order of the sum for y[m, n] (float32 throughout; bfloat16 weights widen exactly to float32):
    lane j (0..15) accumulates x[m, k] * w[n, k] for k = j, j + 16, ... < 16 * (K // 16), each step a fused
    multiply-add (acc = fmaf(x, w, acc): one rounding); the 16 lanes are then folded in halves (lane j += lane
    j + 8, then j + 4, j + 2, j + 1); the tail k = 16 * (K // 16) .. K - 1 is added in order, again by fmaf; then
    the bias is added. The float32 result is rounded once to the output dtype (bfloat16: to nearest even).
Every step is a correctly rounded IEEE operation, so the result is the same on any CPU (a CPU without FMA
instructions computes fmaf in software, slowly). It is not bit-equal to BLAS, which sums in another order:
against a float64 reference its error is that of a float32 dot product (tests/test_invariant_linear.py).

The C++ source below is compiled on first use with torch.utils.cpp_extension (needs a C++ compiler and ninja:
pip install 'qwen-ref[cpu]'), for this CPU (-march=native), and cached. `invariant_linear_ref` is the PyTorch
reference, computed in float64.
"""

from __future__ import annotations

import hashlib
import platform
import threading

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int L = 16;  // lanes of partial sums
typedef float vf __attribute__((vector_size(L * sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(L * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(L * sizeof(uint16_t))));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf load(const c10::BFloat16* p) {
  // bfloat16 -> float32 is exact: the 16 stored bits become the high half of the float
#if defined(__AVX512F__)
  __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<vf>(_mm512_castsi512_ps(u));
#else
  vh h; std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v; std::memcpy(&v, &u, sizeof v); return v;
#endif
}
// fused multiply-add, a * b + c with one rounding, lane by lane: the same bits on every CPU (fmaf semantics)
inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  vf r;
  for (int j = 0; j < L; ++j) r[j] = __builtin_fmaf(a[j], b[j], c[j]);
  return r;
#endif
}
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
typedef float v2 __attribute__((vector_size(2 * sizeof(float))));

inline float fold(vf a) {  // lanes folded in halves, a fixed order: lane j += lane j + 8, then + 4, + 2, + 1
  v8 a8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 a4 = __builtin_shufflevector(a8, a8, 0, 1, 2, 3) + __builtin_shufflevector(a8, a8, 4, 5, 6, 7);
  v2 a2 = __builtin_shufflevector(a4, a4, 0, 1) + __builtin_shufflevector(a4, a4, 2, 3);
  return a2[0] + a2[1];
}

// MB rows of x times NB rows of w: every (m, n) pair runs the same per-lane sequence whatever MB and NB are.
// O: the output type; a bfloat16 output is the float32 result rounded once (to nearest even).
template <int MB, int NB, typename W, typename O>
inline void tile(const float* x, const W* w, int64_t K, const float* bias, O* y, int64_t N) {
  vf acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = vf{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    vf wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = load(w + n * K + k);
    for (int m = 0; m < MB; ++m) {
      vf xv = load(x + m * K + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = fmadd(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float s = fold(acc[m][n]);
      for (int64_t t = k; t < K; ++t) s = __builtin_fmaf(x[m * K + t], widen(w[n * K + t]), s);
      if (bias) s += bias[n];
      y[m * N + n] = static_cast<O>(s);
    }
}

constexpr int MB = 4;

template <typename T>
void widen_into(const T* src, float* dst, int64_t n) {  // exact: float32 copies, bfloat16 widens
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    vf v = load(src + i);
    std::memcpy(dst + i, &v, sizeof v);
  }
  for (; i < n; ++i) dst[i] = widen(src[i]);
}

template <int NB, typename W, typename O>
inline void rows(const float* x, const W* w, int64_t M, int64_t K, const float* bias, O* y, int64_t N) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    if (M > MB) {  // widen the NB weight rows once instead of once per tile of rows: the same values
      thread_local std::vector<float> buf;
      buf.resize(NB * K);
      widen_into(w, buf.data(), NB * K);
      rows<NB, float, O>(x, buf.data(), M, K, bias, y, N);
      return;
    }
  }
  int64_t m = 0;
  for (; m + MB <= M; m += MB) tile<MB, NB>(x + m * K, w, K, bias, y + m * N, N);
  switch (M - m) {
    case 3: tile<3, NB>(x + m * K, w, K, bias, y + m * N, N); break;
    case 2: tile<2, NB>(x + m * K, w, K, bias, y + m * N, N); break;
    case 1: tile<1, NB>(x + m * K, w, K, bias, y + m * N, N); break;
    default: break;
  }
}

template <typename W, typename O>
void run(const float* x, const W* w, const float* bias, O* y, int64_t M, int64_t N, int64_t K) {
  constexpr int NB = 4;
  const int64_t blocks = (N + NB - 1) / NB;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * NB;
      const W* wb = w + n * K;
      const float* bb = bias ? bias + n : nullptr;
      switch (std::min<int64_t>(NB, N - n)) {
        case 4: rows<4>(x, wb, M, K, bb, y + n, N); break;
        case 3: rows<3>(x, wb, M, K, bb, y + n, N); break;
        case 2: rows<2>(x, wb, M, K, bb, y + n, N); break;
        default: rows<1>(x, wb, M, K, bb, y + n, N); break;
      }
    }
  });
}

// float32 copy of a contiguous float32 or bfloat16 tensor (exact)
std::vector<float> widened(const torch::Tensor& t) {
  std::vector<float> out(t.numel());
  if (t.scalar_type() == torch::kBFloat16)
    widen_into(t.data_ptr<c10::BFloat16>(), out.data(), t.numel());
  else
    std::memcpy(out.data(), t.data_ptr<float>(), t.numel() * sizeof(float));
  return out;
}
}  // namespace

// x [M, K], w [N, K], bias [N] or empty: contiguous, all float32 or all bfloat16 -> y [M, N] in that dtype.
torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, w.options());
  const std::vector<float> xf = widened(x);
  const std::vector<float> bf = bias.numel() ? widened(bias) : std::vector<float>();
  const float* b = bias.numel() ? bf.data() : nullptr;
  if (w.scalar_type() == torch::kBFloat16)
    run(xf.data(), w.data_ptr<c10::BFloat16>(), b, y.data_ptr<c10::BFloat16>(), M, N, K);
  else
    run(xf.data(), w.data_ptr<float>(), b, y.data_ptr<float>(), M, N, K);
  return y;
}
"""

# -ffp-contract=off: no multiply-add is fused unless the source says so (fmadd, fmaf), whatever the compiler decides
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
_lock = threading.Lock()
_module = None

SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


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
    """The compiled module (built on first call, then cached on disk by torch.utils.cpp_extension)."""
    global _module
    with _lock:
        if _module is None:
            try:
                from torch.utils.cpp_extension import load_inline

                _module = load_inline(name=f"qwen_ref_invariant_linear_{_cpu_signature()}", cpp_sources=_SOURCE,
                                      functions=["linear"], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"])
            except Exception as e:  # compiler, ninja or headers missing: say which, once
                raise InvariantLinearUnavailable(
                    f"the batch-invariant CPU linear could not be built ({type(e).__name__}: {e}); it needs a C++ "
                    "compiler, Python headers and ninja (pip install 'qwen-ref[cpu]')") from None
    return _module


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times weight [N, K] (+ bias [N]) -> [..., N] in weight's dtype; see the module docstring."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"invariant_linear: x and weight must be tensors, got {type(x).__name__}, "
                        f"{type(weight).__name__}")
    if weight.dtype not in SUPPORTED_WEIGHT_DTYPES:
        raise ValueError(f"invariant_linear: weight dtype {weight.dtype} is not supported; allowed: float32, bfloat16")
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
    lead = x.shape[:-1]
    # numerics: activations, weights and bias widen exactly to float32 inside; the sum and the bias add are
    # float32; the output is rounded once to the weight dtype
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    b = bias.contiguous() if bias is not None else torch.empty(0, dtype=weight.dtype)
    y = extension().linear(x2, weight.contiguous(), b)  # [M, N]
    return y.view(*lead, weight.shape[0])


def invariant_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: the same product in float64 (no rounding inside the sum), returned in float64."""
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out
