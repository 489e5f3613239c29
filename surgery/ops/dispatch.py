"""Which backend runs a call of a fused op: what can run here, SURGERY_KERNEL, and the call itself.

`backend=` on a call, else the environment variable `SURGERY_KERNEL` (eager | cpp | cuda | triton |
auto), else `auto`. `auto` takes, for the tensors' device and dtype, the fastest one that can run:
C++ on CPU tensors, CUDA then Triton on GPU tensors, eager otherwise (the reason is in `backends()`
and a warning is given once). A backend asked for by name that cannot run raises
`BackendUnavailableError` saying why, never falls back.

The backends are reached through their torch ops: `torch.ops.surgery.<op>` (the compiled
extension, `_extension.py`) and `torch.ops.surgery.<op>_triton` (`triton_ops.py`), each loaded on
first use; the eager backend is the op's reference (plain torch).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import BackendUnavailableError
from . import _extension

BACKENDS = ("eager", "cpp", "cuda", "triton")
ENV = "SURGERY_KERNEL"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    built: bool  # compiled / importable at all
    devices: tuple[str, ...]  # device types it can run on here
    reason: str  # why it is not built or cannot run (empty when it can)

    def to_dict(self) -> dict:
        return asdict(self)


def triton_backend() -> ModuleType:
    """`triton_ops.py`, imported on first use (it imports triton and defines the kernels)."""
    from . import triton_ops

    return triton_ops


# -- which backends can run ----------------------------------------------------------------------


def can_run(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """Whether backend `name` can run ops on tensors of `device` (and `dtype`, if given) here, and
    if not, why."""
    if name == "eager":
        return True, ""
    if name in ("cpp", "cuda"):
        if _extension.extension() is None:
            return False, f"the C++ extension is not loaded: {_extension.extension_error()}"
        if name == "cpp":
            if device.type != "cpu":
                return False, f"the C++ kernels run on CPU tensors, not {device.type}"
            return True, ""
        if not _extension.has_cuda_kernels():
            return False, "the extension was built without CUDA kernels (no CUDA toolkit found at build time)"
        if device.type != "cuda":
            return False, f"the CUDA kernels run on CUDA tensors, not {device.type}"
        return True, ""
    if name == "triton":
        try:
            return triton_backend().available(device, dtype)
        except ImportError as exc:
            return False, f"surgery.ops.triton_ops cannot be imported: {exc}"
    raise BackendUnavailableError(f"unknown kernel backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")


def backends() -> list[BackendStatus]:
    """Each backend: built?, which devices it can run on here, and why not (`surgery backends`)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    result = []
    for name in BACKENDS:
        runs, reasons = [], []
        for device in devices:
            ok, why = can_run(name, device)
            (runs.append(device.type) if ok else reasons.append(why))
        if name == "eager":
            built = True
        elif name in ("cpp", "cuda"):
            built = _extension.extension() is not None and (name == "cpp" or _extension.has_cuda_kernels())
        else:
            built = _triton_importable()
        result.append(BackendStatus(name, built, tuple(runs), "; ".join(dict.fromkeys(reasons))))
    return result


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def build_info() -> dict:
    """torch / CUDA / compiler versions the extension was built with (empty when not built)."""
    return _extension.build_info()


# -- choosing ------------------------------------------------------------------------------------


def selected_backend() -> str:
    """The backend SURGERY_KERNEL asks for ("auto" when unset or empty). A name that is no backend
    is refused here, so a typo is an error at once, not a setting that silently means nothing."""
    raw = os.environ.get(ENV, "")
    name = raw.strip() or "auto"
    if name not in ("auto", *BACKENDS):
        raise BackendUnavailableError(f"unknown kernel backend {raw!r} in {ENV}; choose one of: auto, "
                                      f"{', '.join(BACKENDS)} (or leave {ENV} unset)")
    return name


def choose(backend: Optional[str], like: Tensor) -> str:
    """The backend that runs a call on tensors like `like` (its device and dtype)."""
    device = like.device
    name = backend or selected_backend()
    if name != "auto":
        ok, why = can_run(name, device, like.dtype)  # raises for an unknown name
        if not ok:
            raise BackendUnavailableError(f"kernel backend {name!r} cannot run on {device.type} tensors here: {why}")
        return name
    order = ("cpp",) if device.type == "cpu" else ("cuda", "triton")
    for candidate in order:
        if can_run(candidate, device, like.dtype)[0]:
            return candidate
    if device.type in ("cpu", "cuda"):
        _extension.warn_fallback(device.type)
    return "eager"


# -- calling -------------------------------------------------------------------------------------


def kernel(op: str, backend: str) -> Callable:
    """The torch op of `op` on a kernel backend: torch.ops.surgery.<op> (cpp, cuda; its `.out`
    overload is `kernel(...).out`) or torch.ops.surgery.<op>_triton (triton)."""
    if backend == "triton":
        triton_backend()  # defines the ops
        return getattr(torch.ops.surgery, f"{op}_triton")
    _extension.require_registration()
    return getattr(torch.ops.surgery, op)


def run_with_out(op: str, reference: Callable, a: Tensor, b: Tensor, out: Optional[Tensor],
                 backend: Optional[str]) -> Tensor:
    """The two ops with an `out=` form (inputs already checked): run on the chosen backend."""
    name = choose(backend, b)
    if name == "eager":
        result = reference(a, b)
        return result if out is None else out.copy_(result)
    fn = kernel(op, name)
    if out is None:
        return fn(a, b)
    if name == "triton":
        getattr(torch.ops.surgery, f"{op}_triton_out")(a, b, out)  # -> (): custom ops cannot return an alias
        return out
    return fn.out(a, b, out=out)


__all__ = ["BACKENDS", "ENV", "BackendStatus", "backends", "build_info", "can_run", "choose", "kernel",
           "run_with_out", "selected_backend", "triton_backend"]
