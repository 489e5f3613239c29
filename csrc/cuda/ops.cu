// CUDA kernels of the fused adapter ops (schemas: csrc/ops.cpp; semantics: docs/kernels.md and
// surgery/ops/reference.py).
//
//   query_concat(queries (Q, C), feats (B, N, C))              -> (B, Q+N, C)     a copy
//   adapter_add(adapter (L, Q, D) | (L*Q, D), vq (B, Q, D))    -> (L, B, Q, D)    one add in the dtype
//   adapter_attention(xq (B, H, T, hd), k_t (B, H, hd, Q), v (B, H, Q, hd),
//                     gate (1, H, 1, 1), new_gate (1, 1, 1, 1)?) -> (B, H, T, hd)   fp32 inside, one rounding
//
// Design (all three are memory-bound; the floor is writing the output once):
// * query_concat / adapter_add: one thread per output "pack" (16 bytes when every pointer, the
//   inner size and every outer stride allow it, else 8, 4, or one element), grid-stride loop over
//   the flat contiguous output, unrolled x4 so four independent loads are in flight before the
//   first store; one wave of resident blocks (SMs x blocks-per-SM). Inputs keep their strides (any
//   strides, sliced or transposed views included, no copies); only the innermost stride decides
//   whether packs are possible (it must be 1). Index decomposition uses 32-bit magic-number
//   division when the output has fewer than 2^31 packs, else 64-bit.
// * adapter_attention: one block (256 threads) per (b, h, t) row. The query row is staged in
//   shared memory as fp32; scores: threads own 16-byte packs of consecutive q of k_t (it is stored
//   (hd, Q), q contiguous) and split hd into groups, partial dot products are summed through shared
//   memory; max and sum of the softmax by warp shuffles + shared memory, all fp32 (expf); the
//   weighted sum of v: threads own 16-byte packs of consecutive d and split Q into groups, summed
//   through shared memory; gate * new_gate / sum applied in fp32, one rounding to the dtype.
//   k_t / v that cannot be read in 16-byte packs (q resp. d not contiguous, sizes or strides not
//   multiples of the pack, misaligned) are read one element at a time, still in place. Q is
//   limited only by shared memory (~(hd + 2Q) floats; above 48 KB the kernel opts in to more);
//   beyond the device's limit (Q ~ 28K on H100) it refuses with an error naming the other backends.
// * Current stream, CUDAGuard on the inputs' device, every launch checked. The output (and out=)
//   is contiguous; out= must be contiguous (checked), as docs/kernels.md says. Nothing is copied.

#include <ATen/ATen.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"  // csrc/ is on the include path (setup.py)

namespace surgery_cuda {

using at::Tensor;
using at::cuda::detail::IntDivider;

// Argument checks: csrc/checks.h (shared with the CPU kernels, same rules and wording as
// surgery/ops/checks.py), plus what only the CUDA kernels need: every tensor on a CUDA device
// (the dispatcher sent them here because one is) and 32-bit row counts in the attention kernel.
using surgery::check_out;
using surgery::head;
using surgery::num;

void require_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), head(op) + name + " is on " + t.device().str() +
                               "; the CUDA kernel needs every tensor on one CUDA device");
}

std::vector<int64_t> check_query_concat(const Tensor& queries, const Tensor& feats) {
  auto sizes = surgery::check_query_concat(queries, feats);
  require_cuda("query_concat", "queries", queries);
  return sizes;
}

std::vector<int64_t> check_adapter_add(const Tensor& adapter, const Tensor& visual_query) {
  auto sizes = surgery::check_adapter_add(adapter, visual_query);
  require_cuda("adapter_add", "adapter", adapter);
  return sizes;
}

std::vector<int64_t> check_adapter_attention(const Tensor& xq, const Tensor& k_t, const Tensor& v,
                                             const Tensor& gate, const std::optional<Tensor>& new_gate) {
  auto sizes = surgery::check_adapter_attention(xq, k_t, v, gate, new_gate);
  require_cuda("adapter_attention", "xq", xq);
  const int64_t rows = sizes[0] * sizes[1] * sizes[2], hd = sizes[3], Q = v.size(2);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(rows <= kMax && hd <= kMax && Q <= kMax,
              head("adapter_attention") + "B*H*T=" + num(rows) + " rows, hd=" + num(hd) + ", Q=" + num(Q) +
                  ": the CUDA kernel takes at most 2^31-1 of each");
  return sizes;
}

// ---------------------------------------------------------------------------------------------
// Packs: N elements moved as one aligned access (LDG/STG.128 for 16 bytes).
// ---------------------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr int kThreads = 256;  // elementwise kernels
constexpr int kUnroll = 4;     // independent packs per thread per loop trip

// Largest N in {16/elem, .., 2, 1} (a power of two) such that every pointer is aligned to N
// elements and every value in `multiples` (inner size, outer strides, in elements) divides by N.
int pick_pack(int64_t elem, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> multiples) {
  for (int n = static_cast<int>(16 / elem); n > 1; n /= 2) {
    bool ok = true;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (n * elem) == 0;
    for (int64_t m : multiples) ok = ok && m % n == 0;
    if (ok) return n;
  }
  return 1;
}

// A dimension of size 1 is never stepped over: its stride does not matter (and is often odd).
int64_t eff_stride(const Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// What the launches need of the current device, read once per device. (Read through the runtime
// rather than at::cuda::getCurrentDeviceProperties(): ATen/cuda/CUDAContext.h pulls in cuSPARSE and
// cuBLAS headers, which minimal CUDA toolkits lack; this file needs only the runtime.)
struct DeviceInfo {
  int sms = 0, threads_per_sm = 0, smem_optin = 0;
};

const DeviceInfo& device_info() {
  static DeviceInfo infos[C10_COMPILE_TIME_MAX_GPUS];
  static std::once_flag once[C10_COMPILE_TIME_MAX_GPUS];
  const int dev = c10::cuda::current_device();
  std::call_once(once[dev], [dev] {
    DeviceInfo& i = infos[dev];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&i.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&i.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&i.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  });
  return infos[dev];
}

int64_t grid_for(int64_t packs) {
  const DeviceInfo& info = device_info();
  const int64_t resident = static_cast<int64_t>(info.sms) * std::max(1, info.threads_per_sm / kThreads);
  const int64_t needed = (packs + static_cast<int64_t>(kThreads) * kUnroll - 1) / (static_cast<int64_t>(kThreads) * kUnroll);
  return std::max<int64_t>(1, std::min(needed, resident));
}

// ---------------------------------------------------------------------------------------------
// query_concat: out[b, s, c] = s < Q ? queries[s, c] : feats[b, s - Q, c]
// Strides below are in packs; `*_c` is the innermost stride (1 whenever N > 1).
// ---------------------------------------------------------------------------------------------

template <typename P, typename index_t>
__global__ void __launch_bounds__(kThreads) query_concat_kernel(
    P* __restrict__ out, const P* __restrict__ queries, const P* __restrict__ feats, index_t total,
    IntDivider<index_t> div_c, IntDivider<index_t> div_s, index_t Q, int64_t q_s, int64_t q_c, int64_t f_b,
    int64_t f_n, int64_t f_c) {
  const index_t step = static_cast<index_t>(gridDim.x) * kThreads * kUnroll;
  for (index_t base = static_cast<index_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < total;
       base += step) {
    P vals[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const index_t i = base + static_cast<index_t>(u) * kThreads;
      if (i < total) {
        const auto rc = div_c.divmod(i);   // row, channel pack
        const auto bs = div_s.divmod(rc.div);  // batch, output token
        const int64_t c = rc.mod;
        vals[u] = bs.mod < Q ? queries[static_cast<int64_t>(bs.mod) * q_s + c * q_c]
                             : feats[static_cast<int64_t>(bs.div) * f_b + static_cast<int64_t>(bs.mod - Q) * f_n + c * f_c];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const index_t i = base + static_cast<index_t>(u) * kThreads;
      if (i < total) out[i] = vals[u];
    }
  }
}

template <typename E, int N>
void launch_query_concat(const Tensor& queries, const Tensor& feats, Tensor& out) {
  using P = Pack<E, N>;
  const int64_t B = feats.size(0), Nf = feats.size(1), C = feats.size(2), Q = queries.size(0);
  const int64_t Cp = C / N, total = B * (Q + Nf) * Cp;
  const int64_t inner = N == 1;  // in packs: 1 when packed (inner stride is 1 then), else the element stride
  const int64_t q_c = inner ? eff_stride(queries, 1) : 1, f_c = inner ? eff_stride(feats, 2) : 1;
  const int64_t q_s = eff_stride(queries, 0) / N, f_b = eff_stride(feats, 0) / N, f_n = eff_stride(feats, 1) / N;
  const auto* qp = reinterpret_cast<const P*>(queries.data_ptr());
  const auto* fp = reinterpret_cast<const P*>(feats.data_ptr());
  auto* op = reinterpret_cast<P*>(out.data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned>(grid_for(total));
  if (total < std::numeric_limits<int32_t>::max()) {
    using I = unsigned int;
    query_concat_kernel<P, I><<<grid, kThreads, 0, stream>>>(
        op, qp, fp, static_cast<I>(total), IntDivider<I>(static_cast<I>(Cp)), IntDivider<I>(static_cast<I>(Q + Nf)),
        static_cast<I>(Q), q_s, q_c, f_b, f_n, f_c);
  } else {
    using I = int64_t;
    query_concat_kernel<P, I><<<grid, kThreads, 0, stream>>>(op, qp, fp, total, IntDivider<I>(Cp),
                                                             IntDivider<I>(Q + Nf), Q, q_s, q_c, f_b, f_n, f_c);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename E>
void query_concat_bytes(const Tensor& queries, const Tensor& feats, Tensor& out) {
  constexpr int64_t elem = sizeof(E);
  const bool inner_unit = (queries.size(1) == 1 || queries.stride(1) == 1) && (feats.size(2) == 1 || feats.stride(2) == 1);
  const int n = !inner_unit ? 1
                            : pick_pack(elem, {queries.data_ptr(), feats.data_ptr(), out.data_ptr()},
                                        {feats.size(2), eff_stride(queries, 0), eff_stride(feats, 0), eff_stride(feats, 1)});
  switch (n) {
    case 8: if constexpr (16 / elem >= 8) { launch_query_concat<E, 8>(queries, feats, out); return; } break;
    case 4: launch_query_concat<E, 4>(queries, feats, out); return;
    case 2: launch_query_concat<E, 2>(queries, feats, out); return;
    default: break;
  }
  launch_query_concat<E, 1>(queries, feats, out);
}

// Checked inputs, contiguous out.
void query_concat_into(const Tensor& queries, const Tensor& feats, Tensor& out) {
  const c10::cuda::CUDAGuard guard(feats.device());
  // A copy: only the element size matters (4 bytes: float32; 2 bytes: bfloat16, float16).
  if (feats.element_size() == 4)
    query_concat_bytes<uint32_t>(queries, feats, out);
  else
    query_concat_bytes<uint16_t>(queries, feats, out);
}

Tensor& query_concat_out(const Tensor& queries, const Tensor& feats, Tensor& out) {
  const auto sizes = check_query_concat(queries, feats);
  check_out("query_concat", out, sizes, feats, {{"queries", &queries}, {"feats", &feats}});
  query_concat_into(queries, feats, out);
  return out;
}

Tensor query_concat(const Tensor& queries, const Tensor& feats) {
  const auto sizes = check_query_concat(queries, feats);
  Tensor out = at::empty(sizes, feats.options().memory_format(at::MemoryFormat::Contiguous));
  query_concat_into(queries, feats, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// adapter_add: out[l, b, q, d] = adapter[l, q, d] + vq[b, q, d], in fp32 then one rounding (what
// eager torch does for bf16/fp16: opmath float, rounded once).
// ---------------------------------------------------------------------------------------------

template <typename T, int N, typename index_t>
__global__ void __launch_bounds__(kThreads) adapter_add_kernel(
    Pack<T, N>* __restrict__ out, const Pack<T, N>* __restrict__ adapter, const Pack<T, N>* __restrict__ vq,
    index_t total, IntDivider<index_t> div_d, IntDivider<index_t> div_q, IntDivider<index_t> div_b, int64_t a_l,
    int64_t a_q, int64_t a_d, int64_t v_b, int64_t v_q, int64_t v_d) {
  using P = Pack<T, N>;
  const index_t step = static_cast<index_t>(gridDim.x) * kThreads * kUnroll;
  for (index_t base = static_cast<index_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < total;
       base += step) {
    P a[kUnroll], x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const index_t i = base + static_cast<index_t>(u) * kThreads;
      if (i < total) {
        const auto rd = div_d.divmod(i);
        const auto rq = div_q.divmod(rd.div);
        const auto lb = div_b.divmod(rq.div);
        const int64_t d = rd.mod, q = rq.mod;
        a[u] = adapter[static_cast<int64_t>(lb.div) * a_l + q * a_q + d * a_d];
        x[u] = vq[static_cast<int64_t>(lb.mod) * v_b + q * v_q + d * v_d];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const index_t i = base + static_cast<index_t>(u) * kThreads;
      if (i < total) {
        P r;
#pragma unroll
        for (int j = 0; j < N; ++j)
          r.v[j] = static_cast<T>(static_cast<float>(a[u].v[j]) + static_cast<float>(x[u].v[j]));
        out[i] = r;
      }
    }
  }
}

template <typename T, int N>
void launch_adapter_add(const Tensor& table, const Tensor& vq, Tensor& out) {
  using P = Pack<T, N>;
  const int64_t L = table.size(0), B = vq.size(0), Q = vq.size(1), D = vq.size(2);
  const int64_t Dp = D / N, total = L * B * Q * Dp;
  const bool scalar = N == 1;
  const int64_t a_d = scalar ? eff_stride(table, 2) : 1, v_d = scalar ? eff_stride(vq, 2) : 1;
  const int64_t a_l = eff_stride(table, 0) / N, a_q = eff_stride(table, 1) / N;
  const int64_t v_b = eff_stride(vq, 0) / N, v_q = eff_stride(vq, 1) / N;
  const auto* ap = reinterpret_cast<const P*>(table.data_ptr());
  const auto* xp = reinterpret_cast<const P*>(vq.data_ptr());
  auto* op = reinterpret_cast<P*>(out.data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned>(grid_for(total));
  if (total < std::numeric_limits<int32_t>::max()) {
    using I = unsigned int;
    adapter_add_kernel<T, N, I><<<grid, kThreads, 0, stream>>>(
        op, ap, xp, static_cast<I>(total), IntDivider<I>(static_cast<I>(Dp)), IntDivider<I>(static_cast<I>(Q)),
        IntDivider<I>(static_cast<I>(B)), a_l, a_q, a_d, v_b, v_q, v_d);
  } else {
    using I = int64_t;
    adapter_add_kernel<T, N, I><<<grid, kThreads, 0, stream>>>(op, ap, xp, total, IntDivider<I>(Dp), IntDivider<I>(Q),
                                                               IntDivider<I>(B), a_l, a_q, a_d, v_b, v_q, v_d);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void adapter_add_typed(const Tensor& table, const Tensor& vq, Tensor& out) {
  constexpr int64_t elem = sizeof(T);
  const bool inner_unit = (vq.size(2) == 1 || (table.stride(2) == 1 && vq.stride(2) == 1));
  const int n = !inner_unit ? 1
                            : pick_pack(elem, {table.data_ptr(), vq.data_ptr(), out.data_ptr()},
                                        {vq.size(2), eff_stride(table, 0), eff_stride(table, 1), eff_stride(vq, 0),
                                         eff_stride(vq, 1)});
  switch (n) {
    case 8: if constexpr (16 / elem >= 8) { launch_adapter_add<T, 8>(table, vq, out); return; } break;
    case 4: launch_adapter_add<T, 4>(table, vq, out); return;
    case 2: launch_adapter_add<T, 2>(table, vq, out); return;
    default: break;
  }
  launch_adapter_add<T, 1>(table, vq, out);
}

// (L*Q, D) -> (L, Q, D): splitting a dimension is always a view, whatever the strides.
Tensor adapter_table(const Tensor& adapter, int64_t L, int64_t Q) {
  return adapter.dim() == 3 ? adapter : adapter.view({L, Q, adapter.size(1)});
}

// Checked inputs, contiguous out of `sizes` (L, B, Q, D).
void adapter_add_into(const Tensor& adapter, const Tensor& visual_query, at::IntArrayRef sizes, Tensor& out) {
  const Tensor table = adapter_table(adapter, sizes[0], sizes[2]);
  const c10::cuda::CUDAGuard guard(visual_query.device());
  SURGERY_DISPATCH_FLOATING_TYPES(visual_query.scalar_type(), "adapter_add",
                                  [&] { adapter_add_typed<scalar_t>(table, visual_query, out); });
}

Tensor& adapter_add_out(const Tensor& adapter, const Tensor& visual_query, Tensor& out) {
  const auto sizes = check_adapter_add(adapter, visual_query);
  check_out("adapter_add", out, sizes, visual_query, {{"adapter", &adapter}, {"visual_query", &visual_query}});
  adapter_add_into(adapter, visual_query, sizes, out);
  return out;
}

Tensor adapter_add(const Tensor& adapter, const Tensor& visual_query) {
  const auto sizes = check_adapter_add(adapter, visual_query);
  Tensor out = at::empty(sizes, visual_query.options().memory_format(at::MemoryFormat::Contiguous));
  adapter_add_into(adapter, visual_query, sizes, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// adapter_attention: one block per (b, h, t) row.
// ---------------------------------------------------------------------------------------------

constexpr int kAttnThreads = 256;
constexpr int kWarps = kAttnThreads / 32;
constexpr int kInFlight = 4;  // loads of k_t / v issued per thread before their first use

template <bool IsMax>
__device__ __forceinline__ float block_reduce(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = IsMax ? fmaxf(x, y) : x + y;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = lane < kWarps ? red[lane] : (IsMax ? -INFINITY : 0.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = IsMax ? fmaxf(x, y) : x + y;
  }
  __syncthreads();  // `red` may be reused right after
  return x;
}

struct AttnStrides {
  int64_t x[4];  // xq (B, H, T, hd)
  int64_t k[4];  // k_t (B, H, hd, Q); k[3] in packs of VQ (1 when VQ > 1)
  int64_t v[4];  // v (B, H, Q, hd); v[3] in packs of VD (1 when VD > 1)
  int64_t gate_h;
};

// Shared memory: xs[hd] | ps[Q] | scratch[max(G1*Q, G2*hd)] | red[kWarps]  (all fp32)
template <typename T, int VQ, int VD>
__global__ void __launch_bounds__(kAttnThreads, 2) adapter_attention_kernel(
    T* __restrict__ out, const T* __restrict__ xq, const T* __restrict__ k_t, const T* __restrict__ v,
    const T* __restrict__ gate, const T* __restrict__ new_gate, int H, int Tn, int hd, int Q, int G1, int G2,
    AttnStrides st, float scale) {
  using PQ = Pack<T, VQ>;
  using PD = Pack<T, VD>;
  extern __shared__ float smem[];
  float* xs = smem;
  float* ps = xs + hd;
  float* scratch = ps + Q;
  float* red = scratch + max(G1 * Q, G2 * hd);

  const int tid = threadIdx.x;
  const unsigned row = blockIdx.x;  // ((b * H) + h) * T + t, < 2^31 (checked); 32-bit division is inline
  const int t = static_cast<int>(row % static_cast<unsigned>(Tn));
  const unsigned bh = row / static_cast<unsigned>(Tn);
  const int h = static_cast<int>(bh % static_cast<unsigned>(H));
  const int64_t b = bh / static_cast<unsigned>(H);

  const T* xrow = xq + b * st.x[0] + h * st.x[1] + t * st.x[2];
  for (int d = tid; d < hd; d += kAttnThreads) xs[d] = static_cast<float>(xrow[d * st.x[3]]);
  __syncthreads();

  // Scores, partial over G1 groups of d: thread item (qp, g) sums d = g, g + G1, ...
  const PQ* kp = reinterpret_cast<const PQ*>(k_t + b * st.k[0] + h * st.k[1]);
  const int QP = Q / VQ;
  for (int it = tid; it < QP * G1; it += kAttnThreads) {
    const int qp = it % QP, g = it / QP;
    float acc[VQ];
#pragma unroll
    for (int j = 0; j < VQ; ++j) acc[j] = 0.f;
    const PQ* col = kp + qp * st.k[3];
    const int64_t kstep = st.k[2] / VQ * G1;  // k[2] is a multiple of VQ when VQ > 1
    const PQ* ptr = col + (st.k[2] / VQ) * g;
    int d = g;
    for (; d + (kInFlight - 1) * G1 < hd; d += kInFlight * G1) {  // kInFlight loads issued, then used
      PQ kv[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) kv[u] = ptr[u * kstep];
      ptr += kInFlight * kstep;
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const float xd = xs[d + u * G1];
#pragma unroll
        for (int j = 0; j < VQ; ++j) acc[j] = fmaf(xd, static_cast<float>(kv[u].v[j]), acc[j]);
      }
    }
    for (; d < hd; d += G1, ptr += kstep) {
      const PQ kv = *ptr;
      const float xd = xs[d];
#pragma unroll
      for (int j = 0; j < VQ; ++j) acc[j] = fmaf(xd, static_cast<float>(kv.v[j]), acc[j]);
    }
#pragma unroll
    for (int j = 0; j < VQ; ++j) scratch[g * Q + qp * VQ + j] = acc[j];
  }
  __syncthreads();

  float mx = -INFINITY;
  for (int q = tid; q < Q; q += kAttnThreads) {
    float s = 0.f;
    for (int g = 0; g < G1; ++g) s += scratch[g * Q + q];
    s *= scale;
    ps[q] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_reduce<true>(mx, red);
  float sum = 0.f;
  for (int q = tid; q < Q; q += kAttnThreads) {
    const float e = expf(ps[q] - mx);
    ps[q] = e;
    sum += e;
  }
  sum = block_reduce<false>(sum, red);  // its barriers also publish ps[] and free scratch

  // Weighted sum of v, partial over G2 groups of q: thread item (dp, g) sums q = g, g + G2, ...
  const PD* vp = reinterpret_cast<const PD*>(v + b * st.v[0] + h * st.v[1]);
  const int DP = hd / VD;
  for (int it = tid; it < DP * G2; it += kAttnThreads) {
    const int dp = it % DP, g = it / DP;
    float acc[VD];
#pragma unroll
    for (int j = 0; j < VD; ++j) acc[j] = 0.f;
    const int64_t vstep = st.v[2] / VD * G2;
    const PD* ptr = vp + dp * st.v[3] + (st.v[2] / VD) * g;
    int q = g;
    for (; q + (kInFlight - 1) * G2 < Q; q += kInFlight * G2) {
      PD vv[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) vv[u] = ptr[u * vstep];
      ptr += kInFlight * vstep;
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const float p = ps[q + u * G2];
#pragma unroll
        for (int j = 0; j < VD; ++j) acc[j] = fmaf(p, static_cast<float>(vv[u].v[j]), acc[j]);
      }
    }
    for (; q < Q; q += G2, ptr += vstep) {
      const PD vv = *ptr;
      const float p = ps[q];
#pragma unroll
      for (int j = 0; j < VD; ++j) acc[j] = fmaf(p, static_cast<float>(vv.v[j]), acc[j]);
    }
#pragma unroll
    for (int j = 0; j < VD; ++j) scratch[g * hd + dp * VD + j] = acc[j];
  }
  __syncthreads();

  float factor = static_cast<float>(gate[h * st.gate_h]) / sum;
  if (new_gate != nullptr) factor *= static_cast<float>(*new_gate);
  T* orow = out + static_cast<int64_t>(row) * hd;
  for (int d = tid; d < hd; d += kAttnThreads) {
    float o = 0.f;
    for (int g = 0; g < G2; ++g) o += scratch[g * hd + d];
    orow[d] = static_cast<T>(o * factor);
  }
}

template <typename T, int VQ, int VD>
void launch_attention(const Tensor& xq, const Tensor& k_t, const Tensor& v, const Tensor& gate,
                      const std::optional<Tensor>& new_gate, Tensor& out) {
  const int64_t B = xq.size(0), H = xq.size(1), Tn = xq.size(2), hd = xq.size(3), Q = v.size(2);
  const int64_t rows = B * H * Tn;
  const int QP = static_cast<int>(Q / VQ), DP = static_cast<int>(hd / VD);
  const int G1 = std::max(1, kAttnThreads / QP), G2 = std::max(1, kAttnThreads / DP);
  const size_t smem = sizeof(float) * (hd + Q + std::max<int64_t>(static_cast<int64_t>(G1) * Q, static_cast<int64_t>(G2) * hd) + kWarps);
  auto kernel = adapter_attention_kernel<T, VQ, VD>;
  const int smem_optin = device_info().smem_optin;
  TORCH_CHECK(smem <= static_cast<size_t>(smem_optin),
              "surgery::adapter_attention: Q=" + num(Q) + " adapter tokens and hd=" + num(hd) + " need " +
                  num(static_cast<int64_t>(smem)) + " bytes of shared memory per block; this GPU allows " +
                  num(smem_optin) + " (use the eager or Triton backend)");
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  AttnStrides st{};
  for (int i = 0; i < 4; ++i) {
    st.x[i] = eff_stride(xq, i);
    st.k[i] = eff_stride(k_t, i);
    st.v[i] = eff_stride(v, i);
  }
  if (VQ > 1) st.k[3] = 1;  // packs of consecutive q
  if (VD > 1) st.v[3] = 1;  // packs of consecutive d
  st.gate_h = eff_stride(gate, 1);
  const T* ng = new_gate.has_value() ? reinterpret_cast<const T*>(new_gate->data_ptr()) : nullptr;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  kernel<<<static_cast<unsigned>(rows), kAttnThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(xq.data_ptr()),
      reinterpret_cast<const T*>(k_t.data_ptr()), reinterpret_cast<const T*>(v.data_ptr()),
      reinterpret_cast<const T*>(gate.data_ptr()), ng, static_cast<int>(H), static_cast<int>(Tn), static_cast<int>(hd),
      static_cast<int>(Q), G1, G2, st, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void attention_typed(const Tensor& xq, const Tensor& k_t, const Tensor& v, const Tensor& gate,
                     const std::optional<Tensor>& new_gate, Tensor& out) {
  constexpr int64_t kPack = 16 / sizeof(T);
  const int64_t Q = v.size(2), hd = xq.size(3);
  // 16-byte packs along q of k_t / along d of v where pointer, size and outer strides allow; else scalars.
  const bool kvec = (k_t.stride(3) == 1) && pick_pack(sizeof(T), {k_t.data_ptr()},
                                                       {Q, eff_stride(k_t, 0), eff_stride(k_t, 1), eff_stride(k_t, 2)}) == kPack;
  const bool vvec = (v.stride(3) == 1) && pick_pack(sizeof(T), {v.data_ptr()},
                                                    {hd, eff_stride(v, 0), eff_stride(v, 1), eff_stride(v, 2)}) == kPack;
  if (kvec && vvec) return launch_attention<T, kPack, kPack>(xq, k_t, v, gate, new_gate, out);
  if (kvec) return launch_attention<T, kPack, 1>(xq, k_t, v, gate, new_gate, out);
  if (vvec) return launch_attention<T, 1, kPack>(xq, k_t, v, gate, new_gate, out);
  launch_attention<T, 1, 1>(xq, k_t, v, gate, new_gate, out);
}

Tensor adapter_attention(const Tensor& xq, const Tensor& k_t, const Tensor& v, const Tensor& gate,
                         const std::optional<Tensor>& new_gate) {
  const auto sizes = check_adapter_attention(xq, k_t, v, gate, new_gate);
  // An undefined new_gate (None reaching C++ as an empty optional or an undefined tensor) means no new_gate.
  const std::optional<Tensor> ng = new_gate.has_value() && new_gate->defined() ? new_gate : std::nullopt;
  const c10::cuda::CUDAGuard guard(xq.device());
  Tensor out = at::empty(sizes, xq.options().memory_format(at::MemoryFormat::Contiguous));
  SURGERY_DISPATCH_FLOATING_TYPES(xq.scalar_type(), "adapter_attention",
                                  [&] { attention_typed<scalar_t>(xq, k_t, v, gate, ng, out); });
  return out;
}

}  // namespace surgery_cuda

TORCH_LIBRARY_IMPL(surgery, CUDA, m) {
  m.impl("query_concat", &surgery_cuda::query_concat);
  m.impl("query_concat.out", &surgery_cuda::query_concat_out);
  m.impl("adapter_add", &surgery_cuda::adapter_add);
  m.impl("adapter_add.out", &surgery_cuda::adapter_add_out);
  m.impl("adapter_attention", &surgery_cuda::adapter_attention);
}
