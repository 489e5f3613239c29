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
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _extension

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALLOWED = "float32, bfloat16 or float16"
_lock = threading.Lock()
_registered = False


# -- the checks of csrc/checks.h, for fake tensors ------------------------------------------------


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rank(op: str, name: str, t: Tensor, ranks: Sequence[int], layout: str) -> None:
    if t.dim() not in ranks:
        raise RuntimeError(f"surgery::{op}: {name} has shape {list(t.shape)} ({t.dim()} dimensions); "
                           f"expected {layout}")


def _same(op: str, named: Sequence[tuple[str, Tensor]]) -> None:
    first_name, first = named[0]
    if first.dtype not in _DTYPES:
        raise RuntimeError(f"surgery::{op}: {first_name} is {_dtype(first.dtype)}; allowed dtypes: {_ALLOWED}")
    for name, t in named:
        if t.dtype != first.dtype:
            raise RuntimeError(f"surgery::{op}: {name} is {_dtype(t.dtype)} but {first_name} is "
                               f"{_dtype(first.dtype)}; all inputs must share one dtype ({_ALLOWED})")
        if t.device != first.device:
            raise RuntimeError(f"surgery::{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                               f"all inputs must be on one device")
    for name, t in named:
        torch._check(t.numel() > 0, lambda: f"surgery::{op}: {name} is empty (shape {list(t.shape)}); "
                                            f"every dimension must be >= 1")


def _query_concat_shape(queries: Tensor, feats: Tensor) -> tuple:
    op = "query_concat"
    _rank(op, "queries", queries, (2,), "(Q, C) (2 dimensions)")
    _rank(op, "feats", feats, (3,), "(B, N, C) (3 dimensions)")
    _same(op, [("queries", queries), ("feats", feats)])
    torch._check(queries.shape[1] == feats.shape[2], lambda: f"surgery::{op}: queries have C={queries.shape[1]} "
                 f"channels but feats have C={feats.shape[2]}; they must agree")
    return (feats.shape[0], queries.shape[0] + feats.shape[1], feats.shape[2])


def _adapter_add_shape(adapter: Tensor, visual_query: Tensor) -> tuple:
    op = "adapter_add"
    _rank(op, "adapter", adapter, (2, 3), "(L, Q, D) or (L*Q, D)")
    _rank(op, "visual_query", visual_query, (3,), "(B, Q, D) (3 dimensions)")
    _same(op, [("adapter", adapter), ("visual_query", visual_query)])
    B, Q, D = visual_query.shape
    torch._check(adapter.shape[-1] == D, lambda: f"surgery::{op}: adapter has D={adapter.shape[-1]} but "
                 f"visual_query has D={D}; they must agree")
    if adapter.dim() == 3:
        torch._check(adapter.shape[1] == Q, lambda: f"surgery::{op}: adapter has Q={adapter.shape[1]} tokens per "
                     f"layer but visual_query has Q={Q}; they must agree")
        L = adapter.shape[0]
    else:
        torch._check(adapter.shape[0] % Q == 0, lambda: f"surgery::{op}: a flat adapter needs L*Q rows; "
                     f"{adapter.shape[0]} rows is not a multiple of visual_query's Q={Q}")
        L = adapter.shape[0] // Q
    return (L, B, Q, D)


def _adapter_attention_shape(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor]) -> tuple:
    op = "adapter_attention"
    _rank(op, "xq", xq, (4,), "(B, H, T, hd) (4 dimensions)")
    _rank(op, "k_t", k_t, (4,), "(B, H, hd, Q) (4 dimensions)")
    _rank(op, "v", v, (4,), "(B, H, Q, hd) (4 dimensions)")
    _rank(op, "gate", gate, (4,), "(1, H, 1, 1) (4 dimensions)")
    named = [("xq", xq), ("k_t", k_t), ("v", v), ("gate", gate)]
    if new_gate is not None:
        _rank(op, "new_gate", new_gate, (4,), "(1, 1, 1, 1) (4 dimensions)")
        named.append(("new_gate", new_gate))
    _same(op, named)
    B, H, T, hd = xq.shape
    Q = v.shape[2]
    torch._check(k_t.shape[0] == B and k_t.shape[1] == H and k_t.shape[2] == hd and k_t.shape[3] == Q
                 and v.shape[0] == B and v.shape[1] == H and v.shape[3] == hd,
                 lambda: f"surgery::{op}: with xq {list(xq.shape)} (B, H, T, hd), k_t must be (B, H, hd, Q) and "
                         f"v (B, H, Q, hd) for one Q; got k_t {list(k_t.shape)}, v {list(v.shape)}")
    torch._check(gate.shape[0] == 1 and gate.shape[1] == H and gate.shape[2] == 1 and gate.shape[3] == 1,
                 lambda: f"surgery::{op}: gate must be (1, {H}, 1, 1), one value per head; got {list(gate.shape)}")
    if new_gate is not None:
        torch._check(new_gate.numel() == 1,
                     lambda: f"surgery::{op}: new_gate must be (1, 1, 1, 1); got {list(new_gate.shape)}")
    return (B, H, T, hd)


def _check_out(op: str, out: Tensor, shape: tuple, like: Tensor) -> None:
    if out.dim() != len(shape) or out.dtype != like.dtype or out.device != like.device:
        raise RuntimeError(f"surgery::{op}: out is {list(out.shape)} {_dtype(out.dtype)} on {out.device}; expected "
                           f"{list(shape)} {_dtype(like.dtype)} on {like.device}")
    torch._check(all(a == b for a, b in zip(out.shape, shape)), lambda: f"surgery::{op}: out is {list(out.shape)}; "
                 f"expected {list(shape)}")
    torch._check(out.is_contiguous(), lambda: f"surgery::{op}: out must be contiguous (it is written row by row)")


# -- fake implementations --------------------------------------------------------------------------


def _query_concat_fake(queries: Tensor, feats: Tensor) -> Tensor:
    return feats.new_empty(_query_concat_shape(queries, feats))


def _query_concat_out_fake(queries: Tensor, feats: Tensor, *, out: Tensor) -> Tensor:
    _check_out("query_concat", out, _query_concat_shape(queries, feats), feats)
    return out


def _adapter_add_fake(adapter: Tensor, visual_query: Tensor) -> Tensor:
    return visual_query.new_empty(_adapter_add_shape(adapter, visual_query))


def _adapter_add_out_fake(adapter: Tensor, visual_query: Tensor, *, out: Tensor) -> Tensor:
    _check_out("adapter_add", out, _adapter_add_shape(adapter, visual_query), visual_query)
    return out


def _adapter_attention_fake(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor]) -> Tensor:
    return xq.new_empty(_adapter_attention_shape(xq, k_t, v, gate, new_gate))


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
