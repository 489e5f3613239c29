// The CPU kernels for x86-64 CPUs with AVX2, FMA and F16C (ATen's AVX2 Vectorized<T>), chosen at
// run time by kernels() in csrc/ops.cpp. The target is set by a pragma, not a command-line flag,
// so that only this file's own code uses these instructions: everything that is not vector code
// (c10, at::parallel_for, the standard library) is included before the pragma and stays baseline,
// and setup.py links this object last, so the linker keeps the baseline copy of any inline
// function both files emit.
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
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

// The pragma does not define the ISA macros in C++; the headers below test them (sleef.h declares
// its AVX2 functions under __AVX__), so define them for the rest of this file.
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

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // SURGERY_CPU_AVX2
