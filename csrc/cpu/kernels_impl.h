// The CPU kernels, written once with at::vec::Vectorized and compiled once per instruction set:
// included by kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp with CPU_CAPABILITY
// (the namespace) and ATen's CPU_CAPABILITY_<ISA> macro (its vector implementation) set. Work is
// split over output rows with at::parallel_for; bf16/fp16 are widened to fp32 and rounded back
// once. adapter_add's rows are hand-written per instruction set (add_row.h); the rest is Vectorized.
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
#include <tuple>
#include <vector>

#include "add_row.h"
#include "kernels.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512_BF16) before including kernels_impl.h"
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

// Two fp32 vectors widened from Vectorized<scalar_t>::size() values of the dtype at `src` (the
// second is unused for fp32, whose Vectorized is one fp32 vector); `count` < size(): a partial
// load, the rest reads as 0.
template <typename scalar_t>
inline std::tuple<fVec, fVec> load_wide(const scalar_t* src, int64_t count) {
  using Vec = Vectorized<scalar_t>;
  const Vec v = count == Vec::size() ? Vec::loadu(src) : Vec::loadu(src, count);
  if constexpr (is_reduced<scalar_t>()) {
    return at::vec::convert_to_float<scalar_t>(v);
  } else {
    return {v, fVec(0.0f)};
  }
}

// One column block of vecmat: kAcc fp32 accumulators (kAcc * fVec::size() columns) kept in
// registers across all rows, so m is read row by row, in order, and the FMA chains are independent.
template <typename scalar_t, int kAcc>
inline void vecmat_block(float* out, const float* w, const scalar_t* m, int64_t stride, int64_t rows) {
  using Vec = Vectorized<scalar_t>;
  constexpr int kLoads = is_reduced<scalar_t>() ? kAcc / 2 : kAcc;  // a bf16/fp16 load widens to 2 vectors
  fVec acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = fVec(0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const fVec wr(w[r]);
    const scalar_t* row = m + r * stride;
    for (int j = 0; j < kLoads; ++j) {
      if constexpr (is_reduced<scalar_t>()) {
        const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(row + j * Vec::size()));
        acc[2 * j] = at::vec::fmadd(wr, lo, acc[2 * j]);
        acc[2 * j + 1] = at::vec::fmadd(wr, hi, acc[2 * j + 1]);
      } else {
        acc[j] = at::vec::fmadd(wr, Vec::loadu(row + j * Vec::size()), acc[j]);
      }
    }
  }
  for (int j = 0; j < kAcc; ++j) acc[j].store(out + j * fVec::size());
}

// out[c] = sum_r w[r] * m[r * stride + c] for c < cols: a vector-matrix product, m in the dtype
// and widened as it is read, fp32 accumulation. Both halves of the adapter branch are this
// shape: the scores (x against k_t, rows d, columns q) and the output (softmax against v, rows
// q, columns d), so neither needs a transposed or widened copy of k_t or v. Columns go in the
// widest register blocks that fit (16 accumulators where there are 32 vector registers, e.g.
// 256 columns with AVX-512, then 8, then 4): one pass over m's rows per block, so a (b, h) of
// k_t or v that is read from memory is read in order, in as few passes as possible (column
// blocks of 64 made four strided passes over a 256-token k_t and ran at a third of the
// bandwidth).
template <typename scalar_t>
inline void vecmat(float* out, const float* w, const scalar_t* m, int64_t stride, int64_t rows, int64_t cols) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();  // columns per load
  constexpr int64_t F = fVec::size();
  constexpr bool kManyRegisters = F >= 16;  // AVX-512: 32 vector registers
  int64_t c0 = 0;
  if constexpr (kManyRegisters) {
    for (; c0 + 16 * F <= cols; c0 += 16 * F) vecmat_block<scalar_t, 16>(out + c0, w, m + c0, stride, rows);
  }
  for (; c0 + 8 * F <= cols; c0 += 8 * F) vecmat_block<scalar_t, 8>(out + c0, w, m + c0, stride, rows);
  for (; c0 + 4 * F <= cols; c0 += 4 * F) vecmat_block<scalar_t, 4>(out + c0, w, m + c0, stride, rows);
  // the remaining columns (all of them when cols is short, e.g. 10 adapter tokens): one load of
  // up to W columns per row, rows spread over four accumulators (four FMA chains); when the
  // columns fit one fp32 vector, the second half of a widened bf16/fp16 load is all zeros: skipped
  for (; c0 < cols; c0 += W) {
    const int64_t count = std::min<int64_t>(W, cols - c0);
    const bool both_halves = is_reduced<scalar_t>() && count > F;
    fVec lo[4], hi[4];
    for (int j = 0; j < 4; ++j) lo[j] = hi[j] = fVec(0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const fVec wr(w[r]);
      const auto [l, h] = load_wide<scalar_t>(m + r * stride + c0, count);
      lo[r & 3] = at::vec::fmadd(wr, l, lo[r & 3]);
      if (both_halves) hi[r & 3] = at::vec::fmadd(wr, h, hi[r & 3]);
    }
    float tmp[2 * F];
    ((lo[0] + lo[1]) + (lo[2] + lo[3])).store(tmp);
    ((hi[0] + hi[1]) + (hi[2] + hi[3])).store(tmp + F);
    std::copy(tmp, tmp + count, out + c0);
  }
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
// The output (L, B, Q, D) repeats the table over b and visual_query over l, so the order of the
// walk decides how often each input is read, and from where. Two regimes:
//
// * Outputs that fit in the last-level cache (below kStreamMinBytes). Which walk is faster
//   depended on the machine, so it is chosen per instruction set, by what was measured on each:
//   - In order (AVX2; Zen 3 VM, 2026-12-02): each thread writes a contiguous run of output rows,
//     so the output and (for B = 1) the table are single forward streams; visual_query, at most
//     1/L of the output, is re-read from L2 once per layer. Against the tiles below (both builds,
//     alternating processes): fp32 L=31 Q=10 B=1 1.36x a copy instead of 1.56x, bf16 the same
//     within the noise (benchmarks/results/2026-12-02-cpu-zen3-avx2-walk-ab).
//   - Tiles (AVX-512; Zen 4, 2026-11-26): a task is a row q and a page-sized chunk of D, over
//     every l and b; the tile's visual_query pieces (all b) and its table piece (one l at a time)
//     stay in L1 while they are reused. Walking in order re-read visual_query from L2 once per
//     layer, which made the op 1.5x a copy (1.19x with the tiles, the copy's second stream being
//     the only extra), in a single-thread harness. The baseline build (not measured either way)
//     keeps the tiles it had.
// * Larger outputs: the q rows are cut into blocks small enough that a block of visual_query
//   (all b) and of the table (one l) stay in L2, and a task is one (q block, l, b): the tasks of
//   a block run back to back (l, then b, fastest), so every input row is read from memory once
//   and the output is written in long runs, with non-temporal stores (as memcpy does for large
//   copies): they skip the read-for-ownership of every output line and do not evict the inputs.

#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kInCacheInOrder = true;
#else
constexpr bool kInCacheInOrder = false;
#endif
constexpr int64_t kChunkBytes = 4096;      // a tile's width in D: one page, what the prefetchers follow
constexpr int64_t kTileBytes = 256 << 10;  // visual_query rows (all b) of one q block: well inside L2
// Output size from which stores are non-temporal and the q-block walk is used. Below it the
// output (and the table, as large when B = 1) stay in the 32 MB last-level cache of the Zen 4
// this was measured on, and regular stores are faster; from 8 MB, streaming won.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

template <typename scalar_t>
void adapter_add_typed(const AdapterAddArgs& a) {
  const auto* table = static_cast<const scalar_t*>(a.table);
  const auto* vq = static_cast<const scalar_t*>(a.vq);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t L = a.L, B = a.B, Q = a.Q, D = a.D;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = kHasStreamingStores && L * B * Q * row_bytes >= kStreamMinBytes;
  if (!stream && kInCacheInOrder) {
    at::parallel_for(0, L * B * Q, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {  // r = (l * B + b) * Q + q: the output's row
        const int64_t q = r % Q, b = (r / Q) % B, l = r / (B * Q);
        add_row<scalar_t>(out + r * D, table + l * a.table_l + q * a.table_q, vq + b * a.vq_b + q * a.vq_q, D,
                          /*stream=*/false);
      }
    });
    return;
  }
  if (!stream) {
    const int64_t chunk = std::min<int64_t>(D, kChunkBytes / static_cast<int64_t>(sizeof(scalar_t)));
    const int64_t chunks = (D + chunk - 1) / chunk;
    at::parallel_for(0, Q * chunks, grain_rows(L * B * chunk), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {  // t = q * chunks + chunk index
        const int64_t q = t / chunks, d0 = (t % chunks) * chunk, n = std::min(chunk, D - d0);
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t b = 0; b < B; ++b) {
            add_row<scalar_t>(out + ((l * B + b) * Q + q) * D + d0, table + l * a.table_l + q * a.table_q + d0,
                              vq + b * a.vq_b + q * a.vq_q + d0, n, /*stream=*/false);
          }
        }
      }
    });
    return;
  }
  const int64_t block = std::clamp<int64_t>(kTileBytes / std::max<int64_t>(1, B * row_bytes), 1, Q);
  const int64_t blocks = (Q + block - 1) / block;
  at::parallel_for(0, blocks * L * B, grain_rows(block * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {  // t = (block index * L + l) * B + b
      const int64_t b = t % B, l = (t / B) % L, q0 = (t / (B * L)) * block, q1 = std::min(Q, q0 + block);
      for (int64_t q = q0; q < q1; ++q) {
        add_row<scalar_t>(out + ((l * B + b) * Q + q) * D, table + l * a.table_l + q * a.table_q,
                          vq + b * a.vq_b + q * a.vq_q, D, /*stream=*/true);
      }
    }
    stream_fence();
  });
}

void adapter_add(const AdapterAddArgs& a) {
  dispatch(a.dtype, [&](auto tag) { adapter_add_typed<decltype(tag)>(a); });
}

// p[q] = gate * softmax(scale * p)[q], in place, fp32. The exps of whole vectors use Sleef (within
// an ulp of std::exp), the rest std::exp: for 10 adapter tokens the scalar loop is faster than
// partial vectors, for 64 and more the vectors are.
inline void softmax_scaled(float* p, int64_t Q, float scale, float gate) {
  constexpr int64_t F = fVec::size();
  const auto vec_max = [](fVec& x, fVec& y) { return at::vec::maximum(x, y); };
  const auto vec_add = [](fVec& x, fVec& y) { return x + y; };
  fVec vmax(-std::numeric_limits<float>::infinity());
  int64_t q = 0;
  for (; q + F <= Q; q += F) {
    const fVec s = fVec::loadu(p + q) * fVec(scale);
    s.store(p + q);
    vmax = at::vec::maximum(vmax, s);
  }
  float max_score = q > 0 ? at::vec::vec_reduce_all<float>(vec_max, vmax) : -std::numeric_limits<float>::infinity();
  for (; q < Q; ++q) {
    p[q] *= scale;
    max_score = std::max(max_score, p[q]);
  }
  const fVec shift(max_score);
  fVec vsum(0.0f);
  for (q = 0; q + F <= Q; q += F) {
    const fVec e = (fVec::loadu(p + q) - shift).exp();
    e.store(p + q);
    vsum = vsum + e;
  }
  float sum = q > 0 ? at::vec::vec_reduce_all<float>(vec_add, vsum) : 0.0f;
  for (; q < Q; ++q) {
    p[q] = std::exp(p[q] - max_score);
    sum += p[q];
  }
  const float weight = gate / sum;
  for (q = 0; q < Q; ++q) p[q] *= weight;
}

// ---- adapter_attention: one task = a range of (b, h, t) rows ------------------------------------
//
// Per row: the scores x k_t over the Q adapter tokens (vecmat over k_t's hd rows), the softmax
// over Q, then the weighted sum of v's Q rows (vecmat again), all in fp32, with the gates folded
// into the softmax normaliser and one rounding to the dtype at the end. k_t and v are read in
// place, in the dtype (bf16/fp16 widened in registers): at decoding (one row per (b, h)) every
// element is used once, so a widened copy would only add traffic, and with several rows per
// (b, h) they are re-read from cache.

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

  at::parallel_for(0, a.B * H * T, grain_rows(2 * Q * hd), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * hd + Q);
    float* x_row = scratch.data();  // (hd): the query row in fp32
    float* acc = x_row + hd;        // (hd): the output row in fp32
    float* p = acc + hd;            // (Q): scores, then softmax weights
    for (int64_t r = begin; r < end; ++r) {  // r = (b * H + h) * T + t
      const int64_t bh = r / T, t = r % T, b = bh / H, h = bh % H;
      widen_row<scalar_t>(x_row, xq + b * a.xq_b + h * a.xq_h + t * a.xq_t, hd);
      vecmat<scalar_t>(p, x_row, k_t + b * a.k_b + h * a.k_h, a.k_d, hd, Q);  // (Q)
      softmax_scaled(p, Q, scale, head_gate[h]);
      vecmat<scalar_t>(acc, p, v + b * a.v_b + h * a.v_h, a.v_q, Q, hd);  // (hd)
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
