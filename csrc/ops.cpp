// The fused ops' schemas (namespace `surgery`, defined here once) and their CPU implementations.
// Semantics: surgery/ops/reference.py; rules: docs/kernels.md; input checks: csrc/checks.h.
//
//   query_concat       (Q, C), (B, N, C)                -> (B, Q+N, C)    row copies
//   adapter_add        (L, Q, D) | (L*Q, D), (B, Q, D)  -> (L, B, Q, D)   one add in the dtype
//   adapter_attention  xq (B, H, T, hd), k_t (B, H, hd, Q), v (B, H, Q, hd), gate (1, H, 1, 1),
//                      new_gate (1, 1, 1, 1)?           -> (B, H, T, hd)  fp32 throughout, one rounding
//
// This file checks, allocates and sets up; the vector kernels of adapter_add and
// adapter_attention are csrc/cpu/kernels_impl.h, compiled per instruction set (baseline, AVX2, AVX-512)
// and chosen at run time. All work is split over output rows with at::parallel_for. Inputs may be
// non-contiguous: outer strides are followed as they are; an input whose innermost dimension is
// strided is made contiguous first (it is at most as large as the output, which repeats it over
// L or B), except the features of query_concat, copied by ATen's strided copy in one pass.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "checks.h"
#include "cpu/kernels.h"

namespace surgery {

namespace cpu {

const Kernels& kernels() {
  static const Kernels& chosen = []() -> const Kernels& {
#if defined(SURGERY_CPU_AVX2)
    // ATen's choice for this CPU (honours ATEN_CPU_CAPABILITY), confirmed with the CPU's own flags
    const std::string capability = at::get_cpu_capability();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (capability == "AVX512" && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bf16")) {
      return AVX512_BF16::kernels();
    }
    if ((capability == "AVX2" || capability == "AVX512") && avx2) {
      return AVX2::kernels();
    }
#endif
    return DEFAULT::kernels();
  }();
  return chosen;
}

}  // namespace cpu

// The instruction set of the CPU kernels in use ("AVX512_BF16", "AVX2", "DEFAULT"), for surgery._C.build_info().
const char* cpu_kernels_isa() {
  return cpu::kernels().isa;
}

namespace {

// About this many bytes per task before at::parallel_for splits a copy.
constexpr int64_t kCopyGrainBytes = 65536;

at::Tensor rows_contiguous_or_copy(const at::Tensor& t) {
  return rows_contiguous(t) ? t : t.contiguous();
}

// ---- query_concat ------------------------------------------------------------------------------

void query_concat_kernel(const at::Tensor& queries_in, const at::Tensor& feats, at::Tensor& out) {
  const int64_t B = feats.size(0), N = feats.size(1), C = feats.size(2), Q = queries_in.size(0);
  const at::Tensor queries = rows_contiguous_or_copy(queries_in);  // small: Q x C
  // feats with strided rows (e.g. a transposed (B, C, N) buffer): ATen's strided copy into the
  // output's slice is one pass and tiles transposes well; the bytes are then ours for the queries only.
  const bool feats_rows = rows_contiguous(feats);
  if (!feats_rows) {
    out.narrow(1, Q, N).copy_(feats);
  }
  const int64_t item = static_cast<int64_t>(feats.element_size());
  const int64_t row_bytes = C * item;
  const auto* q_base = static_cast<const char*>(queries.const_data_ptr());
  const auto* f_base = static_cast<const char*>(feats.const_data_ptr());
  auto* o_base = static_cast<char*>(out.data_ptr());
  const int64_t q_row = queries.stride(0) * item;
  const int64_t f_batch = feats.stride(0) * item, f_row = feats.stride(1) * item;
  const int64_t q_bytes = Q * row_bytes, out_batch = (Q + N) * row_bytes;
  // A block of rows whose source rows follow each other in memory is one memcpy: the queries when
  // their rows are packed, one batch element's features when theirs are (the usual case), so a
  // batch element is two memcpys. The output bytes are split evenly over the threads; each copies
  // the pieces of these blocks that fall in its range, so small outputs cost few calls and large
  // ones are shared whatever Q, N and B are.
  const bool q_packed = q_row == row_bytes, f_packed = f_row == row_bytes;
  auto copy_range = [&](int64_t begin, int64_t end) {  // output bytes [begin, end)
    for (int64_t o = begin; o < end;) {
      const int64_t b = o / out_batch, in_batch = o % out_batch;
      const bool is_query = in_batch < q_bytes;
      const int64_t offset = is_query ? in_batch : in_batch - q_bytes;  // within the block
      if (!is_query && !feats_rows) {  // already copied above: skip to the next batch element
        o = (b + 1) * out_batch;
        continue;
      }
      const char* block = is_query ? q_base : f_base + b * f_batch;
      const bool packed = is_query ? q_packed : f_packed;
      const int64_t block_end = is_query ? q_bytes : out_batch - q_bytes;
      const int64_t row = offset / row_bytes, in_row = offset % row_bytes;
      const char* src = packed ? block + offset : block + row * (is_query ? q_row : f_row) + in_row;
      const int64_t len = std::min(end - o, packed ? block_end - offset : row_bytes - in_row);
      std::memcpy(o_base + o, src, len);
      o += len;
    }
  };
  at::parallel_for(0, B * out_batch, kCopyGrainBytes, copy_range);
}

at::Tensor& query_concat_out_cpu(const at::Tensor& queries, const at::Tensor& feats, at::Tensor& out) {
  const auto sizes = check_query_concat(queries, feats);
  check_out("query_concat", out, sizes, feats, {{"queries", &queries}, {"feats", &feats}});
  query_concat_kernel(queries, feats, out);
  return out;
}

at::Tensor query_concat_cpu(const at::Tensor& queries, const at::Tensor& feats) {
  const auto sizes = check_query_concat(queries, feats);
  at::Tensor out = at::empty(sizes, feats.options());
  query_concat_kernel(queries, feats, out);
  return out;
}

// ---- adapter_add -------------------------------------------------------------------------------

void adapter_add_kernel(const at::Tensor& adapter, const at::Tensor& visual_query_in, at::Tensor& out) {
  const int64_t L = out.size(0), B = out.size(1), Q = out.size(2), D = out.size(3);
  // (L*Q, D) -> (L, Q, D): splitting a dimension is always a view, whatever the strides
  const at::Tensor table = rows_contiguous_or_copy(adapter.dim() == 3 ? adapter : adapter.view({L, Q, D}));
  const at::Tensor vq = rows_contiguous_or_copy(visual_query_in);
  cpu::kernels().adapter_add({out.scalar_type(), out.data_ptr(), table.const_data_ptr(), vq.const_data_ptr(),
                              L, B, Q, D, table.stride(0), table.stride(1), vq.stride(0), vq.stride(1)});
}

at::Tensor& adapter_add_out_cpu(const at::Tensor& adapter, const at::Tensor& visual_query, at::Tensor& out) {
  const auto sizes = check_adapter_add(adapter, visual_query);
  check_out("adapter_add", out, sizes, visual_query, {{"adapter", &adapter}, {"visual_query", &visual_query}});
  adapter_add_kernel(adapter, visual_query, out);
  return out;
}

at::Tensor adapter_add_cpu(const at::Tensor& adapter, const at::Tensor& visual_query) {
  const auto sizes = check_adapter_add(adapter, visual_query);
  at::Tensor out = at::empty(sizes, visual_query.options());
  adapter_add_kernel(adapter, visual_query, out);
  return out;
}

// ---- adapter_attention -------------------------------------------------------------------------

void adapter_attention_kernel(const at::Tensor& xq_in, const at::Tensor& k_t_in, const at::Tensor& v_in,
                              const at::Tensor& gate, const std::optional<at::Tensor>& new_gate, at::Tensor& out) {
  const at::Tensor xq = rows_contiguous_or_copy(xq_in);
  const at::Tensor k_t = rows_contiguous_or_copy(k_t_in);
  const at::Tensor v = rows_contiguous_or_copy(v_in);
  const bool has_new_gate = new_gate.has_value() && new_gate->defined();
  cpu::kernels().adapter_attention({
      out.scalar_type(), out.data_ptr(), xq.const_data_ptr(), k_t.const_data_ptr(), v.const_data_ptr(),
      gate.const_data_ptr(), has_new_gate ? new_gate->const_data_ptr() : nullptr,
      xq.size(0), xq.size(1), xq.size(2), xq.size(3), v.size(2),
      xq.stride(0), xq.stride(1), xq.stride(2),
      k_t.stride(0), k_t.stride(1), k_t.stride(2),
      v.stride(0), v.stride(1), v.stride(2),
      gate.stride(1)});
}

at::Tensor adapter_attention_cpu(const at::Tensor& xq, const at::Tensor& k_t, const at::Tensor& v,
                                 const at::Tensor& gate, const std::optional<at::Tensor>& new_gate) {
  const auto sizes = check_adapter_attention(xq, k_t, v, gate, new_gate);
  at::Tensor out = at::empty(sizes, xq.options());
  adapter_attention_kernel(xq, k_t, v, gate, new_gate, out);
  return out;
}

// ---- the .out overloads under autograd ------------------------------------------------------------
//
// They have no derivative (docs/kernels.md): rather than return a result silently cut from the
// graph, refuse inputs that require grad while grad mode is on, as torch's own out= functions do.
// Otherwise pass through to the CPU/CUDA kernel and bump out's version (in-place write).

void refuse_grad(const char* op, std::initializer_list<NamedTensor> named) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [name, t] : named) {
    TORCH_CHECK(!t->requires_grad(), "surgery::", op, ".out: ", name,
                " requires grad, but the out= overload does not support automatic differentiation; call "
                "surgery::", op, " (without out=) to differentiate through it, or run under torch.no_grad()");
  }
}

template <typename Op>  // Op::name, Op::first, Op::second: the op's and its inputs' names
at::Tensor& out_autograd(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow((std::string("surgery::") + Op::name).c_str(), "out")
                             .template typed<at::Tensor&(const at::Tensor&, const at::Tensor&, at::Tensor&)>();
  refuse_grad(Op::name, {{Op::first, &a}, {Op::second, &b}, {"out", &out}});
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(a, b, out);
  }
  out.unsafeGetTensorImpl()->bump_version();
  return out;
}

struct QueryConcatOut {
  static constexpr const char* name = "query_concat";
  static constexpr const char* first = "queries";
  static constexpr const char* second = "feats";
};

struct AdapterAddOut {
  static constexpr const char* name = "adapter_add";
  static constexpr const char* first = "adapter";
  static constexpr const char* second = "visual_query";
};

}  // namespace

// The schemas, once for every backend (docs/kernels.md). Fake (meta) implementations and
// autograd are registered from Python by surgery/ops/registration.py, which surgery.ops imports
// when it loads the extension; set_python_module makes torch's error name that module when an op
// needs a fake implementation and only surgery._C was imported.
TORCH_LIBRARY(surgery, m) {
  m.set_python_module("surgery.ops.registration");
  m.def("query_concat(Tensor queries, Tensor feats) -> Tensor");
  m.def("query_concat.out(Tensor queries, Tensor feats, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("adapter_add(Tensor adapter, Tensor visual_query) -> Tensor");
  m.def("adapter_add.out(Tensor adapter, Tensor visual_query, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("adapter_attention(Tensor xq, Tensor k_t, Tensor v, Tensor gate, Tensor? new_gate) -> Tensor");
}

TORCH_LIBRARY_IMPL(surgery, CPU, m) {
  m.impl("query_concat", &query_concat_cpu);
  m.impl("query_concat.out", &query_concat_out_cpu);
  m.impl("adapter_add", &adapter_add_cpu);
  m.impl("adapter_add.out", &adapter_add_out_cpu);
  m.impl("adapter_attention", &adapter_attention_cpu);
}

// For every backend: the functional ops' autograd is registered from Python (registration.py).
TORCH_LIBRARY_IMPL(surgery, Autograd, m) {
  m.impl("query_concat.out", &out_autograd<QueryConcatOut>);
  m.impl("adapter_add.out", &out_autograd<AdapterAddOut>);
}

}  // namespace surgery
