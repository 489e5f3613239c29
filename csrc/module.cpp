// The Python module `surgery._C`. Importing it runs the static registrations of ops.cpp (and of
// cuda/ops.cu when it was compiled): the ops are then torch.ops.surgery.*. Its one function,
// build_info(), says how this binary was built; setup.py writes the values into
// surgery_build_info.h in the build folder.
#include <Python.h>

#if __has_include("surgery_build_info.h")
#include "surgery_build_info.h"
#endif

#ifndef SURGERY_BUILD_TORCH
#define SURGERY_BUILD_TORCH "unknown"
#endif
#ifndef SURGERY_BUILD_CUDA
#define SURGERY_BUILD_CUDA nullptr  // None: built without CUDA
#endif
#ifndef SURGERY_BUILD_CUDA_HOME
#define SURGERY_BUILD_CUDA_HOME nullptr
#endif
#ifndef SURGERY_BUILD_CUDA_ARCHS
#define SURGERY_BUILD_CUDA_ARCHS nullptr
#endif
#ifndef SURGERY_BUILD_CUDA_SOURCES
#define SURGERY_BUILD_CUDA_SOURCES 0
#endif
#ifndef SURGERY_BUILD_CXX_FLAGS
#define SURGERY_BUILD_CXX_FLAGS ""
#endif

#if defined(__clang__)
#define SURGERY_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define SURGERY_COMPILER "gcc " __VERSION__
#elif defined(_MSC_VER)
#define SURGERY_COMPILER "msvc"
#else
#define SURGERY_COMPILER "unknown"
#endif

#ifdef _OPENMP
#define SURGERY_OPENMP 1
#else
#define SURGERY_OPENMP 0
#endif

namespace surgery {
const char* cpu_kernels_isa();  // csrc/ops.cpp
}

namespace {

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
  return Py_BuildValue("{s:s, s:z, s:z, s:z, s:N, s:s, s:s, s:N, s:s}",
                       "torch", SURGERY_BUILD_TORCH,
                       "cuda", SURGERY_BUILD_CUDA,
                       "cuda_home", SURGERY_BUILD_CUDA_HOME,
                       "cuda_archs", SURGERY_BUILD_CUDA_ARCHS,
                       "cuda_sources", PyBool_FromLong(SURGERY_BUILD_CUDA_SOURCES),
                       "compiler", SURGERY_COMPILER,
                       "cxx_flags", SURGERY_BUILD_CXX_FLAGS,
                       "openmp", PyBool_FromLong(SURGERY_OPENMP),
                       "cpu_isa", surgery::cpu_kernels_isa());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: torch and CUDA versions, CUDA archs, compiler and flags of this build, "
     "and the instruction set of the CPU kernels chosen for this CPU."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "token-surgery's compiled fused ops: importing this registers torch.ops.surgery.*.",
    -1,
    methods,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module_def);
}
