"""adapter_attention: the gated adapter branch of one attention layer.

    adapter_attention(xq (B, H, T, hd), k_t (B, H, hd, Q), v (B, H, Q, hd),
                      gate (1, H, 1, 1), new_gate (1, 1, 1, 1) or None)  -> (B, H, T, hd)
    upstream: new_gate * tanh(g) * softmax(xq k / sqrt(hd)) v, the softmax in float32 over the Q
    adapter tokens; `gate` comes already squashed (tanh), in the activations' dtype, as the model
    caches it per image. The output is added to the attention output.

The op once for every backend: its eager reference, the fake (meta) implementation and autograd
that its compiled op (torch.ops.surgery.adapter_attention, csrc/) and its Triton op
(torch.ops.surgery.adapter_attention_triton, triton_ops.py) are registered with, and the public
function (inputs checked once, then the chosen backend). The kernels compute in fp32 and round
once; the backward recomputes the forward in fp32 from the saved inputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch

NAME = "adapter_attention"
_KERNEL = checks.kernel(NAME)  # fakes refuse bad input as the C++ kernels do: "surgery::adapter_attention: ..."


def reference(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor]) -> Tensor:
    scores = torch.matmul(xq, k_t) / math.sqrt(xq.shape[-1])  # (B, H, T, Q)
    scores = gate * torch.softmax(scores.float(), dim=-1).type_as(xq)  # (B, H, T, Q)
    if new_gate is not None:
        scores = new_gate * scores
    return torch.matmul(scores, v)  # (B, H, T, hd)


def fake(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor]) -> Tensor:
    return xq.new_empty(checks.adapter_attention_shape(_KERNEL, xq, k_t, v, gate, new_gate))


def setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)  # xq, k_t, v, gate, new_gate (None is kept as None)


def backward(ctx, grad: Tensor):
    xq, k_t, v, gate, new_gate = ctx.saved_tensors
    need_xq, need_k, need_v, need_gate, need_new_gate = ctx.needs_input_grad
    # the forward again, in fp32: s = xq k_t * scale, p = softmax(s), out = g * ng * (p v)
    x32, k32, v32, g32, G = xq.float(), k_t.float(), v.float(), gate.float(), grad.float()
    scale = 1.0 / math.sqrt(xq.shape[-1])
    p = torch.softmax(torch.matmul(x32, k32) * scale, dim=-1)  # (B, H, T, Q)
    weight = g32 if new_gate is None else g32 * new_gate.float()  # (1, H, 1, 1)
    d_xq = d_k = d_v = d_gate = d_new_gate = None
    if need_v:
        d_v = (torch.matmul(p.transpose(-1, -2), G) * weight).to(v.dtype)  # (B, H, Q, hd)
    if need_gate or (need_new_gate and new_gate is not None):
        d_weight = (G * torch.matmul(p, v32)).sum(dim=(0, 2, 3), keepdim=True)  # (1, H, 1, 1): <dO, P v> per head
        if need_gate:
            d_gate = (d_weight if new_gate is None else d_weight * new_gate.float()).to(gate.dtype)
        if need_new_gate and new_gate is not None:
            d_new_gate = (d_weight * g32).sum().reshape(new_gate.shape).to(new_gate.dtype)
    if need_xq or need_k:
        d_p = torch.matmul(G, v32.transpose(-1, -2)) * weight  # (B, H, T, Q)
        d_s = p * (d_p - (d_p * p).sum(-1, keepdim=True)) * scale  # softmax backward, with the scale
        if need_xq:
            d_xq = torch.matmul(d_s, k32.transpose(-1, -2)).to(xq.dtype)  # (B, H, T, hd)
        if need_k:
            d_k = torch.matmul(x32.transpose(-1, -2), d_s).to(k_t.dtype)  # (B, H, hd, Q)
    return d_xq, d_k, d_v, d_gate, d_new_gate


def adapter_attention(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor] = None, *,
                      backend: Optional[str] = None) -> Tensor:
    """The gated adapter branch of one layer: (B, H, T, hd), to be added to the attention output."""
    checks.adapter_attention(xq, k_t, v, gate, new_gate)
    name = dispatch.choose(backend, xq)
    if name == "eager":
        return reference(xq, k_t, v, gate, new_gate)
    return dispatch.kernel(NAME, name)(xq, k_t, v, gate, new_gate)
