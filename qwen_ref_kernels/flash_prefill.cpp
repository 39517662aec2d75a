// Causal prefill attention in bfloat16 and float16 on the CPU, one pass over the keys per block of queries (a flash
// attention: no score matrix in memory, the softmax taken online, key blocks above the diagonal never read).
// Compiled after invariant_linear.cpp, in the same module: it uses that file's vectors (vf, vu), step (dot_pairs,
// fmadd), hsum and as_dtype.
//
// Numbers, for query i of a row (position S - T + i among the row's S keys) and one head; bfloat16 below means
// float16 for float16 inputs:
//   s_j   = q . k_j in float32: bfloat16, the head size in pairs (2p, 2p + 1), p ascending, each pair as dot_pairs
//           (the VDPBF16PS steps: the odd element's product first, subnormals read as zero); float16, the head
//           size in order, one fmadd each; then t_j = s_j * scale
//   keys j <= S - T + i, in the blocks of 64 from key 0 that hold any of them; per block, with m the running
//   maximum of the t_j so far (m starts at -inf, l at 0, o at 0):
//           m' = max(m, max of the block's t_j); a = exp(m - m')
//           p_j = bfloat16(exp(t_j - m')), rounded to nearest even; masked keys p_j = 0
//           l = l * a + (the block's p_j summed as 16 lanes of 4 steps, folded in halves)
//           o_d = o_d * a + sum of p_j v_jd over the block's keys j <= S - T + i: bfloat16 in pairs (2j', 2j' + 1)
//           as dot_pairs, a last key alone in its pair paired with a zero key (p = 0, v = 0); float16 key by key,
//           one fmadd each
//   out_d = bfloat16(o_d / l)
// exp is exp16 below (a polynomial, within 2 units in the last place of float32; 0 below -87). Every step is
// written out, so the result is the same in any batch and on any CPU with the instruction (without it, dot_pairs'
// spelled-out steps give the same bits, slowly: the backend keeps torch's path there).

namespace {
// exp of 16 floats: x = n ln2 + r with n = round(x log2 e) (ties to even, by the 1.5 * 2^23 trick) and
// |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), e^r by Cephes' degree-6 polynomial, times 2^n from the bits.
// x < -87 (and -inf) gives 0; the callers pass x <= 0 (scores minus their maximum).
inline vf exp16(vf x) {
  const vf floor_in = x < -87.0f ? vf{} - 87.0f : x;  // where 2^n stays a normal float32
  const vf shift = vf{} + 12582912.0f;  // 1.5 * 2^23: adding and taking away rounds to an integer
  const vf n = (floor_in * 1.44269504088896341f + shift) - shift;
  vf r = fmadd(n, vf{} - 0.693359375f, floor_in);
  r = fmadd(n, vf{} + 2.12194440e-4f, r);
  vf y = vf{} + 1.9875691500e-4f;
  y = fmadd(y, r, vf{} + 1.3981999507e-3f);
  y = fmadd(y, r, vf{} + 8.3334519073e-3f);
  y = fmadd(y, r, vf{} + 4.1665795894e-2f);
  y = fmadd(y, r, vf{} + 1.6666665459e-1f);
  y = fmadd(y, r, vf{} + 5.0000001201e-1f);
  y = fmadd(y, r * r, r) + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const vf e = y * two_n;
  return x < -87.0f ? vf{} : e;
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline float hmax(vf v) {  // the largest lane, folded in halves (the order cannot change a maximum)
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

// What the tiles multiply, by input type: bfloat16 in words of two elements (a pair, for VDPBF16PS), float16 in
// words of one element widened to float32 (for fmadd); step() (invariant_linear.cpp) takes either's vectors
template <typename T>
struct Words;
template <>
struct Words<bf16> {
  using W = uint32_t;
  static constexpr int E = 2;  // elements per word
  static W of(const bf16* p) { return static_cast<uint32_t>(p[0].x) | static_cast<uint32_t>(p[1].x) << 16; }
  static vu broadcast(W w) { return vu{} + w; }
  static vu load(const W* p) { vu v; std::memcpy(&v, p, sizeof v); return v; }
  static vu first_only(vu v) { return v & 0x0000FFFFu; }  // the pair's odd element (the high half) read as 0
};
template <>
struct Words<f16> {
  using W = float;
  static constexpr int E = 1;
  static W of(const f16* p) { return static_cast<float>(p[0]); }
  static vf broadcast(W w) { return vf{} + w; }
  static vf load(const W* p) { return ::load(p); }
};

constexpr int KB = 64;  // keys per block: 4 vectors of 16 scores
constexpr int DB = 4 * L;  // columns of the output per block_values call: 4 vectors
constexpr int QB = 6;   // queries per tile: 6 x 4 sums, 4 key (or value) vectors and a broadcast in 29 registers

// One KV head's keys and values repacked for the tiles, in words (E elements each): keys [S/64][D/E][64] (for key
// j, word p: k[j, Ep .. Ep + E - 1]), values [S/E][D] (for keys Ej' .. Ej' + E - 1 at column d: their v[., d]);
// keys past S are zeros.
template <typename T>
struct Packed {
  std::vector<typename Words<T>::W> k, v;
};

template <typename T>
Packed<T> pack(const T* k, const T* v, int64_t ks, int64_t vs, int64_t S, int64_t D) {
  using Wd = Words<T>;
  constexpr int E = Wd::E;
  const int64_t blocks = (S + KB - 1) / KB, P = D / E;
  Packed<T> out{std::vector<typename Wd::W>(blocks * P * KB), std::vector<typename Wd::W>(blocks * KB / E * D)};
  std::vector<T> column(E);
  for (int64_t j = 0; j < S; ++j) {
    const T* kj = k + j * ks;
    auto* kb = out.k.data() + j / KB * P * KB + j % KB;
    for (int64_t p = 0; p < P; ++p) kb[p * KB] = Wd::of(kj + E * p);
  }
  for (int64_t jw = 0; jw * E < S; ++jw)  // E keys a word: the last word's keys past S are zeros
    for (int64_t d = 0; d < D; ++d) {
      for (int e = 0; e < E; ++e) column[e] = jw * E + e < S ? v[(jw * E + e) * vs + d] : T(0.0f);
      out.v[jw * D + d] = Wd::of(column.data());
    }
  return out;
}

// The scores of R (<= QB) query rows against one block of 64 keys: acc[r][c] lane l = key 16c + l
template <int R, typename T>
inline void block_scores(const typename Words<T>::W* const* q, const typename Words<T>::W* kb, int64_t P,
                         vf (*out)[4]) {
  using Wd = Words<T>;
  vf acc[R][4];  // in registers: written to out once, at the end (through out, GCC stored every step's sums)
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = vf{};
  for (int64_t p = 0; p < P; ++p) {
    decltype(Wd::load(kb)) kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = Wd::load(kb + p * KB + c * L);
    for (int r = 0; r < R; ++r) {
      const auto qp = Wd::broadcast(q[r][p]);
      for (int c = 0; c < 4; ++c) acc[r][c] = step(qp, kv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) out[r][c] = acc[r][c];
}

// o[r][d0 .. d0 + DB] = o * a[r] + the block's probabilities (in words) times its values, over the block's first
// `keys` keys. In bfloat16 an odd last key is paired with a zero key (its partner's value read as 0), so that no key
// past a row's position enters its sum (0 * inf would be NaN; 0 * v could turn a -0 sum into +0).
template <int R, typename T>
inline void block_values(const typename Words<T>::W* probs, const typename Words<T>::W* vb, int64_t keys, int64_t D,
                         int64_t d0, const float* a, float* o) {
  using Wd = Words<T>;
  constexpr int E = Wd::E;
  vf acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = load(o + r * D + d0 + c * L) * a[r];
  for (int64_t jw = 0; jw < (keys + E - 1) / E; ++jw) {
    decltype(Wd::load(vb)) vv[4];
    for (int c = 0; c < 4; ++c) vv[c] = Wd::load(vb + jw * D + d0 + c * L);
    if constexpr (E == 2)
      if (E * jw + 1 == keys)
        for (int c = 0; c < 4; ++c) vv[c] = Wd::first_only(vv[c]);  // the pair's odd key is past the last
    for (int r = 0; r < R; ++r) {
      const auto pp = Wd::broadcast(probs[r * KB / E + jw]);
      for (int c = 0; c < 4; ++c) acc[r][c] = step(pp, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) std::memcpy(o + r * D + d0 + c * L, &acc[r][c], sizeof acc[r][c]);
}

// R query rows at positions first .. first + R - 1 (the last of them sees keys 0 .. first + R - 1) over the packed
// head, written to out (rows D apart)
template <int R, typename T>
void query_tile(const T* const* qrows, const Packed<T>& kv, int64_t D, int64_t first, float scale, T* const* out) {
  using Wd = Words<T>;
  using W = typename Wd::W;
  constexpr int E = Wd::E;
  const int64_t P = D / E, blocks = (first + R - 1) / KB + 1;
  std::vector<W> words(R * P);  // the rows in words (a row may start at any 2-byte boundary)
  const W* q[R];
  for (int r = 0; r < R; ++r) {
    for (int64_t p = 0; p < P; ++p) words[r * P + p] = Wd::of(qrows[r] + E * p);
    q[r] = words.data() + r * P;
  }
  std::vector<float> o(R * D, 0.0f);
  float m[R], l[R], a[R];
  for (int r = 0; r < R; ++r) m[r] = -INFINITY, l[r] = 0.0f;
  alignas(64) W probs[R * KB / E];  // the probabilities, in words
  for (int64_t b = 0; b < blocks; ++b) {
    vf acc[R][4];
    block_scores<R, T>(q, kv.k.data() + b * P * KB, P, acc);
    for (int r = 0; r < R; ++r) {
      const int64_t last = first + r - b * KB;  // the row's last visible key, within this block
      vf t[4];
      for (int c = 0; c < 4; ++c) t[c] = acc[r][c] * scale;
      if (last < KB - 1)  // keys past the row's position in this block: masked
        for (int c = 0; c < 4; ++c) {
          const vi key = vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + c * L;
          t[c] = key <= static_cast<int32_t>(last) ? t[c] : vf{} - INFINITY;
        }
      const float mb = hmax(vmax(vmax(t[0], t[1]), vmax(t[2], t[3])));
      const float mn = std::max(m[r], mb);
      a[r] = exp16(vf{} + (m[r] - mn))[0];  // m = -inf at the first block: a = 0 (o and l are 0 anyway)
      vf sum = vf{};
      for (int c = 0; c < 4; ++c) {
        const vf pc = as_dtype<T>(exp16(t[c] - mn));
        sum = sum + pc;
        if constexpr (E == 2) {  // bfloat16 bits, two a word
          const vh h = __builtin_convertvector(as_bits(pc) >> 16, vh);
          std::memcpy(reinterpret_cast<uint16_t*>(probs + r * KB / 2) + c * L, &h, sizeof h);
        } else {  // float16 values, widened
          std::memcpy(probs + r * KB + c * L, &pc, sizeof pc);
        }
      }
      l[r] = l[r] * a[r] + hsum(sum);
      m[r] = mn;
    }
    // the values: every row over its own keys of the block (the keys up to its position); a block that all R rows
    // see whole in one call, else row by row (the blocks on the diagonal: at most two of a tile's)
    const W* vb = kv.v.data() + b * KB / E * D;
    if (first - b * KB >= KB - 1) {
      for (int64_t d0 = 0; d0 < D; d0 += DB) block_values<R, T>(probs, vb, KB, D, d0, a, o.data());
    } else {
      for (int r = 0; r < R; ++r) {
        const int64_t keys = std::min<int64_t>(KB, first + r - b * KB + 1);
        if (keys <= 0) continue;  // a block past the row's position: its m, l and o stay (a = 1, no keys)
        for (int64_t d0 = 0; d0 < D; d0 += DB)
          block_values<1, T>(probs + r * KB / E, vb, keys, D, d0, a + r, o.data() + r * D);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t d0 = 0; d0 < D; d0 += L) store16(out[r] + d0, load(o.data() + r * D + d0) / l[r]);
}

// flash_prefill's work for element type X (T is the number of queries): each KV head packed once, then the tiles
template <typename X>
void run_flash_prefill(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                       torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1), S = k.size(2);
  const int64_t G = H / KV;
  std::vector<Packed<X>> packed(B * KV);
  const X* kp = k.data_ptr<X>();
  const X* vp = v.data_ptr<X>();
  at::parallel_for(0, B * KV, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KV, h = i % KV;
      packed[i] = pack<X>(kp + b * k.stride(0) + h * k.stride(1), vp + b * v.stride(0) + h * v.stride(1),
                          k.stride(2), v.stride(2), S, D);
    }
  });
  // work items: tiles t and n - 1 - t of one (row, head) together, so that every item costs about the same
  const int64_t tiles = (T + QB - 1) / QB, per_head = (tiles + 1) / 2;
  const X* qp = q.data_ptr<X>();
  X* op = out.data_ptr<X>();
  const float scale32 = static_cast<float>(scale);
  auto run_tile = [&](int64_t b, int64_t h, int64_t t) {
    const int64_t i_first = t * QB, R = std::min<int64_t>(QB, T - i_first);
    const X* rows[QB];
    X* outs[QB];
    for (int64_t r = 0; r < R; ++r) {
      rows[r] = qp + b * q.stride(0) + h * q.stride(1) + (i_first + r) * q.stride(2);
      outs[r] = op + ((b * H + h) * T + i_first + r) * D;
    }
    const Packed<X>& kv = packed[b * KV + h / G];
    const int64_t first = S - T + i_first;
    switch (R) {
      case 6: query_tile<6, X>(rows, kv, D, first, scale32, outs); break;
      case 5: query_tile<5, X>(rows, kv, D, first, scale32, outs); break;
      case 4: query_tile<4, X>(rows, kv, D, first, scale32, outs); break;
      case 3: query_tile<3, X>(rows, kv, D, first, scale32, outs); break;
      case 2: query_tile<2, X>(rows, kv, D, first, scale32, outs); break;
      default: query_tile<1, X>(rows, kv, D, first, scale32, outs); break;
    }
  };
  at::parallel_for(0, B * H * per_head, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * per_head), h = i / per_head % H, t = i % per_head;
      run_tile(b, h, t);
      if (tiles - 1 - t != t) run_tile(b, h, tiles - 1 - t);  // an odd count's middle tile runs once
    }
  });
}
}  // namespace

// q [B, H, T, D], k and v [B, KV, S, D] (last dimension contiguous), bfloat16 or float16, D a multiple of 64, H a
// multiple of KV; row b's queries are the last T of its S keys (causal, no padding, no window) -> [B, H, T, D]
// contiguous
torch::Tensor flash_prefill(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 &&
                  q.size(2) <= k.size(2) &&
                  q.size(3) % 64 == 0 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 &&
                  (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && q.device().is_cpu(),
              "flash_prefill: want bfloat16 or float16 q [B, H, T, D] and k, v [B, KV, S, D] on the CPU, T <= S, D a "
              "multiple of 64, the last dimension contiguous");
  torch::Tensor out = torch::empty(q.sizes(), q.options());
  if (q.scalar_type() == torch::kHalf)
    run_flash_prefill<f16>(q, k, v, scale, out);
  else
    run_flash_prefill<bf16>(q, k, v, scale, out);
  return out;
}
