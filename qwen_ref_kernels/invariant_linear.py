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
#include <algorithm>
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
// ahead: how many rows of the next block of weight rows to prefetch at the same place, so that the memory
// system always has the next rows in flight (the first tile of a block reads it from memory; later tiles hit
// cache and pass 0). Prefetching changes no arithmetic.
template <int MB, int NB, typename W, typename O>
inline void tile(const float* x, const W* w, int64_t K, const float* bias, O* y, int64_t N, int ahead) {
  vf acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = vf{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    vf wv[NB];
    for (int n = 0; n < ahead; ++n) __builtin_prefetch(w + (NB + n) * K + k);
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
inline void rows(const float* x, const W* w, int64_t M, int64_t K, const float* bias, O* y, int64_t N, int ahead) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    if (M > MB) {  // widen the NB weight rows once instead of once per tile of rows: the same values
      thread_local std::vector<float> buf;
      buf.resize(NB * K);
      for (int64_t i = 0; i < ahead * K; i += 32) __builtin_prefetch(w + NB * K + i);  // the next block's rows
      widen_into(w, buf.data(), NB * K);
      rows<NB, float, O>(x, buf.data(), M, K, bias, y, N, 0);
      return;
    }
  }
  int64_t m = 0;
  for (; m + MB <= M; m += MB) tile<MB, NB>(x + m * K, w, K, bias, y + m * N, N, m == 0 ? ahead : 0);
  switch (M - m) {
    case 3: tile<3, NB>(x + m * K, w, K, bias, y + m * N, N, m == 0 ? ahead : 0); break;
    case 2: tile<2, NB>(x + m * K, w, K, bias, y + m * N, N, m == 0 ? ahead : 0); break;
    case 1: tile<1, NB>(x + m * K, w, K, bias, y + m * N, N, m == 0 ? ahead : 0); break;
    default: break;
  }
}

// One weight matrix of a call: its rows are cut into blocks of NB; blocks of all matrices share one thread pool.
template <typename W, typename O>
struct Part {
  const W* w;
  const float* bias;
  O* y;
  int64_t N, first_block;
};

constexpr int NB = 4;

template <typename W, typename O>
void run(const float* x, const std::vector<Part<W, O>>& parts, int64_t blocks, int64_t M, int64_t K) {
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    size_t p = 0;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= parts[p].first_block + (parts[p].N + NB - 1) / NB) ++p;
      const Part<W, O>& part = parts[p];
      const int64_t n = (b - part.first_block) * NB;
      const W* wb = part.w + n * K;
      const float* bb = part.bias ? part.bias + n : nullptr;
      const int ahead = static_cast<int>(std::clamp<int64_t>(part.N - n - NB, 0, NB));
      switch (std::min<int64_t>(NB, part.N - n)) {
        case 4: rows<4>(x, wb, M, K, bb, part.y + n, part.N, ahead); break;
        case 3: rows<3>(x, wb, M, K, bb, part.y + n, part.N, ahead); break;
        case 2: rows<2>(x, wb, M, K, bb, part.y + n, part.N, ahead); break;
        default: rows<1>(x, wb, M, K, bb, part.y + n, part.N, ahead); break;
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

template <typename W, typename O>
std::vector<torch::Tensor> run_parts(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                                     const std::vector<torch::Tensor>& bs) {
  const int64_t M = x.size(0), K = x.size(1);
  const std::vector<float> xf = widened(x);
  std::vector<std::vector<float>> biases;
  std::vector<torch::Tensor> ys;
  std::vector<Part<W, O>> parts;
  int64_t blocks = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    const int64_t N = ws[i].size(0);
    ys.push_back(torch::empty({M, N}, ws[i].options()));
    biases.push_back(bs[i].numel() ? widened(bs[i]) : std::vector<float>());
    parts.push_back({ws[i].data_ptr<W>(), bs[i].numel() ? biases.back().data() : nullptr, ys.back().data_ptr<O>(),
                     N, blocks});
    blocks += (N + NB - 1) / NB;
  }
  run(xf.data(), parts, blocks, M, K);
  return ys;
}
}  // namespace

// x [M, K]; ws[i] [N_i, K]; bs[i] [N_i] or empty. Contiguous, all float32 or all bfloat16. Returns y_i [M, N_i]
// in that dtype, each exactly what a call with that weight alone returns (one thread pool for all of them).
std::vector<torch::Tensor> linears(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<torch::Tensor> bs) {
  if (x.scalar_type() == torch::kBFloat16) return run_parts<c10::BFloat16, c10::BFloat16>(x, ws, bs);
  return run_parts<float, float>(x, ws, bs);
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
                                      functions=["linears"], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"])
            except Exception as e:  # compiler, ninja or headers missing: say which, once
                raise InvariantLinearUnavailable(
                    f"the batch-invariant CPU linear could not be built ({type(e).__name__}: {e}); it needs a C++ "
                    "compiler, Python headers and ninja (pip install 'qwen-ref[cpu]')") from None
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
