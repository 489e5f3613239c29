// The CPU kernels, written once with at::vec::Vectorized and compiled once per instruction set:
// included by kernels_default.cpp and kernels_avx2.cpp with CPU_CAPABILITY (the namespace) and
// CPU_CAPABILITY_AVX2 (ATen's vector implementation) set. Work is split over output rows with
// at::parallel_for; bf16/fp16 are widened to fp32 and rounded back once. adapter_add's rows are
// hand-written AVX2 intrinsics in the AVX2 build (see add_row below); the rest is Vectorized.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2) before including kernels_impl.h"
#endif

namespace surgery::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;

// About this many elements (or multiply-adds) per task before at::parallel_for splits the work.
constexpr int64_t kGrain = 32768;

int64_t grain_rows(int64_t cost_per_row) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cost_per_row));
}

template <typename scalar_t>
constexpr bool is_reduced() {
  return !std::is_same_v<scalar_t, float>;
}

// ---- adapter_add rows: out[i] = a[i] + b[i], one add in the dtype ------------------------------
//
// Eager torch adds bf16/fp16 by widening to fp32, adding and rounding once (round to nearest
// even), so these do the same and stay bit-identical to it. `stream`: write with non-temporal
// stores (see adapter_add_typed); only the AVX2 build has them, the baseline ignores the flag.

template <typename scalar_t>
inline void add_tail(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t i, int64_t n) {
  for (; i < n; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// Hand-written AVX2: ATen's generic bf16 <-> fp32 conversions (widening across 128-bit lanes,
// then a pack and a permute back) made bf16 several times slower than a copy, bound by the
// shift/shuffle ports. Here the 32-bit lanes are split into their even and odd bf16 elements
// instead: even = lane << 16, odd = lane & 0xffff0000 (already in place), and after the add and
// the rounding one word blend puts them back, so each element costs about 1.5 shifts, no shuffle.

// fp32 -> bf16 in the high half of each 32-bit lane (the low half is garbage): round to nearest
// even, as c10 and ATen (x + 0x7fff + lsb); NaN -> 0xffff, as ATen's vector conversion.
inline __m256i bf16_round_high(__m256 s) {
  const __m256i x = _mm256_castps_si256(s);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(x, lsb), _mm256_set1_epi32(0x7fff));
  return _mm256_or_si256(r, _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q)));
}

template <bool kStream>
inline void store256(void* p, __m256i v) {
  if constexpr (kStream) {
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  }
}

template <typename scalar_t, bool kStream>
inline void add_row_avx2(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + 8 <= n; i += 8) {
      const __m256 s = _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
      store256<kStream>(out + i, _mm256_castps_si256(s));
    }
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    for (; i + 16 <= n; i += 16) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i));
      const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i));
      const __m256i odd_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
      const __m256 even = _mm256_add_ps(_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(y, 16)));
      const __m256 odd = _mm256_add_ps(_mm256_castsi256_ps(_mm256_and_si256(x, odd_mask)),
                                       _mm256_castsi256_ps(_mm256_and_si256(y, odd_mask)));
      const __m256i lo = _mm256_srli_epi32(bf16_round_high(even), 16);
      store256<kStream>(out + i, _mm256_blend_epi16(lo, bf16_round_high(odd), 0xAA));
    }
  } else {  // fp16: F16C converts exactly (fp16 -> fp32) and rounds to nearest even (fp32 -> fp16)
    for (; i + 16 <= n; i += 16) {
      const __m256 s0 = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))),
                                      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i))));
      const __m256 s1 = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i + 8))),
                                      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i + 8))));
      constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      store256<kStream>(out + i, _mm256_set_m128i(_mm256_cvtps_ph(s1, kRound), _mm256_cvtps_ph(s0, kRound)));
    }
  }
  add_tail(out, a, b, i, n);
}

constexpr bool kHasStreamingStores = true;

template <typename scalar_t>
inline void add_row(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t n, bool stream) {
  // non-temporal stores need a 32-byte aligned destination (rows of any D, e.g. 4096, usually are)
  if (stream && reinterpret_cast<uintptr_t>(out) % 32 == 0) {
    add_row_avx2<scalar_t, true>(out, a, b, n);
  } else {
    add_row_avx2<scalar_t, false>(out, a, b, n);
  }
}

inline void stream_fence() {  // non-temporal stores are weakly ordered: fence before the task ends
  _mm_sfence();
}

#else  // baseline: at::vec::Vectorized (SSE2 on x86-64, NEON on aarch64), regular stores

constexpr bool kHasStreamingStores = false;

template <typename scalar_t>
inline void add_row(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t n, bool /*stream*/) {
  using Vec = Vectorized<scalar_t>;
  int64_t i = 0;
  if constexpr (!is_reduced<scalar_t>()) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      (Vec::loadu(a + i) + Vec::loadu(b + i)).store(out + i);
    }
  } else {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [a0, a1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(a + i));
      auto [b0, b1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(b + i));
      at::vec::convert_from_float<scalar_t>(a0 + b0, a1 + b1).store(out + i);
    }
  }
  add_tail(out, a, b, i, n);
}

inline void stream_fence() {}

#endif

// y[i] += a * x[i] in fp32
inline void axpy(float* y, float a, const float* x, int64_t n) {
  const fVec av(a);
  int64_t i = 0;
  for (; i + fVec::size() <= n; i += fVec::size()) {
    at::vec::fmadd(av, fVec::loadu(x + i), fVec::loadu(y + i)).store(y + i);
  }
  for (; i < n; ++i) {
    y[i] += a * x[i];
  }
}

// sum_i a[i] * b[i] in fp32 (two accumulators)
inline float dot(const float* a, const float* b, int64_t n) {
  fVec acc0(0.0f), acc1(0.0f);
  int64_t i = 0;
  for (; i + 2 * fVec::size() <= n; i += 2 * fVec::size()) {
    acc0 = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(fVec::loadu(a + i + fVec::size()), fVec::loadu(b + i + fVec::size()), acc1);
  }
  for (; i + fVec::size() <= n; i += fVec::size()) {
    acc0 = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), acc0);
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) {
    sum += a[i] * b[i];
  }
  return sum;
}

// dst[i] = float(src[i])
template <typename scalar_t>
inline void widen_row(float* dst, const scalar_t* src, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  int64_t i = 0;
  if constexpr (is_reduced<scalar_t>()) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + fVec::size());
    }
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// dst[i] = scalar_t(src[i]): the one rounding to the output dtype
template <typename scalar_t>
inline void narrow_row(scalar_t* dst, const float* src, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  int64_t i = 0;
  if constexpr (is_reduced<scalar_t>()) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      at::vec::convert_from_float<scalar_t>(fVec::loadu(src + i), fVec::loadu(src + i + fVec::size()))
          .store(dst + i);
    }
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<scalar_t>(src[i]);
  }
}

template <typename F>
void dispatch(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "surgery CPU kernels: unsupported dtype ", dtype);  // checked before
  }
}

// ---- adapter_add ---------------------------------------------------------------------------------
//
// The output (L, B, Q, D) repeats the table over b and visual_query over l. Walking it in order
// would re-read all of visual_query (B*Q*D) once per layer: at Q=256, B=8 that is 32 MB, from
// memory, 31 times. Instead the q rows are cut into blocks small enough that a block of
// visual_query (all b) and of the table (one l) stay in L2, and a task is one (q block, l, b):
// the tasks of a block run back to back (l, then b, fastest), so every input row is read from
// memory once. Large outputs are written with non-temporal stores (as memcpy does for large
// copies): they skip the read-for-ownership of every output line and do not evict the inputs.

constexpr int64_t kTileBytes = 256 << 10;  // visual_query rows (all b) of one q block: well inside L2
// Output size from which stores are non-temporal. Below it the output (and the table, as large
// when B = 1) stay in the last-level cache and regular stores are faster; above, streaming won
// (measured on a 32 MB-L3 Zen 4: 16 MB outputs and up, fp32 and bf16).
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

template <typename scalar_t>
void adapter_add_typed(const AdapterAddArgs& a) {
  const auto* table = static_cast<const scalar_t*>(a.table);
  const auto* vq = static_cast<const scalar_t*>(a.vq);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t L = a.L, B = a.B, Q = a.Q, D = a.D;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t block = std::clamp<int64_t>(kTileBytes / std::max<int64_t>(1, B * row_bytes), 1, Q);
  const int64_t blocks = (Q + block - 1) / block;
  const bool stream = kHasStreamingStores && L * B * Q * row_bytes >= kStreamMinBytes;
  at::parallel_for(0, blocks * L * B, grain_rows(block * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {  // t = (block index * L + l) * B + b
      const int64_t b = t % B, l = (t / B) % L, q0 = (t / (B * L)) * block, q1 = std::min(Q, q0 + block);
      for (int64_t q = q0; q < q1; ++q) {
        add_row<scalar_t>(out + ((l * B + b) * Q + q) * D, table + l * a.table_l + q * a.table_q,
                          vq + b * a.vq_b + q * a.vq_q, D, stream);
      }
    }
    if (stream) stream_fence();
  });
}

void adapter_add(const AdapterAddArgs& a) {
  dispatch(a.dtype, [&](auto tag) { adapter_add_typed<decltype(tag)>(a); });
}

// ---- adapter_attention: one task = a range of (b, h, t) rows ------------------------------------
//
// Per (b, h) the task gets k_t (hd, Q) and v (Q, hd) as fp32 rows: read in place for fp32,
// widened once (not once per t) into buffers for bf16/fp16. When the (b, h) has several query
// rows, k_t is also transposed to (Q, hd), so that each score is one long dot product over hd;
// for a single row (decoding) the scores are hd axpys over the short Q rows instead, with no
// copy. Then per row: the softmax over Q and Q axpys over hd, all fp32; the gates are folded into
// the softmax normaliser; one rounding to the dtype at the end.

constexpr int64_t kTransposeMinRows = 4;  // query rows per (b, h) from which transposing k_t pays

int64_t padded(int64_t floats) {  // to a whole number of 64-byte lines
  return (floats + 15) / 16 * 16;
}

float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

template <typename scalar_t>
void adapter_attention_typed(const AdapterAttentionArgs& a) {
  const int64_t H = a.H, T = a.T, hd = a.hd, Q = a.Q;
  const auto* xq = static_cast<const scalar_t*>(a.xq);
  const auto* k_t = static_cast<const scalar_t*>(a.k_t);
  const auto* v = static_cast<const scalar_t*>(a.v);
  auto* out = static_cast<scalar_t*>(a.out);

  const float new_gate = a.new_gate ? static_cast<float>(*static_cast<const scalar_t*>(a.new_gate)) : 1.0f;
  std::vector<float> head_gate(H);  // tanh(gate[h]) * new_gate, fp32 (the inputs are exact in it)
  for (int64_t h = 0; h < H; ++h) {
    head_gate[h] = static_cast<float>(static_cast<const scalar_t*>(a.gate)[h * a.gate_h]) * new_gate;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const bool transpose = T >= kTransposeMinRows;
  constexpr bool reduced = is_reduced<scalar_t>();

  at::parallel_for(0, a.B * H * T, grain_rows(2 * Q * hd), [&](int64_t begin, int64_t end) {
    // every buffer starts on a 64-byte boundary (vector loads never straddle cache lines)
    const int64_t block = padded(Q * hd), row = padded(hd);
    std::vector<float> scratch((transpose ? block : 0) + (reduced ? 2 * block + row : 0) + row + padded(Q) + 16);
    float* k_buf = align64(scratch.data());             // (Q, hd): k_t transposed, when `transpose`
    float* k_wide = k_buf + (transpose ? block : 0);    // (hd, Q): k_t widened (bf16/fp16)
    float* v_wide = k_wide + (reduced ? block : 0);     // (Q, hd): v widened (bf16/fp16)
    float* x_wide = v_wide + (reduced ? block : 0);     // (hd): the query row widened (bf16/fp16)
    float* acc = x_wide + (reduced ? row : 0);          // (hd)
    float* p = acc + row;                               // (Q)
    int64_t current = -1;
    const float* k_rows = nullptr;  // row d of k_t: k_rows + d * k_stride (Q values)
    const float* v_rows = nullptr;  // row q of v: v_rows + q * v_stride (hd values)
    int64_t k_stride = Q, v_stride = hd;

    for (int64_t r = begin; r < end; ++r) {  // r = (b * H + h) * T + t
      const int64_t bh = r / T, t = r % T, b = bh / H, h = bh % H;
      if (bh != current) {
        current = bh;
        const scalar_t* k_src = k_t + b * a.k_b + h * a.k_h;  // (hd, Q), row stride k_d
        const scalar_t* v_src = v + b * a.v_b + h * a.v_h;    // (Q, hd), row stride v_q
        if constexpr (reduced) {
          if (a.k_d == Q) {  // one vector pass over the whole block (its rows of Q are short)
            widen_row<scalar_t>(k_wide, k_src, hd * Q);
          } else {
            for (int64_t d = 0; d < hd; ++d) widen_row<scalar_t>(k_wide + d * Q, k_src + d * a.k_d, Q);
          }
          for (int64_t q = 0; q < Q; ++q) widen_row<scalar_t>(v_wide + q * hd, v_src + q * a.v_q, hd);
          k_rows = k_wide, k_stride = Q, v_rows = v_wide, v_stride = hd;
        } else {
          k_rows = k_src, k_stride = a.k_d, v_rows = v_src, v_stride = a.v_q;
        }
        if (transpose) {
          for (int64_t d = 0; d < hd; ++d) {
            for (int64_t q = 0; q < Q; ++q) k_buf[q * hd + d] = k_rows[d * k_stride + q];
          }
        }
      }
      const scalar_t* x_src = xq + b * a.xq_b + h * a.xq_h + t * a.xq_t;
      const float* x_row = nullptr;
      if constexpr (reduced) {
        widen_row<scalar_t>(x_wide, x_src, hd);
        x_row = x_wide;
      } else {
        x_row = x_src;
      }

      // scores over the Q adapter tokens, fp32
      if (transpose) {
        for (int64_t q = 0; q < Q; ++q) p[q] = dot(x_row, k_buf + q * hd, hd);
      } else {
        std::fill(p, p + Q, 0.0f);
        for (int64_t d = 0; d < hd; ++d) axpy(p, x_row[d], k_rows + d * k_stride, Q);
      }
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t q = 0; q < Q; ++q) {
        p[q] *= scale;
        max_score = std::max(max_score, p[q]);
      }
      float sum = 0.0f;
      for (int64_t q = 0; q < Q; ++q) {
        p[q] = std::exp(p[q] - max_score);
        sum += p[q];
      }
      const float weight = head_gate[h] / sum;
      std::fill(acc, acc + hd, 0.0f);
      for (int64_t q = 0; q < Q; ++q) {
        axpy(acc, p[q] * weight, v_rows + q * v_stride, hd);
      }
      narrow_row<scalar_t>(out + r * hd, acc, hd);
    }
  });
}

void adapter_attention(const AdapterAttentionArgs& a) {
  dispatch(a.dtype, [&](auto tag) { adapter_attention_typed<decltype(tag)>(a); });
}

}  // namespace

const Kernels& kernels() {
  static const Kernels table{C10_STRINGIZE(CPU_CAPABILITY), &adapter_add, &adapter_attention};
  return table;
}

}  // namespace surgery::cpu::CPU_CAPABILITY
