"""What the op tests need of a backend: a `Backend` to call through (the public function, or the
backend's own torch op) and a few helpers every op's tests share. The fixtures that make one
Backend per backend (and skip what cannot run here) are in conftest.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytest
import torch
from torch import Tensor

from surgery import ops
from surgery.ops import dispatch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("f32", "bf16", "f16")

# opcheck's four tests: schema, autograd registration, fake tensors, AOT dispatch (torch.compile's path)
OPCHECK_UTILS = {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}


@dataclass(frozen=True)
class Backend:
    name: str  # eager | cpp | cuda | triton
    device: torch.device

    def __call__(self, op: str, *args, **kwargs) -> Tensor:
        """surgery.ops.<op>(*args, **kwargs) on this backend: checks, dispatch, then the kernel."""
        return getattr(ops, op)(*args, backend=self.name, **kwargs)

    @property
    def compiled(self) -> bool:
        """The C++ extension's ops (cpp, cuda): their own checks in csrc/checks.h, `.out` overloads."""
        return self.name in ("cpp", "cuda")

    def op(self, op: str):
        """The backend's own torch op: torch.ops.surgery.<op> (cpp, cuda) or <op>_triton (triton)."""
        if self.name == "eager":
            pytest.skip("eager runs plain torch: it has no op of its own")
        return dispatch.kernel(op, self.name)

    def meta_op(self, op: str):
        """The backend's own torch op, for meta tensors (it runs the op's fake: the shape, the checks)."""
        if self.name == "triton" and self.device.type != "cpu":
            pytest.skip("the Triton ops have the op's fake under the interpreter only (else their traced bodies)")
        return self.op(op)

    def out_call(self, op: str, args: Sequence, out: Tensor) -> tuple[Callable, tuple, dict]:
        """(the backend's out= op, its args, its kwargs): `.out(..., *, out)` of the C++ ops, which
        returns `out`, or `<op>_triton_out(..., out)`, which returns nothing."""
        if self.compiled:
            return self.op(op).out, tuple(args), {"out": out}
        self.op(op)  # skips eager; defines the Triton ops
        return getattr(torch.ops.surgery, f"{op}_triton_out").default, (*args, out), {}

    def maker(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> Callable[..., Tensor]:
        """r(*shape): standard normal values on this backend's device, the same for every backend."""
        g = torch.Generator().manual_seed(seed)
        return lambda *shape: torch.randn(*shape, generator=g).to(device=self.device, dtype=dtype)


def shifted(t: Tensor, by: int) -> Tensor:
    """A copy of t whose data starts `by` elements into its storage (misaligned for by % 8 != 0)."""
    flat = torch.empty(t.numel() + by, device=t.device, dtype=t.dtype)
    view = flat[by:].view(t.shape)
    view.copy_(t)
    return view


def grads_of(fn: Callable, args: Sequence[Optional[Tensor]], grad_out: Tensor):
    """fn's output and the gradients of all its tensor arguments (None stays None)."""
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [leaf.grad if leaf is not None else None for leaf in leaves]


def opcheck(op, args: Sequence, kwargs: Optional[dict] = None, utils: Optional[Sequence[str]] = None) -> None:
    """torch.library.opcheck, every one of its tests (or `utils`) run and passed."""
    if utils is None:
        result = torch.library.opcheck(op, tuple(args), kwargs or {})
        assert set(result) >= OPCHECK_UTILS, result
    else:
        result = torch.library.opcheck(op, tuple(args), kwargs or {}, test_utils=tuple(utils))
    assert all(v == "SUCCESS" for v in result.values()), (op, result)
