"""Fake (meta) implementations and autograd of the compiled ops `torch.ops.surgery.*`.

The schemas and the CPU/CUDA kernels are C++ (csrc/); what torch needs beyond them is here:

* `register_fake`: output shapes for FakeTensor / meta tensors, so `torch.compile`,
  `torch.export` and the meta device see the ops (the same input checks as the kernels, for
  whatever can be checked without data);
* `register_autograd`: training through the functional ops:
    query_concat       d_queries = grad[:, :Q].sum(0), d_feats = grad[:, Q:]
    adapter_add        d_adapter = grad.sum(1) in the adapter's shape, d_visual_query = grad.sum(0)
    adapter_attention  the forward recomputed in fp32 from the saved inputs, closed-form
                       gradients for xq, k_t, v, gate and new_gate, rounded to their dtypes
  The `.out` overloads have a fake implementation but no autograd.

`register()` runs once, when `surgery.ops._extension` has loaded the extension (importing this
module loads it). Code that imports only `surgery._C` gets torch's "could not find the fake impl"
error naming this module (`set_python_module` in csrc/ops.cpp). Without the extension, importing
this module registers nothing.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import Tensor

from . import _extension, checks

_lock = threading.Lock()
_registered = False


# -- fake implementations: the kernels' checks (checks.py, in csrc/checks.h's words), then the shape --


def _query_concat_fake(queries: Tensor, feats: Tensor) -> Tensor:
    return feats.new_empty(checks.query_concat_shape(checks.kernel("query_concat"), queries, feats))


def _query_concat_out_fake(queries: Tensor, feats: Tensor, *, out: Tensor) -> Tensor:
    check = checks.kernel("query_concat")
    checks.out_tensor(check, out, checks.query_concat_shape(check, queries, feats), feats)
    return out


def _adapter_add_fake(adapter: Tensor, visual_query: Tensor) -> Tensor:
    return visual_query.new_empty(checks.adapter_add_shape(checks.kernel("adapter_add"), adapter, visual_query))


def _adapter_add_out_fake(adapter: Tensor, visual_query: Tensor, *, out: Tensor) -> Tensor:
    check = checks.kernel("adapter_add")
    checks.out_tensor(check, out, checks.adapter_add_shape(check, adapter, visual_query), visual_query)
    return out


def _adapter_attention_fake(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor]) -> Tensor:
    shape = checks.adapter_attention_shape(checks.kernel("adapter_attention"), xq, k_t, v, gate, new_gate)
    return xq.new_empty(shape)


# -- autograd --------------------------------------------------------------------------------------


def _query_concat_setup(ctx, inputs, output) -> None:
    queries, _ = inputs
    ctx.num_queries = queries.shape[0]


def _query_concat_backward(ctx, grad: Tensor):
    Q = ctx.num_queries  # grad: (B, Q+N, C)
    d_queries = grad[:, :Q].sum(0) if ctx.needs_input_grad[0] else None  # (Q, C)
    d_feats = grad[:, Q:] if ctx.needs_input_grad[1] else None  # (B, N, C)
    return d_queries, d_feats


def _adapter_add_setup(ctx, inputs, output) -> None:
    adapter, _ = inputs
    ctx.adapter_shape = adapter.shape


def _adapter_add_backward(ctx, grad: Tensor):
    d_adapter = grad.sum(1).reshape(ctx.adapter_shape) if ctx.needs_input_grad[0] else None  # (L, Q, D) | (L*Q, D)
    d_visual_query = grad.sum(0) if ctx.needs_input_grad[1] else None  # (B, Q, D)
    return d_adapter, d_visual_query


def _adapter_attention_setup(ctx, inputs, output) -> None:
    xq, k_t, v, gate, new_gate = inputs
    ctx.save_for_backward(xq, k_t, v, gate, new_gate)
    ctx.has_new_gate = new_gate is not None


def _adapter_attention_backward(ctx, grad: Tensor):
    xq, k_t, v, gate, new_gate = ctx.saved_tensors
    need_xq, need_k, need_v, need_gate, need_new_gate = ctx.needs_input_grad
    # the forward again, in fp32: s = xq k_t * scale, p = softmax(s), pv = p v, out = g * ng * pv
    x32, k32, v32, g32, G = xq.float(), k_t.float(), v.float(), gate.float(), grad.float()
    scale = 1.0 / math.sqrt(xq.shape[-1])
    p = torch.softmax(torch.matmul(x32, k32) * scale, dim=-1)  # (B, H, T, Q)
    weight = g32 * new_gate.float() if ctx.has_new_gate else g32  # (1, H, 1, 1)
    d_xq = d_k = d_v = d_gate = d_new_gate = None
    if need_v:
        d_v = (torch.matmul(p.transpose(-1, -2), G) * weight).to(v.dtype)  # (B, H, Q, hd)
    if need_gate or need_new_gate:
        d_weight = (G * torch.matmul(p, v32)).sum(dim=(0, 2, 3), keepdim=True)  # (1, H, 1, 1)
        if need_gate:
            d_gate = (d_weight * new_gate.float() if ctx.has_new_gate else d_weight).to(gate.dtype)
        if need_new_gate and ctx.has_new_gate:
            d_new_gate = (d_weight * g32).sum().reshape(new_gate.shape).to(new_gate.dtype)
    if need_xq or need_k:
        d_p = torch.matmul(G, v32.transpose(-1, -2)) * weight  # (B, H, T, Q)
        d_s = p * (d_p - (d_p * p).sum(-1, keepdim=True)) * scale  # softmax backward, with the scale
        if need_xq:
            d_xq = torch.matmul(d_s, k32.transpose(-1, -2)).to(xq.dtype)  # (B, H, T, hd)
        if need_k:
            d_k = torch.matmul(x32.transpose(-1, -2), d_s).to(k_t.dtype)  # (B, H, hd, Q)
    return d_xq, d_k, d_v, d_gate, d_new_gate


# -- registration ----------------------------------------------------------------------------------


def register() -> None:
    """Register the fake implementations and autograd of torch.ops.surgery.* (once; the ops must
    exist, i.e. the extension is loaded)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        torch.library.register_fake("surgery::query_concat", _query_concat_fake)
        torch.library.register_fake("surgery::query_concat.out", _query_concat_out_fake)
        torch.library.register_fake("surgery::adapter_add", _adapter_add_fake)
        torch.library.register_fake("surgery::adapter_add.out", _adapter_add_out_fake)
        torch.library.register_fake("surgery::adapter_attention", _adapter_attention_fake)
        torch.library.register_autograd("surgery::query_concat", _query_concat_backward,
                                        setup_context=_query_concat_setup)
        torch.library.register_autograd("surgery::adapter_add", _adapter_add_backward,
                                        setup_context=_adapter_add_setup)
        torch.library.register_autograd("surgery::adapter_attention", _adapter_attention_backward,
                                        setup_context=_adapter_attention_setup)
        _registered = True


def is_registered() -> bool:
    return _registered


if _extension.extension() is not None:
    register()
