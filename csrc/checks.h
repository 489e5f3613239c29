// Input checks and dtype dispatch shared by every compiled backend of the fused ops
// (csrc/ops.cpp for CPU, csrc/cuda/ops.cu for CUDA). Device-agnostic: shapes, dtypes, devices
// only, no kernel code, so nvcc and the host compiler both take it.
//
// Every check fails with TORCH_CHECK (a RuntimeError in Python) whose message starts with
// "surgery::<op>: ", names the argument, says what was wrong and what is allowed; the wording
// follows surgery/ops/checks.py, which checks the same rules once before dispatch.
//
//   auto sizes = surgery::check_query_concat(queries, feats);      // -> {B, Q+N, C}
//   surgery::check_out("query_concat", out, sizes, feats, {{"queries", &queries}, {"feats", &feats}});
//   SURGERY_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "query_concat", [&] { ... scalar_t ... });
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

// The dtypes every op accepts: float32, bfloat16, float16 (scalar_t = float, at::BFloat16, at::Half).
#define SURGERY_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(                                                 \
      TYPE, NAME,                                                     \
      AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)            \
      AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)         \
      AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

namespace surgery {

inline constexpr const char* kAllowedDtypes = "float32, bfloat16 or float16";

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::BFloat16 || t == at::ScalarType::Half;
}

// torch's Python spelling of a dtype (float32, not Float), for messages Python users read.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::ScalarType::Float: return "float32";
    case at::ScalarType::Double: return "float64";
    case at::ScalarType::Half: return "float16";
    case at::ScalarType::BFloat16: return "bfloat16";
    case at::ScalarType::Long: return "int64";
    case at::ScalarType::Int: return "int32";
    case at::ScalarType::Short: return "int16";
    case at::ScalarType::Char: return "int8";
    case at::ScalarType::Byte: return "uint8";
    case at::ScalarType::Bool: return "bool";
    case at::ScalarType::ComplexFloat: return "complex64";
    case at::ScalarType::ComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Rank, as the op's layout names it ("(B, N, C)").
inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK(t.defined(), "surgery::", op, ": ", name, " is undefined; expected a tensor ", layout);
  TORCH_CHECK(t.dim() == rank, "surgery::", op, ": ", name, " has shape ", t.sizes(), " (", t.dim(),
              " dimensions); expected ", layout, " (", rank, " dimensions)");
}

// One dtype (a supported one), one device, strided layout, nothing empty; the first tensor is the
// one the others are compared with.
inline void check_same(const char* op, std::initializer_list<NamedTensor> named) {
  const auto& [first_name, first] = *named.begin();
  TORCH_CHECK(is_supported_dtype(first->scalar_type()), "surgery::", op, ": ", first_name, " is ",
              dtype_name(first->scalar_type()), "; allowed dtypes: ", kAllowedDtypes);
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->scalar_type() == first->scalar_type(), "surgery::", op, ": ", name, " is ",
                dtype_name(t->scalar_type()), " but ", first_name, " is ", dtype_name(first->scalar_type()),
                "; all inputs must share one dtype (", kAllowedDtypes, ")");
    TORCH_CHECK(t->device() == first->device(), "surgery::", op, ": ", name, " is on ", t->device(), " but ",
                first_name, " is on ", first->device(), "; all inputs must be on one device");
    TORCH_CHECK(t->layout() == at::kStrided, "surgery::", op, ": ", name, " has layout ", t->layout(),
                "; only dense (strided) tensors are supported");
  }
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->numel() > 0, "surgery::", op, ": ", name, " is empty (shape ", t->sizes(),
                "); every dimension must be >= 1");
  }
}

// query_concat(queries (Q, C), feats (B, N, C)) -> {B, Q+N, C}
inline std::vector<int64_t> check_query_concat(const at::Tensor& queries, const at::Tensor& feats) {
  constexpr const char* op = "query_concat";
  check_rank(op, "queries", queries, 2, "(Q, C)");
  check_rank(op, "feats", feats, 3, "(B, N, C)");
  check_same(op, {{"queries", &queries}, {"feats", &feats}});
  TORCH_CHECK(queries.size(1) == feats.size(2), "surgery::", op, ": queries have C=", queries.size(1),
              " channels but feats have C=", feats.size(2), "; they must agree");
  return {feats.size(0), queries.size(0) + feats.size(1), feats.size(2)};
}

// adapter_add(adapter (L, Q, D) or (L*Q, D), visual_query (B, Q, D)) -> {L, B, Q, D}
inline std::vector<int64_t> check_adapter_add(const at::Tensor& adapter, const at::Tensor& visual_query) {
  constexpr const char* op = "adapter_add";
  TORCH_CHECK(adapter.defined() && (adapter.dim() == 2 || adapter.dim() == 3), "surgery::", op,
              ": adapter has shape ", adapter.sizes(), " (", adapter.dim(),
              " dimensions); expected (L, Q, D) or (L*Q, D)");
  check_rank(op, "visual_query", visual_query, 3, "(B, Q, D)");
  check_same(op, {{"adapter", &adapter}, {"visual_query", &visual_query}});
  const int64_t B = visual_query.size(0), Q = visual_query.size(1), D = visual_query.size(2);
  TORCH_CHECK(adapter.size(-1) == D, "surgery::", op, ": adapter has D=", adapter.size(-1),
              " but visual_query has D=", D, "; they must agree");
  if (adapter.dim() == 3) {
    TORCH_CHECK(adapter.size(1) == Q, "surgery::", op, ": adapter has Q=", adapter.size(1),
                " tokens per layer but visual_query has Q=", Q, "; they must agree");
  } else {
    TORCH_CHECK(adapter.size(0) % Q == 0, "surgery::", op, ": a flat adapter needs L*Q rows; ",
                adapter.size(0), " rows is not a multiple of visual_query's Q=", Q);
  }
  const int64_t L = adapter.dim() == 3 ? adapter.size(0) : adapter.size(0) / Q;
  return {L, B, Q, D};
}

// adapter_attention(xq (B, H, T, hd), k_t (B, H, hd, Q), v (B, H, Q, hd), gate (1, H, 1, 1),
//                   new_gate (1, 1, 1, 1) or None) -> {B, H, T, hd}
inline std::vector<int64_t> check_adapter_attention(const at::Tensor& xq, const at::Tensor& k_t, const at::Tensor& v,
                                                    const at::Tensor& gate,
                                                    const std::optional<at::Tensor>& new_gate) {
  constexpr const char* op = "adapter_attention";
  check_rank(op, "xq", xq, 4, "(B, H, T, hd)");
  check_rank(op, "k_t", k_t, 4, "(B, H, hd, Q)");
  check_rank(op, "v", v, 4, "(B, H, Q, hd)");
  check_rank(op, "gate", gate, 4, "(1, H, 1, 1)");
  const bool has_new_gate = new_gate.has_value() && new_gate->defined();
  if (has_new_gate) {
    check_rank(op, "new_gate", *new_gate, 4, "(1, 1, 1, 1)");
    check_same(op, {{"xq", &xq}, {"k_t", &k_t}, {"v", &v}, {"gate", &gate}, {"new_gate", &*new_gate}});
  } else {
    check_same(op, {{"xq", &xq}, {"k_t", &k_t}, {"v", &v}, {"gate", &gate}});
  }
  const int64_t B = xq.size(0), H = xq.size(1), T = xq.size(2), hd = xq.size(3), Q = v.size(2);
  const bool k_ok = k_t.size(0) == B && k_t.size(1) == H && k_t.size(2) == hd && k_t.size(3) == Q;
  const bool v_ok = v.size(0) == B && v.size(1) == H && v.size(3) == hd;
  TORCH_CHECK(k_ok && v_ok, "surgery::", op, ": with xq ", xq.sizes(),
              " (B, H, T, hd), k_t must be (B, H, hd, Q) and v (B, H, Q, hd) for one Q; got k_t ", k_t.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(gate.size(0) == 1 && gate.size(1) == H && gate.size(2) == 1 && gate.size(3) == 1, "surgery::", op,
              ": gate must be (1, ", H, ", 1, 1), one value per head; got ", gate.sizes());
  if (has_new_gate) {
    TORCH_CHECK(new_gate->numel() == 1, "surgery::", op, ": new_gate must be (1, 1, 1, 1); got ",
                new_gate->sizes());
  }
  return {B, H, T, hd};
}

// Whether two strided tensors' byte ranges intersect within one storage (conservative: two
// interleaved, disjoint views count as sharing).
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.has_storage() || !b.has_storage() || !a.storage().is_alias_of(b.storage())) return false;
  auto range = [](const at::Tensor& t) {
    const auto* start = static_cast<const char*>(t.const_data_ptr());
    int64_t lo = 0, hi = 0;  // element offsets of the lowest and highest element reached
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t reach = (t.size(d) - 1) * t.stride(d);
      (reach < 0 ? lo : hi) += reach;
    }
    const int64_t item = static_cast<int64_t>(t.element_size());
    return std::make_pair(start + lo * item, start + (hi + 1) * item);
  };
  const auto [a_begin, a_end] = range(a);
  const auto [b_begin, b_end] = range(b);
  return a_begin < b_end && b_begin < a_end;
}

// `out=`: the output's shape, dtype and device, contiguous, sharing no memory with an input.
inline void check_out(const char* op, const at::Tensor& out, at::IntArrayRef sizes, const at::Tensor& like,
                      std::initializer_list<NamedTensor> inputs) {
  TORCH_CHECK(out.defined(), "surgery::", op, ": out is undefined; expected a tensor of shape ", sizes);
  TORCH_CHECK(out.sizes() == sizes && out.scalar_type() == like.scalar_type() && out.device() == like.device() &&
                  out.layout() == at::kStrided,
              "surgery::", op, ": out is ", out.sizes(), " ", dtype_name(out.scalar_type()), " on ", out.device(),
              "; expected ", sizes, " ", dtype_name(like.scalar_type()), " on ", like.device());
  TORCH_CHECK(out.is_contiguous(), "surgery::", op, ": out must be contiguous (it is written row by row); got strides ",
              out.strides());
  for (const auto& [name, input] : inputs) {
    TORCH_CHECK(!may_share_memory(out, *input), "surgery::", op, ": out shares memory with ", name,
                "; the kernels read the inputs while writing out, so out must not overlap an input");
  }
}

// Whether the last dimension can be read as contiguous rows (stride 1, or a single element).
inline bool rows_contiguous(const at::Tensor& t) {
  return t.size(-1) == 1 || t.stride(-1) == 1;
}

}  // namespace surgery
