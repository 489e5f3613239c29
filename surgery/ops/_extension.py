"""The compiled extension `surgery._C`, loaded on first use and never required.

    extension()          -> the module, or None when it is not built or does not load
    extension_error()    -> why not (None when it loaded)
    build_info()         -> how it was built: torch, cuda, cuda_archs, compiler, ... ({} when not loaded)
    has_cuda_kernels()   -> whether every op has a CUDA kernel in it
    warn_fallback(dev)   -> one ExtensionWarning per device type when an op runs its eager fallback
    require_registration() -> the extension, with fake tensors and autograd registered, or raise

Nothing happens at import: importing `surgery` or `surgery.ops` neither loads the extension nor
initialises CUDA, and the reason a load failed is kept for `surgery backends` rather than printed.
Loading it registers the ops (torch.ops.surgery.*) and then their fake (meta) implementations and
autograd formulas (each op's own, from `registration.py`). SURGERY_NO_EXTENSION=1 at run time
leaves it unloaded, as if it had not been built (the ops then run their eager reference).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Optional

OPS = ("query_concat", "query_concat.out", "adapter_add", "adapter_add.out", "adapter_attention")
REBUILD = 'pip install --no-build-isolation -e . (needs torch, a C++ compiler and ninja; see setup.py)'


class ExtensionWarning(UserWarning):
    """A fused op runs its eager reference because the compiled kernels are not available."""


_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_cuda_kernels = False
_warned: set[str] = set()


def _load() -> None:
    global _loaded, _module, _error, _cuda_kernels
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        module, error = None, None
        if os.environ.get("SURGERY_NO_EXTENSION", "") not in ("", "0"):
            error = "disabled: SURGERY_NO_EXTENSION is set"
        else:
            try:
                import torch  # noqa: F401  (the extension links against libtorch: load it first)

                module = importlib.import_module("surgery._C")
            except ModuleNotFoundError as exc:
                if exc.name != "surgery._C":
                    error = f"import failed: {exc}"
                else:
                    error = (f"not built: this install has no surgery._C (SURGERY_NO_EXTENSION=1 at install time, "
                             f"or an install that skipped the build); rebuild with: {REBUILD}")
            except Exception as exc:  # ImportError (undefined symbol: built for another torch), OSError, ...
                error = f"import failed: {type(exc).__name__}: {exc}; rebuild with: {REBUILD}"
        if module is not None:
            import torch

            _cuda_kernels = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"surgery::{op}", "CUDA")
                                for op in OPS)
        _module, _error, _loaded = module, error, True
    if module is not None:
        # fake tensors and autograd (registration.py registers them when imported)
        importlib.import_module(".registration", __package__)


def extension() -> Optional[ModuleType]:
    """The loaded `surgery._C`, or None (the reason: `extension_error()`). Never warns."""
    _load()
    return _module


def extension_error() -> Optional[str]:
    """Why the extension is not loaded, or None when it is."""
    _load()
    return _error


def build_info() -> dict:
    """How the loaded extension was built (torch, cuda, cuda_home, cuda_archs, cuda_sources,
    compiler, cxx_flags, openmp), plus `cuda_kernels`; {} when it is not loaded."""
    module = extension()
    if module is None:
        return {}
    info = dict(module.build_info())
    info["cuda_kernels"] = has_cuda_kernels()
    return info


def has_cuda_kernels() -> bool:
    """Whether every op has a CUDA kernel registered (read from the dispatcher once, at load; does
    not touch CUDA). A plain flag, so that `torch.compile` traces the backend choice."""
    _load()
    return _cuda_kernels


def warn_fallback(device_type: str, reason: Optional[str] = None) -> None:
    """Warn, once per device type, that the ops run their eager reference there, and why."""
    if device_type in _warned:
        return
    _warned.add(device_type)
    why = reason or (f"the C++ extension is not loaded: {extension_error()}" if extension() is None
                     else f"no compiled kernel runs on {device_type} tensors here")
    warnings.warn(f"surgery.ops: the fused ops run their eager reference on {device_type} tensors ({why}); "
                  f"`surgery backends` shows what is available", ExtensionWarning, stacklevel=3)


def require_registration() -> ModuleType:
    """The extension, its ops registered with fake implementations and autograd; raises
    BackendUnavailableError (with the load error) when it is not available."""
    module = extension()
    if module is None:
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(f"the C++ extension surgery._C is not available: {_error}")
    from . import registration

    registration.register()
    return module


__all__ = ["ExtensionWarning", "build_info", "extension", "extension_error", "has_cuda_kernels",
           "require_registration", "warn_fallback"]
