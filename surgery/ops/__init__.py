"""Fused ops of the adapter path, with a choice of backend: eager, cpp, cuda, triton.

    from surgery import ops
    ops.query_concat(queries, feats)                 # (Q, C), (B, N, C) -> (B, Q+N, C)
    ops.adapter_add(adapter, visual_query)           # (L, Q, D), (B, Q, D) -> (L, B, Q, D)
    ops.adapter_attention(xq, k_t, v, gate, new_gate)  # gated adapter branch at one layer
    ops.backends()                                   # what is built, what can run here, and why not

Choosing a backend: `backend=` on a call, else the environment variable `SURGERY_KERNEL`
(eager | cpp | cuda | triton | auto), else `auto`. `auto` takes, for the tensors' device, the
fastest one that can run: C++ on CPU tensors, CUDA then Triton on GPU tensors, eager otherwise
(falling back silently: the reason is in `backends()` and a warning is given once). A backend
asked for by name that cannot run raises `BackendUnavailableError` saying why, never falls back.

Inputs are checked once here (`checks.py`), so every backend refuses bad input the same way.
Semantics and shapes: `reference.py` and docs/kernels.md.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import BackendUnavailableError
from . import checks, reference

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


# -- which backends can run ----------------------------------------------------------------------


def _ext():
    """The module that loads the compiled extension (imported on first use)."""
    import importlib

    return importlib.import_module(f"{__name__}._extension")


def _tri():
    import importlib

    return importlib.import_module(f"{__name__}.triton_ops")


def can_run(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend `name` can run ops on tensors of `device` here, and if not, why."""
    if name == "eager":
        return True, ""
    if name in ("cpp", "cuda"):
        ext = _ext()
        if ext.extension() is None:
            return False, f"the C++ extension is not loaded: {ext.extension_error()}"
        if name == "cpp":
            return (True, "") if device.type == "cpu" else (False, f"the C++ kernels run on CPU tensors, not {device.type}")
        if not ext.has_cuda_kernels():
            return False, "the extension was built without CUDA kernels (no CUDA toolkit found at build time)"
        return (True, "") if device.type == "cuda" else (False, f"the CUDA kernels run on CUDA tensors, not {device.type}")
    if name == "triton":
        try:
            return _tri().available(device)
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
            built = _ext().extension() is not None and (name == "cpp" or _ext().has_cuda_kernels())
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
    return _ext().build_info()


# -- dispatch ------------------------------------------------------------------------------------


def selected_backend() -> str:
    """The backend SURGERY_KERNEL asks for ("auto" when unset or empty). A name that is no backend
    is refused here, so a typo is an error at once, not a setting that silently means nothing."""
    raw = os.environ.get(ENV, "")
    name = raw.strip() or "auto"
    if name not in ("auto", *BACKENDS):
        raise BackendUnavailableError(f"unknown kernel backend {raw!r} in {ENV}; choose one of: auto, "
                                      f"{', '.join(BACKENDS)} (or leave {ENV} unset)")
    return name


def _choose(backend: Optional[str], device: torch.device) -> str:
    name = backend or selected_backend()
    if name != "auto":
        ok, why = can_run(name, device)  # raises for an unknown name
        if not ok:
            raise BackendUnavailableError(f"kernel backend {name!r} cannot run on {device.type} tensors here: {why}")
        return name
    order = ("cpp",) if device.type == "cpu" else ("cuda", "triton")
    for candidate in order:
        if can_run(candidate, device)[0]:
            return candidate
    if device.type in ("cpu", "cuda"):
        _ext().warn_fallback(device.type)
    return "eager"


def _torch_op(name: str) -> Callable:
    _ext().require_registration()
    return getattr(torch.ops.surgery, name)


def _run_with_out(op_name: str, a: Tensor, b: Tensor, out: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """The two ops with an `out=` form: checked inputs, dispatched to the chosen backend."""
    name = _choose(backend, b.device)
    if name == "eager":
        result = getattr(reference, op_name)(a, b)
        return result if out is None else out.copy_(result)
    if name == "triton":
        return getattr(_tri(), op_name)(a, b, out=out)
    op = _torch_op(op_name)
    return op(a, b) if out is None else op.out(a, b, out=out)


def query_concat(queries: Tensor, feats: Tensor, *, out: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tensor:
    """Broadcast the learned queries over the batch and put them in front of the features."""
    checks.query_concat(queries, feats, out)
    return _run_with_out("query_concat", queries, feats, out, backend)


def adapter_add(adapter: Tensor, visual_query: Tensor, *, out: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """Every adapted layer's dynamic adapter in one pass: (L, B, Q, D)."""
    checks.adapter_add(adapter, visual_query, out)
    return _run_with_out("adapter_add", adapter, visual_query, out, backend)


def adapter_attention(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor] = None, *,
                      backend: Optional[str] = None) -> Tensor:
    """The gated adapter branch of one layer: (B, H, T, hd), to be added to the attention output."""
    checks.adapter_attention(xq, k_t, v, gate, new_gate)
    name = _choose(backend, xq.device)
    if name == "eager":
        return reference.adapter_attention(xq, k_t, v, gate, new_gate)
    if name == "triton":
        return _tri().adapter_attention(xq, k_t, v, gate, new_gate)
    return _torch_op("adapter_attention")(xq, k_t, v, gate, new_gate)


__all__ = ["BACKENDS", "BackendStatus", "adapter_add", "adapter_attention", "backends", "build_info",
           "can_run", "query_concat", "reference"]
