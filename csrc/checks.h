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

// Messages are put together as one std::string (std::to_string), which TORCH_CHECK passes on as
// it is, never through an ostream: on a lent H100 image (g++ from /opt/gcc, a private libstdc++
// copy in _C.so), formatting an integer through TORCH_CHECK's ostringstream killed the process.

inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string dims(at::IntArrayRef sizes) {  // "[2, 3, 4]", as at::IntArrayRef prints
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + num(sizes[i]);
  return s + "]";
}

inline std::string device_str(const at::Tensor& t) { return t.device().str(); }

inline std::string dtype_of(const at::Tensor& t) { return surgery::dtype_name(t.scalar_type()); }

inline std::string head(const char* op) { return std::string("surgery::") + op + ": "; }

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK(t.defined(), head(op) + name + " is undefined; expected a tensor " + layout);
  TORCH_CHECK(t.dim() == rank, head(op) + name + " has shape " + dims(t.sizes()) + " (" + num(t.dim()) +
                                   " dimensions); expected " + layout + " (" + num(rank) + " dimensions)");
}

// One supported dtype, one device, dense, nothing empty; the first is the reference.
inline void check_same(const char* op, std::initializer_list<surgery::NamedTensor> named) {
  const auto& [first_name, first] = *named.begin();
  TORCH_CHECK(surgery::is_supported_dtype(first->scalar_type()),
              head(op) + first_name + " is " + dtype_of(*first) + "; allowed dtypes: " + surgery::kAllowedDtypes);
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->scalar_type() == first->scalar_type(),
                head(op) + name + " is " + dtype_of(*t) + " but " + first_name + " is " + dtype_of(*first) +
                    "; all inputs must share one dtype (" + surgery::kAllowedDtypes + ")");
    TORCH_CHECK(t->device() == first->device(), head(op) + name + " is on " + device_str(*t) + " but " + first_name +
                                                     " is on " + device_str(*first) + "; all inputs must be on one device");
    TORCH_CHECK(t->layout() == at::kStrided,
                head(op) + name + " is not a dense (strided) tensor; only dense (strided) tensors are supported");
  }
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->numel() > 0,
                head(op) + name + " is empty (shape " + dims(t->sizes()) + "); every dimension must be >= 1");
  }
}

inline std::vector<int64_t> check_query_concat(const at::Tensor& queries, const at::Tensor& feats) {
  const char* op = "query_concat";
  check_rank(op, "queries", queries, 2, "(Q, C)");
  check_rank(op, "feats", feats, 3, "(B, N, C)");
  check_same(op, {{"queries", &queries}, {"feats", &feats}});
  TORCH_CHECK(queries.size(1) == feats.size(2), head(op) + "queries have C=" + num(queries.size(1)) +
                                                    " channels but feats have C=" + num(feats.size(2)) +
                                                    "; they must agree");
  return {feats.size(0), queries.size(0) + feats.size(1), feats.size(2)};
}

inline std::vector<int64_t> check_adapter_add(const at::Tensor& adapter, const at::Tensor& vq) {
  const char* op = "adapter_add";
  TORCH_CHECK(adapter.defined() && (adapter.dim() == 2 || adapter.dim() == 3),
              head(op) + "adapter has shape " + (adapter.defined() ? dims(adapter.sizes()) : "[]") + " (" +
                  num(adapter.defined() ? adapter.dim() : 0) + " dimensions); expected (L, Q, D) or (L*Q, D)");
  check_rank(op, "visual_query", vq, 3, "(B, Q, D)");
  check_same(op, {{"adapter", &adapter}, {"visual_query", &vq}});
  const int64_t B = vq.size(0), Q = vq.size(1), D = vq.size(2);
  TORCH_CHECK(adapter.size(-1) == D, head(op) + "adapter has D=" + num(adapter.size(-1)) +
                                         " but visual_query has D=" + num(D) + "; they must agree");
  if (adapter.dim() == 3) {
    TORCH_CHECK(adapter.size(1) == Q, head(op) + "adapter has Q=" + num(adapter.size(1)) +
                                          " tokens per layer but visual_query has Q=" + num(Q) + "; they must agree");
  } else {
    TORCH_CHECK(adapter.size(0) % Q == 0, head(op) + "a flat adapter needs L*Q rows; " + num(adapter.size(0)) +
                                              " rows is not a multiple of visual_query's Q=" + num(Q));
  }
  const int64_t L = adapter.dim() == 3 ? adapter.size(0) : adapter.size(0) / Q;
  return {L, B, Q, D};
}

inline std::vector<int64_t> check_adapter_attention(const at::Tensor& xq, const at::Tensor& k_t, const at::Tensor& v,
                                             const at::Tensor& gate, const std::optional<at::Tensor>& new_gate) {
  const char* op = "adapter_attention";
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
  TORCH_CHECK(k_ok && v_ok, head(op) + "with xq " + dims(xq.sizes()) +
                                " (B, H, T, hd), k_t must be (B, H, hd, Q) and v (B, H, Q, hd) for one Q; got k_t " +
                                dims(k_t.sizes()) + ", v " + dims(v.sizes()));
  TORCH_CHECK(gate.size(0) == 1 && gate.size(1) == H && gate.size(2) == 1 && gate.size(3) == 1,
              head(op) + "gate must be (1, " + num(H) + ", 1, 1), one value per head; got " + dims(gate.sizes()));
  if (has_new_gate) {
    TORCH_CHECK(new_gate->numel() == 1, head(op) + "new_gate must be (1, 1, 1, 1); got " + dims(new_gate->sizes()));
  }
  return {B, H, T, hd};
}

// out=: the output's shape, dtype and device, contiguous, sharing no memory with an input.
inline void check_out(const char* op, const at::Tensor& out, at::IntArrayRef sizes, const at::Tensor& like,
               std::initializer_list<surgery::NamedTensor> inputs) {
  TORCH_CHECK(out.defined(), head(op) + "out is undefined; expected a tensor of shape " + dims(sizes));
  TORCH_CHECK(out.sizes() == sizes && out.scalar_type() == like.scalar_type() && out.device() == like.device() &&
                  out.layout() == at::kStrided,
              head(op) + "out is " + dims(out.sizes()) + " " + dtype_of(out) + " on " + device_str(out) + "; expected " +
                  dims(sizes) + " " + dtype_of(like) + " on " + device_str(like));
  TORCH_CHECK(out.is_contiguous(), head(op) + "out must be contiguous (it is written row by row); got strides " +
                                       dims(out.strides()));
  for (const auto& [name, input] : inputs) {
    TORCH_CHECK(!surgery::may_share_memory(out, *input),
                head(op) + "out shares memory with " + name +
                    "; the kernels read the inputs while writing out, so out must not overlap an input");
  }
}

// Whether the last dimension can be read as contiguous rows (stride 1, or a single element).
inline bool rows_contiguous(const at::Tensor& t) {
  return t.size(-1) == 1 || t.stride(-1) == 1;
}

}  // namespace surgery
