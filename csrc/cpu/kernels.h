// CPU kernels of adapter_add and adapter_attention, compiled once per instruction set and chosen
// at run time (like ATen's DispatchStub): kernels_default.cpp (baseline, any CPU),
// kernels_avx2.cpp (x86-64 AVX2 + FMA + F16C, taken when ATen's CPU capability is AVX2 or
// AVX512) and kernels_avx512.cpp (AVX-512 F/BW/VL/DQ + AVX512-BF16, taken when ATen's capability
// is AVX512 and the CPU has them). ATEN_CPU_CAPABILITY=default / avx2 forces a lower variant. The interface is plain pointers and
// strides so that the ISA-specific files include no more of ATen than at::vec and
// at::parallel_for (see setup.py on link order). Inputs are checked by the caller (csrc/ops.cpp):
// one dtype, innermost dimensions contiguous, output contiguous.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace surgery::cpu {

// out (L, B, Q, D)[l, b, q, :] = table[l, q, :] + vq[b, q, :]; strides in elements
struct AdapterAddArgs {
  c10::ScalarType dtype;
  void* out;
  const void* table;
  const void* vq;
  int64_t L, B, Q, D;
  int64_t table_l, table_q;  // table strides of l and q (d is contiguous)
  int64_t vq_b, vq_q;        // visual_query strides of b and q (d is contiguous)
};

// out (B, H, T, hd) = new_gate * gate[h] * softmax(xq k_t / sqrt(hd)) v, fp32 inside
struct AdapterAttentionArgs {
  c10::ScalarType dtype;
  void* out;
  const void* xq;
  const void* k_t;
  const void* v;
  const void* gate;
  const void* new_gate;  // nullptr: none
  int64_t B, H, T, hd, Q;
  int64_t xq_b, xq_h, xq_t;  // strides (the innermost, hd, is contiguous)
  int64_t k_b, k_h, k_d;     // k_t (B, H, hd, Q): q is contiguous
  int64_t v_b, v_h, v_q;     // v (B, H, Q, hd): d is contiguous
  int64_t gate_h;
};

struct Kernels {
  const char* isa;
  void (*adapter_add)(const AdapterAddArgs&);
  void (*adapter_attention)(const AdapterAttentionArgs&);
};

namespace DEFAULT {
const Kernels& kernels();
}
namespace AVX2 {
const Kernels& kernels();  // only when SURGERY_CPU_AVX2 is defined (x86-64, GCC or clang)
}
namespace AVX512_BF16 {
const Kernels& kernels();  // likewise
}

// The variant for this CPU (the first call decides): AVX512_BF16, AVX2 or DEFAULT.
const Kernels& kernels();

}  // namespace surgery::cpu

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SURGERY_CPU_AVX2 1
#endif
