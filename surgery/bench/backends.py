"""The backends of each fused op on each device, as `surgery bench kernels` calls them.

upstream (the eager form), compile (torch.compile of the broadcast form), cpp / cpp.out on CPU, cuda /
cuda.out and triton / triton.out on GPU. Kernels are called through their torch ops, not the
`surgery.ops` dispatcher, so the times are the kernels' own. Triton's CPU interpreter is not worth
timing (GPU only), and a backend of the other device is refused rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import DeviceUnavailableError, limits

if TYPE_CHECKING:
    from .kernels import Case

CPU_BACKENDS = ("upstream", "compile", "cpp", "cpp.out")
GPU_BACKENDS = ("upstream", "compile", "cuda", "cuda.out", "triton", "triton.out")


@dataclass(frozen=True)
class Impl:
    """A backend of one op: `call(args, out)` returns the result (a tensor, or upstream's list of
    per-layer tensors); `out` is a preallocated output when `needs_out`."""

    name: str
    call: Callable[[tuple, Optional[Tensor]], Any]
    needs_out: bool = False


def upstream_query_concat(queries: Tensor, feats: Tensor) -> Tensor:
    return torch.cat([queries.unsqueeze(0).repeat(feats.shape[0], 1, 1), feats], dim=1)


def upstream_adapter_add(adapter: Tensor, visual_query: Tensor) -> list[Tensor]:
    B = visual_query.shape[0]
    return [adapter[i].repeat(B, 1, 1) + visual_query for i in range(adapter.shape[0])]  # per layer, as upstream


def upstream_form(op: str) -> Callable:
    from ..ops import reference

    return {"query_concat": upstream_query_concat, "adapter_add": upstream_adapter_add,
            "adapter_attention": reference.adapter_attention}[op]


def implementations(case: "Case", device: torch.device,
                    backends: Optional[Sequence[str]] = None) -> tuple[dict[str, Impl], dict[str, str]]:
    """({name: Impl} that can run here, {name: why not}) for `case` on `device`."""
    from .. import ops
    from ..ops import reference

    wanted = device_backends(device)
    if backends is not None:
        wanted = tuple(b for b in wanted if b in backends)
    impls: dict[str, Impl] = {}
    missing: dict[str, str] = {}
    op = case.op
    for name in wanted:
        base = name.removesuffix(".out")
        if name.endswith(".out") and op == "adapter_attention":
            continue  # no out= form: its output is one row per head
        if base == "upstream":
            fn = upstream_form(op)
            impls[name] = Impl(name, lambda args, out, fn=fn: fn(*args))
        elif base == "compile":
            torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no stale guards
            compiled = torch.compile(getattr(reference, op), dynamic=False)
            impls[name] = Impl(name, lambda args, out, fn=compiled: fn(*args))
        else:
            ok, why = ops.can_run(base, device)
            if not ok:
                missing[name] = why
                continue
            impls[name] = _kernel_impl(name, base, op)
    return impls, missing


def device_backends(device: torch.device) -> tuple[str, ...]:
    return CPU_BACKENDS if device.type == "cpu" else GPU_BACKENDS


def require_backends_on(device: torch.device, backends: Optional[Sequence[str]]) -> None:
    """Refuse `--backends` that run on the other kind of device: they would be dropped, and the run
    would time only the references."""
    here = device_backends(device)
    elsewhere = [b for b in backends or () if b not in here]
    if not elsewhere:
        return
    names = ",".join(elsewhere)
    if device.type == "cpu":
        where = "run on a CUDA device, " + ("pass --device cuda" if torch.cuda.is_available()
                                             else "and this machine has none")
    else:
        where = "run on the CPU, pass --device cpu"
    raise DeviceUnavailableError(f"--backends {names}: not a backend of a {device.type} run (they {where}); "
                                 f"available with --device {device.type}: {', '.join(here)} "
                                 f"(the references {', '.join(limits.REFERENCES)} are always timed)")


def _kernel_impl(name: str, base: str, op: str) -> Impl:
    if base in ("cpp", "cuda"):
        from ..ops import _extension

        _extension.require_registration()
        fn = getattr(torch.ops.surgery, op)
        if name.endswith(".out"):
            return Impl(name, lambda args, out: fn.out(*args, out=out), needs_out=True)
        return Impl(name, lambda args, out: fn(*args))
    from ..ops import triton_ops  # noqa: F401  (registers the surgery::*_triton ops)

    if name.endswith(".out"):
        fn_out = getattr(torch.ops.surgery, f"{op}_triton_out")

        def call_out(args: tuple, out: Tensor) -> Tensor:
            fn_out(*args, out)
            return out

        return Impl(name, call_out, needs_out=True)
    fn = getattr(torch.ops.surgery, f"{op}_triton")
    return Impl(name, lambda args, out: fn(*args))
