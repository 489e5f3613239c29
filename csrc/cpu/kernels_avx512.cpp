// The CPU kernels for x86-64 CPUs with AVX-512 (F, BW, VL, DQ) and AVX512-BF16 (ATen's AVX512
// Vectorized<T>, 16 floats wide; the bf16 add rounds with vcvtne2ps2bf16, see add_row.h), chosen
// at run time by kernels() in csrc/ops.cpp on CPUs that have all of these (Zen 4 and later,
// Cooper Lake, Sapphire Rapids and later); other AVX-512 CPUs take the AVX2 kernels. Built the
// same way as kernels_avx2.cpp (see there): a target pragma after the baseline includes, and
// linked after the baseline object.
#include "kernels.h"

#if defined(SURGERY_CPU_AVX2)

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <array>
#include <cstring>
#include <functional>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif

// The pragma does not define the ISA macros in C++; the headers below test them (sleef.h declares
// its AVX-512 functions under __AVX512F__), so define them for the rest of this file.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512BF16__
#define __AVX512BF16__ 1
#endif

#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // SURGERY_CPU_AVX2
