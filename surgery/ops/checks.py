"""Input checks of the fused ops, written once for every caller in Python.

The same checks run in two places, and fail in two ways:

* `surgery.ops` (the public functions, before dispatch to any backend): `OpInputError`,
  "adapter_add: adapter has D=8 but visual_query has D=7; they must agree". Every backend,
  eager included, refuses bad input the same way.
* the fake (meta) implementations of the ops (each op's module, `<op>_op.py`):
  `RuntimeError`, "surgery::adapter_add: ...", word for word what the C++ kernels' TORCH_CHECK
  says (csrc/checks.h, which keeps its own copy for callers of `torch.ops.surgery.*`), so a
  FakeTensor is refused as the real kernel would refuse it.

Conditions on sizes go through `torch._check_with`: under `torch.compile` with symbolic sizes
they become guards or runtime asserts instead of errors at trace time (dtypes, devices, layouts
and ranks are never symbolic: plain `if`s). The checks only read shapes, dtypes and devices:
about 10 us a call, cheap enough for the decode loop.
"""

from __future__ import annotations

from typing import Callable, NoReturn, Optional, Sequence

import torch
from torch import Tensor

from ..errors import OpInputError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALLOWED = "float32, bfloat16 or float16"


class Checker:
    """How one op reports a failed check: the exception type and the message's head.

    Dtypes, devices, layouts and ranks are never symbolic: those checks are plain `if`s that call
    `fail`. Sizes can be (SymInt under torch.compile): those go through `require`."""

    __slots__ = ("op", "error", "head")

    def __init__(self, op: str, error: type[Exception] = OpInputError, head: str = ""):
        self.op, self.error, self.head = op, error, head

    def fail(self, message: str) -> NoReturn:
        raise self.error(f"{self.head}{self.op}: {message}")

    def require(self, ok, message: Callable[[], str]) -> None:
        if ok is not True:  # a False, or a SymBool: torch turns it into a guard or a runtime assert
            torch._check_with(self.error, ok, lambda: f"{self.head}{self.op}: {message()}")


def public(op: str) -> Checker:
    """The checks as `surgery.ops` reports them: OpInputError."""
    return Checker(op)


def kernel(op: str) -> Checker:
    """The checks as the compiled kernels report them: RuntimeError, "surgery::<op>: ..."."""
    return Checker(op, RuntimeError, "surgery::")


def _dims(sizes: Sequence[int]) -> str:  # "[2, 3, 4]", as the C++ kernels print sizes
    return str(list(sizes))


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _rank(check: Checker, name: str, t: Tensor, ranks: Sequence[int], layout: str) -> None:
    if t.dim() not in ranks:
        expected = layout if len(ranks) > 1 else f"{layout} ({ranks[0]} dimensions)"
        check.fail(f"{name} has shape {_dims(t.shape)} ({t.dim()} dimensions); expected {expected}")


def _same(check: Checker, named: Sequence[tuple[str, Tensor]]) -> None:
    """One supported dtype, one device, dense, nothing empty; the first tensor is the reference."""
    first_name, first = named[0]
    if first.dtype not in DTYPES:
        check.fail(f"{first_name} is {_dtype(first)}; allowed dtypes: {_ALLOWED}")
    for name, t in named:  # in csrc/checks.h's order, so that two faults report the same one first
        if t.dtype != first.dtype:
            check.fail(f"{name} is {_dtype(t)} but {first_name} is {_dtype(first)}; "
                       f"all inputs must share one dtype ({_ALLOWED})")
        if t.device != first.device:
            check.fail(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                       f"all inputs must be on one device")
        if t.layout != torch.strided:
            check.fail(f"{name} is not a dense (strided) tensor; only dense (strided) tensors are supported")
    for name, t in named:
        if (ok := t.numel() > 0) is not True:  # (the call and its message only when needed: decode loop)
            check.require(ok, lambda: f"{name} is empty (shape {_dims(t.shape)}); every dimension must be >= 1")


# -- the shapes: every input checked, the output's shape returned -----------------------------------


def query_concat_shape(check: Checker, queries: Tensor, feats: Tensor) -> tuple:
    """(Q, C), (B, N, C) -> (B, Q+N, C)."""
    _rank(check, "queries", queries, (2,), "(Q, C)")
    _rank(check, "feats", feats, (3,), "(B, N, C)")
    _same(check, [("queries", queries), ("feats", feats)])
    check.require(queries.shape[1] == feats.shape[2], lambda: f"queries have C={queries.shape[1]} channels but "
                                                              f"feats have C={feats.shape[2]}; they must agree")
    return (feats.shape[0], queries.shape[0] + feats.shape[1], feats.shape[2])


def adapter_add_shape(check: Checker, adapter: Tensor, visual_query: Tensor) -> tuple:
    """(L, Q, D) or (L*Q, D), (B, Q, D) -> (L, B, Q, D)."""
    _rank(check, "adapter", adapter, (2, 3), "(L, Q, D) or (L*Q, D)")
    _rank(check, "visual_query", visual_query, (3,), "(B, Q, D)")
    _same(check, [("adapter", adapter), ("visual_query", visual_query)])
    B, Q, D = visual_query.shape
    check.require(adapter.shape[-1] == D,
                  lambda: f"adapter has D={adapter.shape[-1]} but visual_query has D={D}; they must agree")
    if adapter.dim() == 3:
        check.require(adapter.shape[1] == Q, lambda: f"adapter has Q={adapter.shape[1]} tokens per layer but "
                                                     f"visual_query has Q={Q}; they must agree")
        L = adapter.shape[0]
    else:
        check.require(adapter.shape[0] % Q == 0, lambda: f"a flat adapter needs L*Q rows; {adapter.shape[0]} rows "
                                                         f"is not a multiple of visual_query's Q={Q}")
        L = adapter.shape[0] // Q
    return (L, B, Q, D)


def adapter_attention_shape(check: Checker, xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor,
                            new_gate: Optional[Tensor]) -> tuple:
    """xq (B, H, T, hd), k_t (B, H, hd, Q), v (B, H, Q, hd), gate (1, H, 1, 1), new_gate (1, 1, 1, 1)
    or None -> (B, H, T, hd)."""
    _rank(check, "xq", xq, (4,), "(B, H, T, hd)")
    _rank(check, "k_t", k_t, (4,), "(B, H, hd, Q)")
    _rank(check, "v", v, (4,), "(B, H, Q, hd)")
    _rank(check, "gate", gate, (4,), "(1, H, 1, 1)")
    named = [("xq", xq), ("k_t", k_t), ("v", v), ("gate", gate)]
    if new_gate is not None:
        _rank(check, "new_gate", new_gate, (4,), "(1, 1, 1, 1)")
        named.append(("new_gate", new_gate))
    _same(check, named)
    B, H, T, hd = xq.shape
    Q = v.shape[2]
    check.require(k_t.shape[0] == B and k_t.shape[1] == H and k_t.shape[2] == hd and k_t.shape[3] == Q
                  and v.shape[0] == B and v.shape[1] == H and v.shape[3] == hd,
                  lambda: f"with xq {_dims(xq.shape)} (B, H, T, hd), k_t must be (B, H, hd, Q) and v (B, H, Q, hd) "
                          f"for one Q; got k_t {_dims(k_t.shape)}, v {_dims(v.shape)}")
    check.require(gate.shape[0] == 1 and gate.shape[1] == H and gate.shape[2] == 1 and gate.shape[3] == 1,
                  lambda: f"gate must be (1, {H}, 1, 1), one value per head; got {_dims(gate.shape)}")
    if new_gate is not None:
        check.require(new_gate.numel() == 1, lambda: f"new_gate must be (1, 1, 1, 1); got {_dims(new_gate.shape)}")
    return (B, H, T, hd)


def out_tensor(check: Checker, out: Tensor, shape: tuple, like: Tensor) -> None:
    """out=: the output's shape, dtype and device, dense and contiguous."""
    check.require(out.dim() == len(shape) and all(a == b for a, b in zip(out.shape, shape))
                  and out.dtype == like.dtype and out.device == like.device and out.layout == torch.strided,
                  lambda: f"out is {_dims(out.shape)} {_dtype(out)} on {out.device}; expected {_dims(shape)} "
                          f"{_dtype(like)} on {like.device}")
    check.require(out.is_contiguous(), lambda: f"out must be contiguous (it is written row by row); got strides "
                                               f"{_dims(out.stride())}")


def may_share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two strided tensors' byte ranges intersect within one storage (conservative: two
    interleaved, disjoint views count as sharing), the rule of csrc/checks.h."""
    if a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":  # meta tensors have no memory
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> tuple[int, int]:  # [first byte, last byte + 1) that t reaches
        low = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
        high = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
        return t.data_ptr() + low * t.element_size(), t.data_ptr() + (high + 1) * t.element_size()

    (a_begin, a_end), (b_begin, b_end) = span(a), span(b)
    return a_begin < b_end and b_begin < a_end


# -- the public checks (surgery.ops, every backend) -------------------------------------------------


def _public_out(check: Checker, out: Optional[Tensor], shape: tuple, like: Tensor,
                inputs: Sequence[tuple[str, Tensor]]) -> None:
    if out is None:
        return
    if torch.is_grad_enabled() and (out.requires_grad or any(t.requires_grad for _, t in inputs)):
        check.fail("out= does not support automatic differentiation (as torch's own out= functions); call it "
                   "without out= to train through it, or under torch.no_grad()")
    out_tensor(check, out, shape, like)
    if torch.compiler.is_compiling():  # storages are not traceable; the compiled graph owns its buffers
        return
    for name, t in inputs:
        if may_share_memory(out, t):
            check.fail(f"out shares memory with {name}; the kernels read the inputs while writing out, so out "
                       f"must not overlap an input")


def query_concat(queries: Tensor, feats: Tensor, out: Optional[Tensor] = None) -> tuple:
    """-> the output shape (B, Q+N, C)."""
    check = public("query_concat")
    shape = query_concat_shape(check, queries, feats)
    _public_out(check, out, shape, feats, [("queries", queries), ("feats", feats)])
    return shape


def adapter_add(adapter: Tensor, visual_query: Tensor, out: Optional[Tensor] = None) -> tuple:
    """-> the output shape (L, B, Q, D)."""
    check = public("adapter_add")
    shape = adapter_add_shape(check, adapter, visual_query)
    _public_out(check, out, shape, visual_query, [("adapter", adapter), ("visual_query", visual_query)])
    return shape


def adapter_attention(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor]) -> tuple:
    """-> the output shape (B, H, T, hd)."""
    return adapter_attention_shape(public("adapter_attention"), xq, k_t, v, gate, new_gate)
