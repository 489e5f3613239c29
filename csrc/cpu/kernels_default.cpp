// The CPU kernels for any CPU (baseline instruction set; NEON on aarch64). See kernels_impl.h.
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"
