"""Packaging for token-surgery (import `surgery`, CLI `surgery`).

The built-in backbone plugins live in the repository's `plugins/` folder and are installed as the
`surgery_plugins` package; they are found through the `surgery.backbones` entry points exactly as
a third-party plugin is.

The fused ops' kernels are the extension `surgery._C` (docs/kernels.md): `csrc/*.cpp` always,
plus `csrc/cuda/*.cu` when a CUDA toolkit is found. It is built against the installed torch, so
build without isolation:

    pip install torch setuptools wheel ninja && pip install --no-build-isolation -e ".[dev]"

Environment:
    SURGERY_NO_EXTENSION=1   pure-Python install (no compiler, no torch needed to build; the ops
                             then run their eager reference)
    FORCE_CUDA=1 / 0         compile the CUDA sources, failing if no toolkit is found / never
    CUDA_HOME (or CUDA_PATH) the toolkit; else found from `nvcc` on PATH (through symlinks and
                             `exec` wrapper scripts), else /usr/local/cuda
    TORCH_CUDA_ARCH_LIST     CUDA archs, e.g. "8.0;9.0"; unset: the visible GPUs', or 9.0+PTX
                             when none is visible
    MAX_JOBS                 parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "9.0+PTX"  # Hopper, plus PTX that newer GPUs compile at load time


def log(message: str) -> None:
    print(f"token-surgery build: {message}", flush=True)


# -- finding the CUDA toolkit -----------------------------------------------------------------------


def _is_toolkit(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime.h"))


def _exec_target(path: str) -> str | None:
    """The program a shell wrapper script runs (`exec [env VAR=x] /path/to/nvcc "$@"`), if any."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for line in head.decode("utf-8", "replace").splitlines():
        match = re.match(r"\s*exec\s+(.+)$", line)
        if not match:
            continue
        try:
            words = shlex.split(match.group(1), comments=True)
        except ValueError:
            continue
        words = [w for w in words if w != "env" and not w.startswith("-") and not re.match(r"^\w+=", w)]
        if not words:
            continue
        target = os.path.expandvars(os.path.expanduser(words[0]))
        if not os.path.isabs(target):
            target = shutil.which(target) or os.path.join(os.path.dirname(path), target)
        return target
    return None


def _toolkit_of_nvcc(nvcc: str) -> str | None:
    """The toolkit folder of an nvcc found on PATH: follow symlinks and wrapper scripts to the real
    compiler (two levels under its toolkit), else ask nvcc itself where it runs from."""
    path, seen = nvcc, set()
    while path and path not in seen and len(seen) < 8:
        seen.add(path)
        real = os.path.realpath(path)
        home = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(home):
            return home
        path = _exec_target(real)
    try:  # any other kind of wrapper: the driver prints its own location in a dry run
        done = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                              timeout=120)
        match = re.search(r"^#\$ TOP=(.+)$", done.stdout + done.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        match = None
    home = os.path.normpath(match.group(1).strip()) if match else None
    return home if _is_toolkit(home) else None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit folder or None, how it was found or why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit(value):
                return value, f"${var}"
            log(f"warning: ${var}={value} has no bin/nvcc and include/cuda_runtime.h; looking elsewhere")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(nvcc)
        if home:
            return home, f"nvcc on PATH ({nvcc})"
        log(f"warning: nvcc on PATH ({nvcc}) does not lead to a toolkit folder with include/cuda_runtime.h")
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no CUDA toolkit: CUDA_HOME unset, no nvcc on PATH, no /usr/local/cuda"


def nvcc_version(home: str) -> str | None:
    try:
        text = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                              timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else None


# -- the extension ----------------------------------------------------------------------------------


def extension_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for surgery._C, or nothing when SURGERY_NO_EXTENSION=1."""
    if os.environ.get("SURGERY_NO_EXTENSION", "") not in ("", "0"):
        log("SURGERY_NO_EXTENSION is set: pure-Python install, the fused ops will run their eager reference")
        return [], {}
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            f"token-surgery build: torch is needed to build the C++ extension and cannot be imported ({exc}).\n"
            "pip's build isolation hides the installed torch; install with:\n"
            '    pip install torch setuptools wheel ninja && pip install --no-build-isolation -e ".[dev]"\n'
            "or set SURGERY_NO_EXTENSION=1 for a pure-Python install.") from None

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    force = os.environ.get("FORCE_CUDA", "")
    home, how = find_cuda_home()
    if not cu_sources:
        use_cuda, why = False, "no CUDA sources (csrc/cuda/*.cu)"
    elif force == "0":
        use_cuda, why = False, "FORCE_CUDA=0"
    elif torch.version.cuda is None:
        use_cuda, why = False, f"torch {torch.__version__} is not a CUDA build"
    elif home is None:
        use_cuda, why = False, how
    else:
        use_cuda, why = True, f"CUDA toolkit {home} (found from {how})"
    if force == "1" and not use_cuda and cu_sources:
        raise SystemExit(f"token-surgery build: FORCE_CUDA=1 but the CUDA sources cannot be compiled: {why}")

    cuda_version = archs = None
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when imported (its own guess, nvcc's parent's
        # parent, is wrong for a wrapper script on PATH)
        os.environ["CUDA_HOME"] = home
        cuda_version = nvcc_version(home)
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not archs:
            if torch.cuda.is_available():
                # torch picks them (as below, clamped to what it supports), PTX for the newest
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                archs = ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
                log(f"TORCH_CUDA_ARCH_LIST is not set: building for the visible GPUs ({archs})")
            else:
                archs = os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
                log(f"TORCH_CUDA_ARCH_LIST is not set and no GPU is visible: building for {archs} "
                    "(set TORCH_CUDA_ARCH_LIST to choose, e.g. \"8.0;8.6;9.0\")")
        log(f"CUDA kernels: yes, nvcc {cuda_version} from {why}; archs {archs}")
    else:
        log(f"CUDA kernels: no ({why}); building the CPU kernels only")

    from torch.utils import cpp_extension

    if use_cuda:
        cpp_extension.CUDA_HOME = home  # in case it was imported before CUDA_HOME was set

    linux = sys.platform.startswith("linux")
    if linux:  # OpenMP: at::parallel_for is inline code that runs serially without it
        cxx_flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi"]
    else:
        cxx_flags = ["/O2", "/openmp"] if sys.platform == "win32" else ["-O3"]
    link_flags = ["-fopenmp"] if linux else []
    common = dict(
        include_dirs=[os.path.join(HERE, "csrc")],  # "checks.h" for csrc/*.cpp and csrc/cuda/*.cu alike
        extra_link_args=link_flags,
    )
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "surgery._C", cpp_sources + cu_sources, define_macros=[("SURGERY_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}, **common)
    else:
        ext = cpp_extension.CppExtension("surgery._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common)

    info = {
        "SURGERY_BUILD_TORCH": torch.__version__,
        "SURGERY_BUILD_CUDA": cuda_version if use_cuda else None,
        "SURGERY_BUILD_CUDA_HOME": home if use_cuda else None,
        "SURGERY_BUILD_CUDA_ARCHS": archs if use_cuda else None,
        "SURGERY_BUILD_CUDA_SOURCES": int(use_cuda),
        "SURGERY_BUILD_CXX_FLAGS": " ".join(cxx_flags),
    }

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder (ninja; MAX_JOBS caps the jobs), plus a generated header with the build
        info that surgery._C.build_info() returns."""

        def build_extensions(self) -> None:
            folder = os.path.join(os.path.abspath(self.build_temp), "surgery_generated")
            os.makedirs(folder, exist_ok=True)
            lines = ["// generated by setup.py: how surgery._C was built", "#pragma once"]
            for name, value in info.items():
                if value is None:
                    continue
                lines.append(f"#define {name} {value if isinstance(value, int) else json.dumps(str(value))}")
            text = "\n".join(lines) + "\n"
            header = os.path.join(folder, "surgery_build_info.h")
            if not os.path.exists(header) or open(header, encoding="utf-8").read() != text:
                with open(header, "w", encoding="utf-8") as f:  # rewritten only on change: no needless rebuilds
                    f.write(text)
            for extension in self.extensions:
                extension.include_dirs.append(folder)
            # The per-instruction-set CPU kernels (csrc/cpu/kernels_avx2.cpp) are linked last: the linker
            # keeps the first copy of an inline function several objects emit, which must be the
            # baseline one (setuptools sorts the sources, so the order is set here).
            link = self.compiler.link_shared_object

            def link_baseline_first(objects, *args, **kwargs):
                return link(sorted(objects, key=lambda o: "_avx" in os.path.basename(o)), *args, **kwargs)

            self.compiler.link_shared_object = link_baseline_first
            jobs = os.environ.get("MAX_JOBS")
            log(f"compiling {', '.join(ext.sources)} ({'MAX_JOBS=' + jobs if jobs else 'ninja default jobs'})")
            start = time.perf_counter()
            super().build_extensions()
            log(f"surgery._C compiled in {time.perf_counter() - start:.0f} s")

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()

setup(
    name="token-surgery",
    version="0.1.0",
    description="Change how many learned tokens a trained model uses, at runtime, without getting it wrong.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["surgery", "surgery.*"])
    + ["surgery_plugins"] + [f"surgery_plugins.{p}" for p in find_packages("plugins")],
    package_dir={"surgery_plugins": "plugins"},
    # the LLaMA tokenizer the tiny and bench models decode with, and the corpus it is trained on
    package_data={"surgery_plugins.llama_adapter": ["data/tokenizer.model", "data/corpus.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "timm>=1.0.9",
        "pluggy>=1.3",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "numpy",
        "regex",  # the ImageBind (CLIP BPE) tokenizer: unicode classes (\p{L}) the re module lacks
    ],
    extras_require={
        # ray and scikit-learn: CI runs the quick sweep (scikit-learn's digits) on a local two-worker Ray
        "dev": ["pytest>=8", "hypothesis>=6", "ray[default]>=2.9", "scikit-learn", "transformers>=4.40", "peft>=0.10",
                "matplotlib", "tqdm", "ruff>=0.5"],
        "plot": ["matplotlib", "tqdm"],  # benchmarks' and sweeps' PNG plots and progress bars (else skipped)
        "ray": ["ray[default]>=2.9"],  # surgery sweep --executor ray
        "knn": ["faiss-cpu"],  # ImageBind-LLM's optional kNN cache (a faiss index file the user gives)
        "transformers": ["transformers>=4.40", "peft>=0.10"],  # the transformers plugin (docs/transformers.md)
    },
    entry_points={
        "console_scripts": ["surgery = surgery.cli:main"],
        "surgery.backbones": [
            "timm_vit = surgery_plugins.timm_vit",
            "llama_adapter_v2 = surgery_plugins.llama_adapter.plugin",
            "imagebind = surgery_plugins.imagebind.plugin",
            "imagebind_llm = surgery_plugins.imagebind_llm.plugin",
            "transformers = surgery_plugins.transformers_hf.plugin",
        ],
        # command modules: the same name as the plugin's backbones entry (docs/plugins.md, "Adding commands")
        "surgery.commands": [
            "llama_adapter_v2 = surgery_plugins.llama_adapter.commands",
            "imagebind = surgery_plugins.imagebind.commands",
            "imagebind_llm = surgery_plugins.imagebind_llm.commands",
        ],
        "pytest11": ["surgery = surgery.testing"],
    },
)
