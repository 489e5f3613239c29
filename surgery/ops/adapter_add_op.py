"""adapter_add: every adapted layer's dynamic adapter in one pass.

    adapter_add(adapter (L, Q, D) or (L*Q, D), visual_query (B, Q, D)) -> (L, B, Q, D)
    upstream, per adapted layer i: adapter[i].repeat(B, 1, 1) + visual_query

The op once for every backend: its eager reference, the fake (meta) implementation and autograd
that its compiled op (torch.ops.surgery.adapter_add, csrc/) and its Triton op
(torch.ops.surgery.adapter_add_triton, triton_ops.py) are registered with, and the public
function (inputs checked once, then the chosen backend). The out= forms have a fake, no autograd.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import checks, dispatch

NAME = "adapter_add"
_KERNEL = checks.kernel(NAME)  # fakes refuse bad input as the C++ kernels do: "surgery::adapter_add: ..."


def table(adapter: Tensor, visual_query: Tensor) -> Tensor:
    """The adapter as (L, Q, D), whichever of (L, Q, D) or (L*Q, D) it came as."""
    Q, D = visual_query.shape[1], visual_query.shape[2]
    return adapter.reshape(-1, Q, D)  # (L, Q, D)


def reference(adapter: Tensor, visual_query: Tensor) -> Tensor:
    return table(adapter, visual_query).unsqueeze(1) + visual_query.unsqueeze(0)  # (L, B, Q, D)


def fake(adapter: Tensor, visual_query: Tensor) -> Tensor:
    return visual_query.new_empty(checks.adapter_add_shape(_KERNEL, adapter, visual_query))


def fake_out(adapter: Tensor, visual_query: Tensor, out: Tensor) -> Tensor:
    checks.out_tensor(_KERNEL, out, checks.adapter_add_shape(_KERNEL, adapter, visual_query), visual_query)
    return out


def setup_context(ctx, inputs, output) -> None:
    ctx.adapter_shape = inputs[0].shape


def backward(ctx, grad: Tensor):
    # grad: (L, B, Q, D); the adapter's gradient in the shape it came in
    d_adapter = grad.sum(1).reshape(ctx.adapter_shape) if ctx.needs_input_grad[0] else None  # (L, Q, D) | (L*Q, D)
    d_visual_query = grad.sum(0) if ctx.needs_input_grad[1] else None  # (B, Q, D)
    return d_adapter, d_visual_query


def adapter_add(adapter: Tensor, visual_query: Tensor, *, out: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """Every adapted layer's dynamic adapter in one pass: (L, B, Q, D)."""
    checks.adapter_add(adapter, visual_query, out)
    return dispatch.run_with_out(NAME, reference, adapter, visual_query, out, backend)
