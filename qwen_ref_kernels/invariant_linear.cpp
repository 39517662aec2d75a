#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int L = 16;  // lanes of partial sums
typedef float vf __attribute__((vector_size(L * sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(L * sizeof(uint32_t))));
typedef int32_t vi __attribute__((vector_size(L * sizeof(int32_t))));
typedef uint16_t vh __attribute__((vector_size(L * sizeof(uint16_t))));
using bf16 = c10::BFloat16;
using f16 = c10::Half;

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vu load_pairs(const bf16* p) { vu v; std::memcpy(&v, p, sizeof v); return v; }  // 32 bfloat16, 16 pairs
inline vf as_float(vu u) { vf v; std::memcpy(&v, &u, sizeof v); return v; }
inline vu as_bits(vf v) { vu u; std::memcpy(&u, &v, sizeof u); return u; }

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

// a subnormal float32 becomes a zero of its sign (both denormals-are-zero on inputs and flush-to-zero on results)
inline vf flush(vf v) {
  const vu u = as_bits(v);
  const vi subnormal = (u & 0x7F800000u) == 0;  // exponent bits all zero: zero or subnormal
  return as_float(subnormal ? u & 0x80000000u : u);
}

// 16 pairs of bfloat16 products into 16 lanes, as VDPBF16PS computes them: lane j takes the pair (2j, 2j + 1) of
// x and of w; acc = flush(fma(x[2j + 1], w[2j + 1], acc)), then acc = flush(fma(x[2j], w[2j], acc)), every input
// flushed first. The instruction where the CPU has it (avx512_bf16), the same steps spelled out where it does not.
inline vf dot_pairs(vu x, vu w, vf acc) {
#if defined(__AVX512BF16__)
  return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)(__m512i)x, (__m512bh)(__m512i)w);
#else
  // a pair's odd element is the high half of its 32 bits, the even one the low half: each is a float32 once
  // placed in the high half
  acc = flush(fmadd(flush(as_float(x & 0xFFFF0000u)), flush(as_float(w & 0xFFFF0000u)), flush(acc)));
  return flush(fmadd(flush(as_float(x << 16)), flush(as_float(w << 16)), acc));
#endif
}

inline float widen(float v) { return v; }
inline float widen(bf16 v) { return static_cast<float>(v); }
inline float widen(f16 v) { return static_cast<float>(v); }

// 16 float16 (their bits) widened to float32, exactly: every float16, subnormals too, is a normal float32 or zero
inline vf widen_halves(vh h) {
#if defined(__AVX512F__)
  __m256i bits;
  std::memcpy(&bits, &h, sizeof h);
  return (vf)_mm512_cvtph_ps(bits);
#else
  vf v;
  for (int j = 0; j < L; ++j) v[j] = static_cast<float>(f16(h[j], f16::from_bits()));
  return v;
#endif
}
inline vf load_halves(const f16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return widen_halves(h);
}

// One step of a sum, by input type: load_step reads its inputs (16 float32, 16 float16 widened to float32, or 32
// bfloat16 as 16 pairs) and step adds their products into the 16 lanes (fmadd, or dot_pairs), x first, w second
inline vf load_step(const float* p) { return load(p); }
inline vf load_step(const f16* p) { return load_halves(p); }
inline vu load_step(const bf16* p) { return load_pairs(p); }
inline vf step(vf x, vf w, vf acc) { return fmadd(x, w, acc); }
inline vf step(vu x, vu w, vf acc) { return dot_pairs(x, w, acc); }

// The 16 lanes of one vector summed, folded in halves: lane j += lane j + 8, then + 4, + 2, + 1 (RMSNorm's squares,
// the flash prefill's probabilities)
inline float hsum(vf v) {
  v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// The lanes of 16 accumulators folded in halves, a fixed order for each: lane j += lane j + 8, then + 4, + 2, + 1;
// lane o of the result is accumulator o's sum. Two accumulators share each vector add (15 adds for 16 sums).
inline vf fold16(const vf* a) {
  vf c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: partials of a[2i]; lanes 8-15: of a[2i + 1]
    c[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // four lanes each of a[4i], a[4i + 1], a[4i + 2], a[4i + 3]
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // two lanes each of a[8i] .. a[8i + 7]
    e[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Inputs one step of the sum consumes: 16 float32 or float16, or 32 bfloat16 (16 pairs)
template <typename T>
constexpr int STEP = std::is_same_v<T, bf16> ? 2 * L : L;

// v pinned in a register: without it GCC folds the weight loads into the multiply-adds as memory operands, loading
// each weight vector once per row of x instead of once per step (a 4 x 4 tile read 20 vectors a step, not 8). Only
// with AVX-512, whose registers hold 16 floats (without it no register fits v, and the constraint cannot be met).
template <typename V>
inline void in_register(V& v) {
#if defined(__x86_64__) && defined(__AVX512F__)
  __asm__("" : "+v"(v));
#endif
}

// Weights a tile asks the memory system for while it runs (`bytes` from `at`, a share of the next block's rows,
// spread over the tile's steps), so that the next block is in flight before it starts. Changes no arithmetic.
struct Ahead {
  const char* at;
  int64_t bytes;
};

// How far ahead of its reads few_rows_steps prefetches within a weight row (or into the rows after it)
constexpr int64_t ROW_PREFETCH_BYTES = 2048;

// The steps k0 .. k1 of MB (1 or 2) rows of x times NB weight rows, one weight row after the other: the weights are
// read in memory order, as one stream, where interleaving the NB rows' steps makes NB streams (at 4 KiB apart,
// Qwen1.5's float32 rows, they also share cache sets). The sums are the same: each (m, n) runs its own lanes' sequence.
// Measured against the interleaved steps on one decode step's linears, 2 threads (an A/B of the two sources that
// alternates with the bandwidth probe, at 41-49 GB/s), as fractions of the probe: one row, Qwen2.5 float32 0.948 ->
// 0.973, bfloat16 0.879 -> 0.952, and 0.983 with the prefetch (1,024 bytes ahead gave 0.974, 4,096 0.966); Qwen1.5
// float32 0.921 -> 1.016, bfloat16 0.894 -> 1.005; two rows, Qwen2.5 float32 0.877 -> 0.973, bfloat16 0.830 ->
// 0.956. At 4 and 8 rows the interleaved tiles, with their prefetching of the next block, stay faster (this order
// took 1.24x and 1.30x their time at 8 rows). Returns where the whole steps end.
template <int MB, int NB, typename T>
inline int64_t few_rows_steps(const T* x, const T* w, int64_t K, int64_t k0, int64_t k1, vf (*acc)[NB]) {
  constexpr int S = STEP<T>;
  const int64_t end = k0 + (k1 - k0) / S * S;
  for (int n = 0; n < NB; ++n) {
    const T* wn = w + n * K;
    vf a[MB];
    for (int m = 0; m < MB; ++m) a[m] = acc[m][n];
    for (int64_t k = k0; k < end; k += S) {
      __builtin_prefetch(reinterpret_cast<const char*>(wn + k) + ROW_PREFETCH_BYTES);  // never faults
      const auto wv = load_step(wn + k);
      for (int m = 0; m < MB; ++m) a[m] = step(load_step(x + m * K + k), wv, a[m]);
    }
    for (int m = 0; m < MB; ++m) acc[m][n] = a[m];
  }
  return end;
}

// Steps k0 .. k1 of MB rows of x times NB rows of w (x and w of one type T): every (m, n) pair runs the same
// per-lane sequence whatever MB and NB are and however the steps are split into calls. k0 > 0: the lanes start
// from `partial`, where the call before left them; k1 < K: they are left there (a float32 store and load change
// no bits). k1 == K: the lanes are folded, the K % STEP last products and the bias added, and each sum written to
// y as O (a bfloat16 or float16 output is the float32 result rounded once, to nearest even).
template <int MB, int NB, typename T, typename O>
inline void tile(const T* x, const T* w, int64_t K, int64_t k0, int64_t k1, vf* partial, const float* bias, O* y,
                 int64_t ldy, Ahead ahead) {
  constexpr int S = STEP<T>;
  vf acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = k0 ? partial[m * NB + n] : vf{};
  const int64_t steps = (k1 - k0) / S, lines = ahead.bytes / 64, per_step = steps ? (lines + steps - 1) / steps : 0;
  int64_t k = k0, line = 0;
  if constexpr (MB <= 2) {
    if (lines == 0) k = few_rows_steps<MB, NB>(x, w, K, k0, k1, acc);  // then the loop below has nothing left
  }
  for (; k + S <= k1; k += S) {
    for (int64_t i = 0; i < per_step && line < lines; ++i, ++line) __builtin_prefetch(ahead.at + 64 * line);
    decltype(load_step(w)) wv[NB];
    for (int n = 0; n < NB; ++n) {
      wv[n] = load_step(w + n * K + k);
      if constexpr (MB > 1) in_register(wv[n]);
    }
    for (int m = 0; m < MB; ++m) {
      const auto xv = load_step(x + m * K + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = step(xv, wv[n], acc[m][n]);
    }
  }
  if (k1 < K) {
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) partial[m * NB + n] = acc[m][n];
    return;
  }
  constexpr int C = (MB * NB + 15) / 16;  // fold16 calls
  vf all[16 * C] = {};
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) all[m * NB + n] = acc[m][n];
  vf folded[C];
  for (int c = 0; c < C; ++c) folded[c] = fold16(all + 16 * c);
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float s = folded[(m * NB + n) / 16][(m * NB + n) % 16];
      for (int64_t t = k; t < K; ++t) s = __builtin_fmaf(widen(x[m * K + t]), widen(w[n * K + t]), s);
      if (bias) s += bias[n];
      y[m * ldy + n] = static_cast<O>(s);
    }
}

// Rows of x per tile: 2 x 8 tiles keep 16 sums and 8 weight vectors in registers and load 10 vectors for 16
// multiply-adds. With the chunks and prefetching below, a step's linears at 32 rows went from 143.7 to 108.3 ms
// (float32) and from 94.0 to 62.3 ms (bfloat16) against 4 x 4 tiles (bench_invariant_linear.py, Qwen2.5-0.5B).
constexpr int MB = 2;

// Steps per call when x has more than 2 rows and a row of weights is longer than 2 chunks: chunks of 2 KiB of
// each row, so that a block's weights stay in the first-level cache while every tile of x passes over them (Qwen2.5's
// down_proj, K = 4,864, gained most). A chunk is a whole number of steps.
template <typename T>
inline int64_t chunk(int64_t M, int64_t K) {
  constexpr int64_t C = 2048 / sizeof(T);
  return M > 2 && K > 2 * C ? C : K;
}

// The rows of x times one block of NB weight rows (wb): chunk by chunk of K, tile by tile of x. The rows of the next
// block are prefetched (`next`), an equal share in each tile's call.
template <int NB, typename T, typename O>
inline void rows(const T* x, const T* wb, int64_t M, int64_t K, const float* bb, O* y, int64_t ldy, Ahead next,
                 vf* partial) {
  const int64_t kc = chunk<T>(M, K), calls = (M + MB - 1) / MB * ((K + kc - 1) / kc);
  int64_t call = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc);
    for (int64_t m = 0; m < M; m += MB, ++call) {
      const int64_t from = next.bytes * call / calls, to = next.bytes * (call + 1) / calls;
      const Ahead share{next.at + from, to - from};
      if (M - m >= MB)
        tile<MB, NB>(x + m * K, wb, K, k0, k1, partial + m * NB, bb, y + m * ldy, ldy, share);
      else
        tile<1, NB>(x + m * K, wb, K, k0, k1, partial + m * NB, bb, y + m * ldy, ldy, share);
    }
  }
}

// One weight matrix of a call: its rows are cut into blocks of NB; blocks of all matrices share one thread pool.
template <typename T, typename O>
struct Part {
  const T* x;  // [M, K]
  const T* w;
  const float* bias;
  O* y;           // [M, ldy]: row m of y starts at y + m * ldy
  int64_t N, ldy, first_block;
};

// Rows of weights per block: NB_ROWS, which MB x NB sums and NB weight vectors fit the registers. One row of x read
// more weight rows per block (16) while its steps interleaved the rows; with few_rows_steps 8 is as fast (A/B, one
// row: float32 1.02x and 1.01x, bfloat16 1.04x the time of 16). The sums of each (m, n) are the same whatever NB is.
constexpr int NB_ROWS = 8;

template <int NB, typename T, typename O>
inline void block(const T* x, const T* wb, int64_t M, int64_t K, const float* bb, O* y, int64_t ldy, int64_t left,
                  Ahead next, vf* partial) {
  if constexpr (NB > 1) {
    if (left < NB) return block<NB - 1>(x, wb, M, K, bb, y, ldy, left, next, partial);
  }
  rows<NB>(x, wb, M, K, bb, y, ldy, next, partial);
}

template <int NB, typename T, typename O>
void run(const std::vector<Part<T, O>>& parts, int64_t blocks, int64_t M, int64_t K) {
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    std::vector<vf> partial(chunk<T>(M, K) < K ? (M + MB - 1) / MB * MB * NB : 0);  // the lanes between chunks
    size_t p = 0;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= parts[p].first_block + (parts[p].N + NB - 1) / NB) ++p;
      const Part<T, O>& part = parts[p];
      const int64_t n = (b - part.first_block) * NB;
      const T* wb = part.w + n * K;
      const float* bb = part.bias ? part.bias + n : nullptr;
      // weights read by one or two rows of x stream fastest without it (float32: 0.99 against 0.90 of a torch.sum
      // read of the same bytes; bfloat16: 0.69 against 0.66, measured on Qwen2.5-0.5B's decode shapes)
      const int64_t ahead = M <= 2 ? 0 : std::clamp<int64_t>(part.N - n - NB, 0, NB);
      const Ahead next{reinterpret_cast<const char*>(wb + NB * K), ahead * K * static_cast<int64_t>(sizeof(T))};
      block<NB>(part.x, wb, M, K, bb, part.y + n, part.ldy, part.N - n, next, partial.data());
    }
  });
}

// f(T{}) with T the C++ type of t's dtype: float32, bfloat16 or float16 (the checks before each call refuse others)
template <typename F>
auto by_dtype(const torch::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case torch::kBFloat16: return f(bf16{});
    case torch::kHalf: return f(f16{});
    default: return f(float{});
  }
}

inline bool kernel_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kHalf;
}

// float32 copy of a contiguous float32, bfloat16 or float16 tensor (exact)
std::vector<float> widened(const torch::Tensor& t) {
  std::vector<float> out(t.numel());
  by_dtype(t, [&](auto tag) {
    const auto* p = t.data_ptr<decltype(tag)>();
    for (int64_t i = 0; i < t.numel(); ++i) out[i] = widen(p[i]);
  });
  return out;
}

// The parts cut into blocks of NB_ROWS weight rows, numbered across parts, and run on one thread pool
template <typename T>
void run_blocks(std::vector<Part<T, T>>& parts, int64_t M, int64_t K) {
  int64_t blocks = 0;
  for (Part<T, T>& part : parts) {
    part.first_block = blocks;
    blocks += (part.N + NB_ROWS - 1) / NB_ROWS;
  }
  run<NB_ROWS>(parts, blocks, M, K);
}

template <typename T>
std::vector<torch::Tensor> run_parts(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                                     const std::vector<torch::Tensor>& bs) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<std::vector<float>> biases;
  std::vector<torch::Tensor> ys;
  std::vector<Part<T, T>> parts;
  biases.reserve(ws.size());  // parts point into it
  for (size_t i = 0; i < ws.size(); ++i) {
    const int64_t N = ws[i].size(0);
    ys.push_back(torch::empty({M, N}, ws[i].options()));
    biases.push_back(bs[i].numel() ? widened(bs[i]) : std::vector<float>());
    parts.push_back({x.data_ptr<T>(), ws[i].data_ptr<T>(), bs[i].numel() ? biases.back().data() : nullptr,
                     ys.back().data_ptr<T>(), N, N, 0});
  }
  run_blocks(parts, M, K);
  return ys;
}

// 16 float32 rounded to float16 as static_cast<f16> rounds them (to nearest even, beyond the range to infinity; with
// F16C, which -march=native enables where the CPU has it, c10::Half converts with the same instruction, NaNs too)
inline vh to_halves(vf v) {
#if defined(__AVX512F__)
  vh h;
  const __m256i r = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(&h, &r, sizeof h);
  return h;
#else
  vh h;
  for (int j = 0; j < L; ++j) h[j] = static_cast<f16>(v[j]).x;
  return h;
#endif
}

// v rounded to T and widened back to float32, lane by lane (float32: v itself). bfloat16: to nearest even, NaN to
// 0x7FC0, as c10::BFloat16's conversion; float16: as to_halves
template <typename T>
inline vf as_dtype(vf v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, f16>) {
    return widen_halves(to_halves(v));
  } else {
    const vu u = as_bits(v);
    const vu rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) & 0xFFFF0000u;
    const vi nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return as_float(nan ? vu{} + 0x7FC00000u : rounded);
  }
}

inline void store16(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store16(bf16* p, vf v) {  // rounded as static_cast<bf16> rounds: the high halves of as_dtype's bits
  const vh h = __builtin_convertvector(as_bits(as_dtype<bf16>(v)) >> 16, vh);
  std::memcpy(p, &h, sizeof h);
}
inline void store16(f16* p, vf v) {
  const vh h = to_halves(v);
  std::memcpy(p, &h, sizeof h);
}

// Scores times the attention's scale, as torch's `scores * scale` computes them on the stored scores: each rounded
// to T first, then multiplied in float32 by the scale as a float32, then rounded to T again (float32: one product).
// The same bits except a NaN's payload (bfloat16 NaNs are stored as 0x7FC0 here; the softmax makes the row NaN and
// the cast of the probabilities gives the same bits either way).
// Scaling as the scores are written saves the softmax's input its own pass (the attention 1.01x faster).
template <typename T>
inline vf scaled(vf sums, float scale) {
  return as_dtype<T>(sums) * scale;
}

// The scores of one query row q [D] against 16 keys k [16, D] (rows D apart): each pair runs the linear's
// per-lane sequence (tile() with x = q and w = the keys) and the 16 sums are folded at once, so the 16 scores are
// one vector, stored at once. D is a multiple of STEP<T>. DC: D known when compiled (64, 128: every Qwen head size),
// so that the 16 keys are constant offsets from one pointer instead of 16 pointers in registers; out of line,
// because inlined into the block loop it ran slower (Qwen1.5's float32 scores 1.17x the time). The A/B with the
// values' change below, at 8,192 cached tokens: Qwen2.5's (GQA) attention 1.66x (float32) and 1.87x (bfloat16)
// faster, Qwen1.5's (MHA) 1.09x and 1.04x (24 layers' caches, rounds alternating with the bandwidth probe).
template <typename T, int DC = 0>
__attribute__((noinline)) void scores16(const T* q, const T* k, int64_t Drun, T* out, const float* scale) {
  constexpr int S = STEP<T>;
  const int64_t D = DC ? DC : Drun;
  vf acc[16];
  for (int n = 0; n < 16; ++n) acc[n] = vf{};
  for (int64_t d = 0; d < D; d += S) {
    const auto qv = load_step(q + d);
    for (int n = 0; n < 16; ++n) acc[n] = step(qv, load_step(k + n * D + d), acc[n]);
  }
  const vf sums = fold16(acc);
  store16(out, scale ? scaled<T>(sums, *scale) : sums);
}

// One row's attention operands: its q [KV, G, D] (contiguous), keys and values [KV, S, D] (heads kstride and vstride
// apart, rows D apart), and the [KV, G, S] scores or probabilities and [KV, G, D] output it reads or writes.
template <typename T>
struct HeadRow {
  const T* q;
  const T* k;
  const T* v;
  int64_t kstride, vstride;
  T* scores;  // written by head_scores_into
  const T* probs;  // read by weighted_rows_into
  T* out;
};

// Software prefetch distances of the decode attention's two passes over the cache (the hardware prefetchers leave
// these reads latency-bound), the same bytes in every dtype: 8 blocks of 16 float32 keys ahead in the scores (16
// of bfloat16 or float16), 32 rows of float32 values ahead in the weighted sum (64 of 16-bit values).
// Measured on bench_invariant_attention.py's cases (8,192 cached tokens, 24 layers' caches), this source with and
// without them built side by side in one process, rounds alternating: Qwen2.5's 2 KV heads 1.19x (float32) and
// 1.44x (bfloat16) faster, Qwen1.5's 16 heads 1.04x and 1.10x; 16 blocks / 64 rows and 4 / 16 were no better (a
// Zen 5). On an Intel Xeon, 16-bit keys at 16 blocks and values at 64 rows instead of 8 and 32: Qwen1.5's bfloat16
// attention 1.19x faster, Qwen2.5's 1.04-1.08x (float32 at 16 / 64: 1.01-1.02x; at 32 / 128 Qwen1.5's 0.97x).
// A block's prefetches are spread over its G query heads' calls (a share before each), not issued at once: Qwen2.5's
// scores 1.29x (float32) and 1.23x (bfloat16) faster (A/B as above; 4 blocks ahead the same, 16 slower).
template <typename T>
constexpr int64_t KEY_BLOCKS_AHEAD = 8 * sizeof(float) / sizeof(T);
template <typename T>
constexpr int64_t VALUE_ROWS_AHEAD = 32 * sizeof(float) / sizeof(T);

// Decode attention scores of rows of S keys each, per KV head h: scores[h] = q[h] k[h]^T with the linear's order
// (the G query heads that read KV head h against its keys), times *scale where scale is given (as `scaled` says:
// the bits of torch's scores * scale, without another pass over the scores). Blocks of 16 keys of all heads of all
// rows share one thread pool; a block's keys stay in cache for its G query rows. Keys past the last whole block of
// 16, and head sizes that are not a multiple of STEP<T>, take the linear's own tiles (the same sums), all in one
// more call, and are scaled after it.
template <typename T>
void head_scores_into(const std::vector<HeadRow<T>>& rows, int64_t KV, int64_t G, int64_t D, int64_t S,
                      const float* scale) {
  const int64_t whole = D % STEP<T> == 0 ? S / 16 : 0, per_row = KV * whole;  // blocks of 16 keys for scores16
  at::parallel_for(0, static_cast<int64_t>(rows.size()) * per_row, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const HeadRow<T>& r = rows[b / per_row];
      const int64_t h = b % per_row / whole, s = b % whole * 16;
      const T* keys = r.k + h * r.kstride + s * D;
      const int64_t lines = s + 16 * (KEY_BLOCKS_AHEAD<T> + 1) <= S ? 16 * D * static_cast<int64_t>(sizeof(T)) / 64 : 0;
      const char* ahead = reinterpret_cast<const char*>(keys + 16 * KEY_BLOCKS_AHEAD<T> * D);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t l = lines * g / G; l < lines * (g + 1) / G; ++l) __builtin_prefetch(ahead + 64 * l, 0, 3);
        const T* qg = r.q + (h * G + g) * D;
        T* out = r.scores + (h * G + g) * S + s;
        if (D == 64)
          scores16<T, 64>(qg, keys, D, out, scale);
        else if (D == 128)
          scores16<T, 128>(qg, keys, D, out, scale);
        else
          scores16(qg, keys, D, out, scale);
      }
    }
  });
  if (whole * 16 < S) {
    std::vector<Part<T, T>> parts;
    for (const HeadRow<T>& r : rows)
      for (int64_t h = 0; h < KV; ++h)
        parts.push_back({r.q + h * G * D, r.k + h * r.kstride + whole * 16 * D, nullptr,
                         r.scores + h * G * S + whole * 16, S - whole * 16, S, 0});  // the tail columns, rows S apart
    run_blocks(parts, G, D);
    if (scale)
      for (const HeadRow<T>& r : rows)
        for (int64_t i = 0; i < KV * G; ++i)
          for (int64_t s = whole * 16; s < S; ++s) {
            T& v = r.scores[i * S + s];
            v = static_cast<T>(widen(v) * *scale);
          }
  }
}

template <typename T>
torch::Tensor run_head_scores(const torch::Tensor& q, const torch::Tensor& k) {
  torch::Tensor scores = torch::empty({q.size(0), q.size(1), k.size(1)}, q.options());
  const HeadRow<T> row{q.data_ptr<T>(), k.data_ptr<T>(), nullptr, k.stride(0), 0, scores.data_ptr<T>(), nullptr,
                       nullptr};
  head_scores_into<T>({row}, q.size(0), q.size(1), q.size(2), k.size(1), nullptr);
  return scores;
}

inline vf load16(const float* p) { return load(p); }
inline vf load16(const f16* p) { return load_halves(p); }
inline vf load16(const bf16* p) {  // 16 bfloat16 widened exactly: the stored bits become the high half
  vh h;
  std::memcpy(&h, p, sizeof h);
  return as_float(__builtin_convertvector(h, vu) << 16);
}

// out[g, d0:d0 + 16V] = sum over s of p[g, s] * v[s, d0:d0 + 16V], s ascending, each step an fmaf in float32, for GB
// query heads at once (each (g, d) runs the same sequence whatever GB and V are); rounded once to T at the end.
template <int GB, int V, typename T>
void weighted_block(const T* p, int64_t S, const T* v, int64_t D, int64_t d0, T* out) {
  vf acc[GB][V];
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < V; ++j) acc[g][j] = vf{};
  for (int64_t s = 0; s < S; ++s) {
    for (int j = 0; j < V * L * static_cast<int>(sizeof(T)); j += 64)  // the columns read VALUE_ROWS_AHEAD rows on
      __builtin_prefetch(reinterpret_cast<const char*>(v + (s + VALUE_ROWS_AHEAD<T>) * D + d0) + j);
    for (int j0 = 0; j0 < V; j0 += 2) {  // two vectors of the row at a time: GB x V sums, 2 values, 1 broadcast
      vf vs[2];
      for (int j = 0; j < 2 && j0 + j < V; ++j) vs[j] = load16(v + s * D + d0 + (j0 + j) * L);
      for (int g = 0; g < GB; ++g) {
        const vf pb = widen(p[g * S + s]) - vf{};  // broadcast (x - 0 keeps a zero's sign)
        for (int j = 0; j < 2 && j0 + j < V; ++j) acc[g][j0 + j] = fmadd(pb, vs[j], acc[g][j0 + j]);
      }
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < V * L; ++j) out[g * D + d0 + j] = static_cast<T>(acc[g][j / L][j % L]);
}

template <typename T>
void weighted_tail(const T* p, int64_t G, int64_t S, const T* v, int64_t D, int64_t d, T* out) {  // one column d
  for (int64_t g = 0; g < G; ++g) {
    float a = 0.0f;
    for (int64_t s = 0; s < S; ++s) a = __builtin_fmaf(widen(p[g * S + s]), widen(v[s * D + d]), a);
    out[g * D + d] = static_cast<T>(a);
  }
}

// Columns are taken 64 at a time (whole rows of v for head sizes of 64, so each row is read in one pass) when at
// most 7 query heads share a KV head (7 x 4 sums, 2 value vectors and a broadcast fill the 32 registers), else 32;
// query heads 8 at a time. Qwen2.5-0.5B's 7 heads took columns 32 at a time before: two passes, each reading half
// of every row's cache lines (the values alone: 1.21x (float32) and 1.46x (bfloat16) faster in one pass).
template <int V, typename T>
void weighted_columns(const T* p, int64_t G, int64_t S, const T* v, int64_t D, int64_t d0, T* out) {
  for (int64_t g = 0; g < G; g += 8) {
    const T* pg = p + g * S;
    T* og = out + g * D;
    switch (std::min<int64_t>(8, G - g)) {
      case 8: weighted_block<8, V>(pg, S, v, D, d0, og); break;
      case 7: weighted_block<7, V>(pg, S, v, D, d0, og); break;
      case 6: weighted_block<6, V>(pg, S, v, D, d0, og); break;
      case 5: weighted_block<5, V>(pg, S, v, D, d0, og); break;
      case 4: weighted_block<4, V>(pg, S, v, D, d0, og); break;
      case 3: weighted_block<3, V>(pg, S, v, D, d0, og); break;
      case 2: weighted_block<2, V>(pg, S, v, D, d0, og); break;
      default: weighted_block<1, V>(pg, S, v, D, d0, og); break;
    }
  }
}

template <typename T>
void weighted_heads(const T* p, int64_t G, int64_t S, const T* v, int64_t D, T* out) {
  int64_t d = 0;
  if (G <= 7)
    for (; d + 4 * L <= D; d += 4 * L) weighted_columns<4>(p, G, S, v, D, d, out);
  for (; d + 2 * L <= D; d += 2 * L) weighted_columns<2>(p, G, S, v, D, d, out);
  for (; d < D; ++d) weighted_tail(p, G, S, v, D, d, out);
}

// out[h] = probs[h] v[h] of each row, the heads of all rows on one thread pool
template <typename T>
void weighted_rows_into(const std::vector<HeadRow<T>>& rows, int64_t KV, int64_t G, int64_t S, int64_t D) {
  at::parallel_for(0, static_cast<int64_t>(rows.size()) * KV, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const HeadRow<T>& r = rows[i / KV];
      const int64_t h = i % KV;
      weighted_heads(r.probs + h * G * S, G, S, r.v + h * r.vstride, D, r.out + h * G * D);
    }
  });
}

template <typename T>
torch::Tensor run_weighted_rows(const torch::Tensor& p, const torch::Tensor& v) {
  torch::Tensor out = torch::empty({p.size(0), p.size(1), v.size(2)}, p.options());
  const HeadRow<T> row{nullptr, nullptr, v.data_ptr<T>(), 0, v.stride(0), nullptr, p.data_ptr<T>(),
                       out.data_ptr<T>()};
  weighted_rows_into<T>({row}, p.size(0), p.size(1), p.size(2), v.size(2));
  return out;
}
}  // namespace

// x [M, K]; ws[i] [N_i, K]; bs[i] [N_i] or empty. Contiguous, all of one dtype (float32, bfloat16, float16).
// Returns y_i [M, N_i] in that dtype, each exactly what a call with that weight alone returns (one thread pool for
// all of them).
std::vector<torch::Tensor> linears(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<torch::Tensor> bs) {
  return by_dtype(x, [&](auto tag) { return run_parts<decltype(tag)>(x, ws, bs); });
}

void check_heads(const torch::Tensor& a, const torch::Tensor& kv, const char* what) {
  TORCH_CHECK(a.dim() == 3 && kv.dim() == 3 && a.size(0) == kv.size(0) && a.is_contiguous() &&
                  kv.stride(2) == 1 && kv.stride(1) == kv.size(2) && a.scalar_type() == kv.scalar_type() &&
                  kernel_dtype(a),
              what, ": want [KV, G, .] contiguous and [KV, S, D] with contiguous rows, one dtype "
              "(float32/bfloat16/float16)");
}

// q [KV, G, D], k [KV, S, D] (rows contiguous) -> scores [KV, G, S] in q's dtype
torch::Tensor head_scores(torch::Tensor q, torch::Tensor k) {
  check_heads(q, k, "head_scores");
  TORCH_CHECK(q.size(2) == k.size(2), "head_scores: q and k head sizes differ");
  return by_dtype(q, [&](auto tag) { return run_head_scores<decltype(tag)>(q, k); });
}

// p [KV, G, S], v [KV, S, D] (rows contiguous) -> [KV, G, D] in p's dtype
torch::Tensor weighted_rows(torch::Tensor p, torch::Tensor v) {
  check_heads(p, v, "weighted_rows");
  TORCH_CHECK(p.size(2) == v.size(1), "weighted_rows: p's keys and v's rows differ");
  return by_dtype(p, [&](auto tag) { return run_weighted_rows<decltype(tag)>(p, v); });
}

// One decode attention of B rows, each over its own keys: ks[i] and vs[i] [n_i, KV, S_i, D] hold the keys and values
// of n_i consecutive rows (rows contiguous, D apart; the n_i sum to B), each row attending over all S_i of them.
// Per row exactly the calls invariant_attention.py documents (head_scores, then torch's softmax of the scores
// times scale in float32, cast back, then weighted_rows). Rows with the same number of keys share the softmax's
// torch calls, which compute each row of their input on its own, the same way whatever the number of rows.
// q [B, KV, G, D] contiguous -> [B, KV, G, D].
template <typename T>
void attend_groups(const torch::Tensor& q, const std::vector<torch::Tensor>& ks, const std::vector<torch::Tensor>& vs,
                   double scale, torch::Tensor& out) {
  const int64_t KV = q.size(1), G = q.size(2), D = q.size(3);
  std::vector<HeadRow<T>> rows;
  std::map<int64_t, std::vector<int64_t>> by_length;  // rows by their number of keys, in row order
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for (size_t i = 0; i < ks.size(); ++i) {
    const torch::Tensor &k = ks[i], &v = vs[i];
    TORCH_CHECK(k.dim() == 4 && k.size(1) == KV && k.size(3) == D && k.stride(3) == 1 && k.stride(2) == D &&
                    v.sizes() == k.sizes() && v.stride(3) == 1 && v.stride(2) == D &&
                    k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && k.device().is_cpu(),
                "attend_rows: key group ", i, " does not fit q [B, KV, G, D] (want [n, KV, S, D], rows contiguous)");
    for (int64_t r = 0; r < k.size(0); ++r) {
      const int64_t b = static_cast<int64_t>(rows.size());
      by_length[k.size(2)].push_back(b);
      rows.push_back({qp + b * KV * G * D, k.data_ptr<T>() + r * k.stride(0), v.data_ptr<T>() + r * v.stride(0),
                      k.stride(1), v.stride(1), nullptr, nullptr, op + b * KV * G * D});
    }
  }
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == q.size(0), "attend_rows: the key groups hold ", rows.size(),
              " rows; q has ", q.size(0));
  for (const auto& [S, members] : by_length) {
    const int64_t n = static_cast<int64_t>(members.size());
    torch::Tensor scores = torch::empty({n, KV, G, S}, q.options());
    std::vector<HeadRow<T>> group;
    for (int64_t i = 0; i < n; ++i) {
      group.push_back(rows[members[i]]);
      group.back().scores = scores.data_ptr<T>() + i * KV * G * S;
    }
    const float scale32 = static_cast<float>(scale);  // as torch's mul takes a Python float for these dtypes
    head_scores_into<T>(group, KV, G, D, S, &scale32);  // the scores times scale
    // numerics: softmax in float32, probabilities cast back to the activation dtype (HF eager)
    const torch::Tensor probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
    for (int64_t i = 0; i < n; ++i) group[i].probs = probs.data_ptr<T>() + i * KV * G * S;
    weighted_rows_into<T>(group, KV, G, S, D);
  }
}

torch::Tensor attend_rows(torch::Tensor q, std::vector<torch::Tensor> ks, std::vector<torch::Tensor> vs, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && vs.size() == ks.size() &&
                  kernel_dtype(q),
              "attend_rows: want q [B, KV, G, D] contiguous (float32/bfloat16/float16) and as many value groups as "
              "key groups");
  torch::Tensor out = torch::empty_like(q);
  by_dtype(q, [&](auto tag) { attend_groups<decltype(tag)>(q, ks, vs, scale, out); });
  return out;
}

// Row b's T new keys (or values) src[b] [KV, T, D] copied into its own cache dst[b] [1, KV, capacity, D] (contiguous)
// at positions starts[b] .. starts[b] + T - 1, for all rows in one call; returns each row's filled part
// [1, KV, starts[b] + T, D], a view of its cache. Copies change no value.
std::vector<torch::Tensor> write_rows(std::vector<torch::Tensor> dst, torch::Tensor src, std::vector<int64_t> starts) {
  TORCH_CHECK(src.dim() == 4 && static_cast<int64_t>(dst.size()) == src.size(0) && starts.size() == dst.size(),
              "write_rows: want src [B, KV, T, D], B caches and B starts");
  TORCH_CHECK(src.device().is_cpu(), "write_rows: runs on the CPU");
  const torch::Tensor s = src.contiguous();
  const int64_t KV = s.size(1), T = s.size(2), D = s.size(3);
  const int64_t item = s.element_size();
  std::vector<torch::Tensor> filled;
  filled.reserve(dst.size());
  for (size_t b = 0; b < dst.size(); ++b) {
    const torch::Tensor& d = dst[b];
    TORCH_CHECK(d.dim() == 4 && d.size(0) == 1 && d.size(1) == KV && d.size(3) == D && d.is_contiguous() &&
                    d.scalar_type() == s.scalar_type() && d.device() == s.device() && starts[b] >= 0 &&
                    starts[b] + T <= d.size(2),
                "write_rows: cache ", b, " does not take [", KV, ", ", T, ", ", D, "] at ", starts[b]);
    const int64_t capacity = d.size(2);
    char* to = static_cast<char*>(d.data_ptr());
    const char* from = static_cast<const char*>(s.data_ptr()) + b * KV * T * D * item;
    for (int64_t h = 0; h < KV; ++h)
      std::memcpy(to + (h * capacity + starts[b]) * D * item, from + h * T * D * item, T * D * item);
    filled.push_back(d.narrow(2, 0, starts[b] + T));
  }
  return filled;
}

// RMSNorm of each row of x [M, K] (contiguous) with weight w [K]: ss = the sum of x_i^2 in float32 (lane j takes
// i = j, j + 16, ... with one fmaf each, the 16 lanes folded in halves (lane j += lane j + 8, + 4, + 2, + 1), the
// K % 16 last elements added after with fmaf in order); r = 1 / sqrt(ss / K + eps); then HF's casts:
// h_i = T(x_i * r), y_i = T(w_i * h_i), each product in float32. Rows are spread over threads, each row computed
// alone.
template <typename T>
void rms_rows(const T* x, const T* w, int64_t M, int64_t K, float eps, T* y) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + m * K;
      vf acc = vf{};
      int64_t i = 0;
      for (; i + L <= K; i += L) {
        const vf v = load16(xr + i);
        acc = fmadd(v, v, acc);
      }
      float ss = hsum(acc);
      for (; i < K; ++i) ss = __builtin_fmaf(widen(xr[i]), widen(xr[i]), ss);
      const float r = 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
      T* yr = y + m * K;
      int64_t j = 0;
      for (; j + L <= K; j += L)  // the scalar loop's steps, 16 at a time
        store16(yr + j, load16(w + j) * as_dtype<T>(load16(xr + j) * r));
      for (; j < K; ++j) yr[j] = static_cast<T>(widen(w[j]) * widen(static_cast<T>(widen(xr[j]) * r)));
    }
  });
}

torch::Tensor rms_norm_rows(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1) &&
                  x.scalar_type() == w.scalar_type() &&
                  kernel_dtype(x),
              "rms_norm_rows: want x [M, K] and w [K], contiguous, one dtype (float32/bfloat16/float16)");
  torch::Tensor y = torch::empty_like(x);
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    rms_rows<T>(x.data_ptr<T>(), w.data_ptr<T>(), x.size(0), x.size(1), static_cast<float>(eps), y.data_ptr<T>());
  });
  return y;
}

// torch_ops.rope, bit for bit, on one token per row: y_i = T(T(x_i c_i) + T(x_{(i + D/2) mod D} s_i)), each
// product and the sum in float32 rounded to T as torch's elementwise ops round them. x [B, H, 1, D] with
// contiguous head rows, cos and sin (its first half negated) [B, 1, 1, D] contiguous.
template <typename T>
torch::Tensor rope_one(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t B = x.size(0), H = x.size(1), D = x.size(3), half = D / 2;
  torch::Tensor y = torch::empty({B, H, 1, D}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const T* xr = xp + b * x.stride(0) + h * x.stride(1);
      const T* cr = cp + b * D;
      const T* sr = sp + b * D;
      T* yr = yp + (b * H + h) * D;
      int64_t i = 0;
      if (half % L == 0)  // 16 lanes at a time, each lane the scalar steps below
        for (; i < D; i += L) {
          const int64_t j = i < half ? i + half : i - half;
          const vf a = as_dtype<T>(load16(xr + i) * load16(cr + i));
          const vf c = as_dtype<T>(load16(xr + j) * load16(sr + i));
          store16(yr + i, a + c);
        }
      for (; i < D; ++i) {
        const T a = static_cast<T>(widen(xr[i]) * widen(cr[i]));
        const T c = static_cast<T>(widen(xr[(i + half) % D]) * widen(sr[i]));
        yr[i] = static_cast<T>(widen(a) + widen(c));
      }
    }
  return y;
}

std::vector<torch::Tensor> rope_qk(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  for (const torch::Tensor* t : {&q, &k})
    TORCH_CHECK(t->dim() == 4 && t->size(2) == 1 && t->size(0) == cos.size(0) && t->size(3) == cos.size(3) &&
                    t->stride(3) == 1 && t->scalar_type() == cos.scalar_type(),
                "rope_qk: want q and k [B, H, 1, D] with contiguous head rows, in cos's dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.numel() ==
                  cos.size(0) * cos.size(3) && cos.size(3) % 2 == 0 && sin.scalar_type() == cos.scalar_type() &&
                  kernel_dtype(cos),
              "rope_qk: want cos and sin [B, 1, 1, D] contiguous, float32, bfloat16 or float16");
  return by_dtype(cos, [&](auto tag) {
    return std::vector<torch::Tensor>{rope_one<decltype(tag)>(q, cos, sin), rope_one<decltype(tag)>(k, cos, sin)};
  });
}

// torch_ops.silu_mul_rowwise in one call: silu(gate[b]) by torch's own silu, one call per row b of gate [B, T, N] (as
// the row alone computes it; one row: torch_ops.silu_mul), then the product with up (elementwise, exact either
// way). Rows run on the thread pool when a row is below torch's grain size, so that torch's silu takes it in one
// piece as it does alone; a longer row runs alone, with torch's own threads.
torch::Tensor silu_mul_rows(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.dim() == 3 && gate.is_contiguous() && up.sizes() == gate.sizes() &&
                  up.scalar_type() == gate.scalar_type() && gate.device().is_cpu(),
              "silu_mul_rows: want gate and up [B, T, N] of one dtype on the CPU, gate contiguous");
  torch::Tensor out = torch::empty_like(gate);
  const int64_t B = gate.size(0);
  auto rows = [&](int64_t b0, int64_t b1) {
    c10::InferenceMode inference;  // pool threads too: out's rows are written in place
    for (int64_t b = b0; b < b1; ++b) {
      torch::Tensor row = out[b];
      at::silu_out(row, gate[b]);
    }
  };
  if (gate[0].numel() < at::internal::GRAIN_SIZE)
    at::parallel_for(0, B, 1, rows);
  else
    rows(0, B);
  return out.mul_(up);
}

// One decoder layer of a decode step (one new token per row) in one call: the calls the model makes for it with the
// invariant backend (qwen2.DecoderLayer.forward: rms_norm_rows, linears, rope_qk, write_rows, attend_rows,
// silu_mul_rows, and torch's residual adds), in the same order on the same tensors,
// without Python between them. x [B, 1, hidden]; p: input_layernorm.weight, q/k/v_proj weights, their biases
// (empty: none), o_proj.weight, post_attention_layernorm.weight, gate/up/down_proj weights; cos, sin [B, 1, 1, D]
// (sin's first half negated); ks, vs: each row's cache of this layer [1, KV, capacity, D], the new token written
// at starts[b]. Returns [B, 1, hidden].
torch::Tensor decode_layer(torch::Tensor x, std::vector<torch::Tensor> p, double eps, torch::Tensor cos,
                           torch::Tensor sin, std::vector<torch::Tensor> ks, std::vector<torch::Tensor> vs,
                           std::vector<int64_t> starts, int64_t H, double scale) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && p.size() == 12 && cos.dim() == 4,
              "decode_layer: want x [B, 1, hidden], 12 parameters and cos [B, 1, 1, D]");
  const int64_t B = x.size(0), hidden = x.size(2), D = cos.size(3), KV = p[2].size(0) / D;
  const torch::Tensor none = torch::empty({0}, x.options());
  const torch::Tensor x2 = x.reshape({B, hidden}).contiguous();
  const std::vector<torch::Tensor> qkv = linears(rms_norm_rows(x2, p[0], eps), {p[1], p[2], p[3]}, {p[4], p[5], p[6]});
  // [B, heads * D] -> [B, 1, heads, D] -> [B, heads, 1, D], as Attention.forward views them
  const std::vector<torch::Tensor> qk = rope_qk(qkv[0].view({B, 1, H, D}).transpose(1, 2),
                                                qkv[1].view({B, 1, KV, D}).transpose(1, 2), cos, sin);
  const std::vector<torch::Tensor> keys = write_rows(ks, qk[1], starts);
  const std::vector<torch::Tensor> values = write_rows(vs, qkv[2].view({B, 1, KV, D}).transpose(1, 2), starts);
  // [B, H, 1, D] -> [B, KV, G, D]: query head i reads KV head i // G (decode_attention_rows)
  const torch::Tensor heads = attend_rows(qk[0].reshape({B, KV, H / KV, D}).contiguous(), keys, values, scale);
  const torch::Tensor h = x2 + linears(heads.view({B, H * D}), {p[7]}, {none})[0];  // [B, KV, G, D] -> [B, H * D]
  const std::vector<torch::Tensor> gate_up = linears(rms_norm_rows(h, p[8], eps), {p[9], p[10]}, {none, none});
  const int64_t I = gate_up[0].size(1);
  const torch::Tensor act = silu_mul_rows(gate_up[0].view({B, 1, I}), gate_up[1].view({B, 1, I})).view({B, I});
  return (h + linears(act, {p[11]}, {none})[0]).view({B, 1, hidden});
}

// 1 where dot_pairs runs the avx512_bf16 instruction, 0 where it runs the spelled-out steps (for the tests)
int64_t native_bf16_pairs() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}
