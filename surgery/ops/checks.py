"""Input checks shared by every backend of the fused ops, done once before dispatch.

Each check raises `OpInputError` naming the op, the argument, what was wrong and what is
allowed, so a bad call fails the same way whichever backend would have run it (the C++ and CUDA
kernels check again with TORCH_CHECK, for callers that reach `torch.ops.surgery.*` directly).
The checks only read shapes, dtypes and devices: cheap enough for the decode loop.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import OpInputError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALLOWED = "float32, bfloat16 or float16"


def _same(op: str, named: Sequence[tuple[str, Tensor]]) -> None:
    first_name, first = named[0]
    if first.dtype not in DTYPES:
        raise OpInputError(f"{op}: {first_name} is {first.dtype}; allowed dtypes: {_ALLOWED}")
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise OpInputError(f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; "
                               f"all inputs must share one dtype ({_ALLOWED})")
        if t.device != first.device:
            raise OpInputError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                               f"all inputs must be on one device")
    for name, t in named:
        if t.numel() == 0:
            raise OpInputError(f"{op}: {name} is empty (shape {tuple(t.shape)}); every dimension must be >= 1")


def _rank(op: str, name: str, t: Tensor, ranks: Sequence[int], layout: str) -> None:
    if t.dim() not in ranks:
        raise OpInputError(f"{op}: {name} has shape {tuple(t.shape)}; expected {layout}")


def check_out(op: str, out: Optional[Tensor], shape: tuple[int, ...], like: Tensor, *inputs: Tensor) -> None:
    if out is None:
        return
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise OpInputError(f"{op}: out= does not support automatic differentiation (as torch's own out= "
                           f"functions); call it without out= to train through it, or under torch.no_grad()")
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise OpInputError(f"{op}: out is {tuple(out.shape)} {out.dtype} on {out.device}; expected "
                           f"{shape} {like.dtype} on {like.device}")
    if not out.is_contiguous():
        raise OpInputError(f"{op}: out must be contiguous (it is written row by row)")


def query_concat(queries: Tensor, feats: Tensor, out: Optional[Tensor] = None) -> tuple[int, ...]:
    """-> the output shape (B, Q+N, C)."""
    op = "query_concat"
    _rank(op, "queries", queries, (2,), "(Q, C)")
    _rank(op, "feats", feats, (3,), "(B, N, C)")
    _same(op, [("queries", queries), ("feats", feats)])
    if queries.shape[1] != feats.shape[2]:
        raise OpInputError(f"{op}: queries have C={queries.shape[1]} channels but feats have C={feats.shape[2]}; "
                           f"they must agree")
    shape = (feats.shape[0], queries.shape[0] + feats.shape[1], feats.shape[2])
    check_out(op, out, shape, feats, queries, feats)
    return shape


def adapter_add(adapter: Tensor, visual_query: Tensor, out: Optional[Tensor] = None) -> tuple[int, ...]:
    """-> the output shape (L, B, Q, D)."""
    op = "adapter_add"
    _rank(op, "adapter", adapter, (2, 3), "(L, Q, D) or (L*Q, D)")
    _rank(op, "visual_query", visual_query, (3,), "(B, Q, D)")
    _same(op, [("adapter", adapter), ("visual_query", visual_query)])
    B, Q, D = visual_query.shape
    if adapter.shape[-1] != D:
        raise OpInputError(f"{op}: adapter has D={adapter.shape[-1]} but visual_query has D={D}; they must agree")
    if adapter.dim() == 3 and adapter.shape[1] != Q:
        raise OpInputError(f"{op}: adapter has Q={adapter.shape[1]} tokens per layer but visual_query has "
                           f"Q={Q}; they must agree")
    if adapter.dim() == 2 and adapter.shape[0] % Q:
        raise OpInputError(f"{op}: a flat adapter needs L*Q rows; {adapter.shape[0]} rows is not a multiple "
                           f"of visual_query's Q={Q}")
    L = adapter.shape[0] if adapter.dim() == 3 else adapter.shape[0] // Q
    shape = (L, B, Q, D)
    check_out(op, out, shape, visual_query, adapter, visual_query)
    return shape


def adapter_attention(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor]) -> tuple[int, ...]:
    """-> the output shape (B, H, T, hd)."""
    op = "adapter_attention"
    _rank(op, "xq", xq, (4,), "(B, H, T, hd)")
    _rank(op, "k_t", k_t, (4,), "(B, H, hd, Q)")
    _rank(op, "v", v, (4,), "(B, H, Q, hd)")
    _rank(op, "gate", gate, (4,), "(1, H, 1, 1)")
    named = [("xq", xq), ("k_t", k_t), ("v", v), ("gate", gate)]
    if new_gate is not None:
        _rank(op, "new_gate", new_gate, (4,), "(1, 1, 1, 1)")
        named.append(("new_gate", new_gate))
    _same(op, named)
    B, H, T, hd = xq.shape
    Q = v.shape[2]
    if tuple(k_t.shape) != (B, H, hd, Q) or tuple(v.shape) != (B, H, Q, hd):
        raise OpInputError(f"{op}: with xq {tuple(xq.shape)} (B, H, T, hd), k_t must be (B, H, hd, Q) and v "
                           f"(B, H, Q, hd) for one Q; got k_t {tuple(k_t.shape)}, v {tuple(v.shape)}")
    if tuple(gate.shape) != (1, H, 1, 1):
        raise OpInputError(f"{op}: gate must be (1, {H}, 1, 1), one value per head; got {tuple(gate.shape)}")
    if new_gate is not None and new_gate.numel() != 1:
        raise OpInputError(f"{op}: new_gate must be (1, 1, 1, 1); got {tuple(new_gate.shape)}")
    return (B, H, T, hd)
