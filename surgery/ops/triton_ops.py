"""Triton kernels of the three fused ops, registered as torch ops that `torch.compile` can see.

Ops (namespace `surgery`, defined here with `torch.library.triton_op`; the C++ schemas of
docs/kernels.md are separate ops with other names):

    surgery::query_concat_triton(Tensor queries, Tensor feats) -> Tensor
    surgery::query_concat_triton_out(Tensor queries, Tensor feats, Tensor(a!) out) -> ()
    surgery::adapter_add_triton(Tensor adapter, Tensor visual_query) -> Tensor
    surgery::adapter_add_triton_out(Tensor adapter, Tensor visual_query, Tensor(a!) out) -> ()
    surgery::adapter_attention_triton(Tensor xq, Tensor k_t, Tensor v, Tensor gate, Tensor? new_gate) -> Tensor

(torch before 2.15 ignores the explicit schemas of the `_out` ops and shows `Tensor(a2!) out`.)

This module is the Triton backend only: kernels, launches, the ops' bodies and `available()`.
Each op's fake and autograd formula are its own module's (query_concat_op.py, ...), registered
here as for the compiled ops; the functional ops have autograd, the `_out` ops mutate `out` and
have none (as torch's own `out=` functions). The inputs are checked by the public functions
(`surgery.ops.<op>(..., backend="triton")`); the ops themselves launch unchecked.

Kernels (all read their inputs through strides: sliced, transposed or expanded inputs are
used in place, never copied; outputs are allocated contiguous, `out=` must be contiguous):

* `query_concat`: a 2-D grid of (rows, channels) tiles over the output viewed as
  (B*(Q+N), C); each row reads from `queries` (r < Q) or `feats` (r >= Q) with two masked loads.
* `adapter_add`: the same tiling over the output viewed as (L*B*Q, D); one add per element,
  computed in fp32 and rounded once to the dtype (what eager torch does for bf16/fp16).
* `adapter_attention`: one program per (b, h, block of BLOCK_T query rows); the whole head dim
  (BLOCK_D = next_power_of_2(hd) >= 16) lives in registers, the Q adapter tokens are walked in
  blocks of BLOCK_Q (<= 64) with an online softmax, all in fp32 (`tl.dot` with fp32
  accumulation; fp32 operands use input_precision="ieee", not TF32), gates applied in fp32,
  one rounding to the output dtype at the store. Q and hd may be any size (masks).
  Index arithmetic is int64 (no overflow for large tensors).

Where it runs (`available(device, dtype)`): CUDA tensors when triton imports; CPU tensors only
when these kernels were defined under `TRITON_INTERPRET=1` (set before importing triton and
this module), and then float32 only (the interpreter has no bf16 arithmetic). Importing this
module never fails and never initialises CUDA: without triton the ops are not registered and
`surgery.ops` refuses the backend with `BackendUnavailableError` saying why.

Under the interpreter the ops are registered as opaque custom ops (the ops' fakes, no
decomposition into the kernels), because `wrap_triton` cannot trace an interpreted kernel:
`torch.compile` then calls the op as an extern kernel, which the interpreter runs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import adapter_add_op, adapter_attention_op, query_concat_op

try:
    import triton
    import triton.language as tl

    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken install failing at import time
    triton = None
    tl = None
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

INTERPRETER_REASON = "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
INTERPRETER_DTYPE_REASON = ("Triton's interpreter (TRITON_INTERPRET=1) computes in float32 only (it has no "
                            "bfloat16/float16 arithmetic); got {dtype}: use float32 tensors, a GPU, or another backend")

__all__ = ["INTERPRETED", "INTERPRETER_REASON", "available"]


# -- kernels -------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _query_concat_kernel(
        q_ptr, f_ptr, o_ptr,
        Q, N, C, ROWS,  # ROWS = B * (Q + N)
        sq_q, sq_c,
        sf_b, sf_n, sf_c,
        so_b, so_r, so_c,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) of B*(Q+N)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) of C
        R = Q + N
        b = rows // R
        r = rows % R
        is_q = r < Q
        ok = (rows < ROWS)[:, None] & (cols < C)[None, :]  # (BLOCK_R, BLOCK_C)
        x_q = tl.load(q_ptr + r[:, None] * sq_q + cols[None, :] * sq_c, mask=ok & is_q[:, None])
        x_f = tl.load(f_ptr + b[:, None] * sf_b + (r - Q)[:, None] * sf_n + cols[None, :] * sf_c,
                      mask=ok & (~is_q)[:, None])
        x = tl.where(is_q[:, None], x_q, x_f)
        tl.store(o_ptr + b[:, None] * so_b + r[:, None] * so_r + cols[None, :] * so_c, x, mask=ok)

    @triton.jit
    def _adapter_add_kernel(
        a_ptr, v_ptr, o_ptr,
        B, Q, D, ROWS,  # ROWS = L * B * Q
        sa_l, sa_q, sa_d,
        sv_b, sv_q, sv_d,
        so_l, so_b, so_q, so_d,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) of L*B*Q
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) of D
        layer = rows // (B * Q)
        b = (rows // Q) % B
        q = rows % Q
        ok = (rows < ROWS)[:, None] & (cols < D)[None, :]
        a = tl.load(a_ptr + layer[:, None] * sa_l + q[:, None] * sa_q + cols[None, :] * sa_d, mask=ok)
        v = tl.load(v_ptr + b[:, None] * sv_b + q[:, None] * sv_q + cols[None, :] * sv_d, mask=ok)
        y = (a.to(tl.float32) + v.to(tl.float32)).to(o_ptr.dtype.element_ty)  # one rounding, as eager
        tl.store(o_ptr + layer[:, None] * so_l + b[:, None] * so_b + q[:, None] * so_q + cols[None, :] * so_d,
                 y, mask=ok)

    @triton.jit
    def _adapter_attention_kernel(
        x_ptr, k_ptr, v_ptr, g_ptr, ng_ptr, o_ptr,
        H, T, Q, HD, sm_scale,
        sx_b, sx_h, sx_t, sx_d,
        sk_b, sk_h, sk_d, sk_q,
        sv_b, sv_h, sv_q, sv_d,
        sg_h,
        so_b, so_h, so_t, so_d,
        HAS_NEW_GATE: tl.constexpr, FP32_INPUTS: tl.constexpr, Q_BLOCKS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // H
        h = pid_bh % H
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        t_ok = t < T
        d_ok = d < HD
        x = tl.load(x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t + d[None, :] * sx_d,
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_T, BLOCK_D)
        m_i = tl.full((BLOCK_T,), float("-inf"), tl.float32)  # running max of the scores
        l_i = tl.zeros((BLOCK_T,), tl.float32)  # running sum of exp(score - max)
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)  # running sum of exp(score - max) * v
        # a constexpr trip count (not range(0, Q, BLOCK_Q)): triton 3.6's interpreter cannot take a
        # runtime bound with numpy 2 ("only 0-dimensional arrays can be converted to Python scalars")
        for i in range(Q_BLOCKS):
            q = i * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
            q_ok = q < Q
            kt = tl.load(k_ptr + b * sk_b + h * sk_h + d[:, None] * sk_d + q[None, :] * sk_q,
                         mask=d_ok[:, None] & q_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_Q)
            if FP32_INPUTS:
                s = tl.dot(x, kt, input_precision="ieee")  # (BLOCK_T, BLOCK_Q) fp32
            else:
                s = tl.dot(x, kt)  # bf16/fp16 products are exact in the fp32 accumulator
            # cast: torch < 2.15's inductor passes a Python float to a user kernel as fp64
            s = tl.where(q_ok[None, :], (s * sm_scale).to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a valid column
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])  # (BLOCK_T, BLOCK_Q) fp32, 0 on masked columns
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(v_ptr + b * sv_b + h * sv_h + q[:, None] * sv_q + d[None, :] * sv_d,
                         mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_D)
            acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision="ieee")
            m_i = m_new
        g = tl.load(g_ptr + h * sg_h).to(tl.float32)
        if HAS_NEW_GATE:
            g = g * tl.load(ng_ptr).to(tl.float32)
        y = acc * (g / l_i)[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + t[:, None] * so_t + d[None, :] * so_d,
                 y.to(o_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])

    def _interpreted(kernel) -> bool:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            return False
        return isinstance(kernel, InterpretedFunction)

    INTERPRETED = _interpreted(_query_concat_kernel)
else:
    INTERPRETED = False
"""True when the kernels were defined under TRITON_INTERPRET=1 (they run on CPU tensors, fp32 only)."""


def wrap_triton(kernel):
    """`torch.library.wrap_triton`, except that an interpreted kernel is launched as it is (torch
    before 2.15 refuses to wrap one). Named so, and called with the kernel's global name, so that
    `triton_op` finds the kernels in the op bodies (for torch.compile's cache keys)."""
    if INTERPRETED:
        return kernel
    return torch.library.wrap_triton(kernel)


# -- block sizes ---------------------------------------------------------------------------------

_TILE = 4096  # elements per program of the copy/add kernels (16 KiB of fp32)


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def _rows_cols_blocks(rows: int, cols: int) -> tuple[int, int]:
    block_c = min(_next_pow2(cols), 1024)
    block_r = max(1, min(_next_pow2(rows), _TILE // block_c))
    return block_r, block_c


def _attention_blocks(T: int, Q: int, hd: int) -> tuple[int, int, int, int]:
    """BLOCK_T, BLOCK_Q, BLOCK_D (all >= 16, tl.dot's minimum) and num_warps."""
    block_d = max(16, _next_pow2(hd))
    block_t = max(16, min(64 if block_d <= 128 else 32 if block_d <= 256 else 16, _next_pow2(T)))
    block_q = max(16, min(64 if block_d <= 128 else 32, _next_pow2(Q)))
    return block_t, block_q, block_d, (4 if block_d <= 128 else 8)


# -- the ops -------------------------------------------------------------------------------------
# The op bodies only allocate, compute launch parameters and launch (make_fx-traceable, as
# triton_op requires): the inputs were checked by the public functions (surgery.ops). Each op's
# fake and autograd are its own module's (query_concat_op.py, ...), as for the compiled ops.


def _launch_query_concat(queries: Tensor, feats: Tensor, out: Tensor) -> None:
    Q, C = queries.shape
    B, N, _ = feats.shape
    rows = B * (Q + N)
    block_r, block_c = _rows_cols_blocks(rows, C)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(C, block_c))
    wrap_triton(_query_concat_kernel)[grid](
        queries, feats, out,
        Q, N, C, rows,
        queries.stride(0), queries.stride(1),
        feats.stride(0), feats.stride(1), feats.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )


def _table(adapter: Tensor, visual_query: Tensor) -> Tensor:
    """(L, Q, D) view of an adapter given as (L, Q, D) or (L*Q, D) (splitting dim 0 is always a view)."""
    if adapter.dim() == 3:
        return adapter
    return adapter.unflatten(0, (-1, visual_query.shape[1]))


def _launch_adapter_add(adapter: Tensor, visual_query: Tensor, out: Tensor) -> None:
    table = _table(adapter, visual_query)  # (L, Q, D)
    L = table.shape[0]
    B, Q, D = visual_query.shape
    rows = L * B * Q
    block_r, block_d = _rows_cols_blocks(rows, D)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(D, block_d))
    wrap_triton(_adapter_add_kernel)[grid](
        table, visual_query, out,
        B, Q, D, rows,
        table.stride(0), table.stride(1), table.stride(2),
        visual_query.stride(0), visual_query.stride(1), visual_query.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )


def _launch_adapter_attention(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor],
                              out: Tensor) -> None:
    B, H, T, hd = xq.shape
    Q = v.shape[2]
    block_t, block_q, block_d, warps = _attention_blocks(T, Q, hd)
    grid = (triton.cdiv(T, block_t), B * H)
    wrap_triton(_adapter_attention_kernel)[grid](
        xq, k_t, v, gate, gate if new_gate is None else new_gate, out,
        H, T, Q, hd, 1.0 / math.sqrt(int(hd)),
        xq.stride(0), xq.stride(1), xq.stride(2), xq.stride(3),
        k_t.stride(0), k_t.stride(1), k_t.stride(2), k_t.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        gate.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        HAS_NEW_GATE=new_gate is not None, FP32_INPUTS=xq.dtype == torch.float32,
        Q_BLOCKS=triton.cdiv(int(Q), block_q),
        BLOCK_T=block_t, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=warps,
    )


if triton is not None:

    @torch.library.triton_op("surgery::query_concat_triton", mutates_args=())
    def _query_concat_op(queries: Tensor, feats: Tensor) -> Tensor:
        B, N, C = feats.shape
        out = feats.new_empty((B, queries.shape[0] + N, C))
        _launch_query_concat(queries, feats, out)
        return out

    @torch.library.triton_op("surgery::query_concat_triton_out", mutates_args=("out",),
                             schema="(Tensor queries, Tensor feats, Tensor(a!) out) -> ()")
    def _query_concat_out_op(queries: Tensor, feats: Tensor, out: Tensor) -> None:
        _launch_query_concat(queries, feats, out)

    @torch.library.triton_op("surgery::adapter_add_triton", mutates_args=())
    def _adapter_add_op(adapter: Tensor, visual_query: Tensor) -> Tensor:
        B, Q, D = visual_query.shape
        out = visual_query.new_empty((adapter.numel() // (Q * D), B, Q, D))
        _launch_adapter_add(adapter, visual_query, out)
        return out

    @torch.library.triton_op("surgery::adapter_add_triton_out", mutates_args=("out",),
                             schema="(Tensor adapter, Tensor visual_query, Tensor(a!) out) -> ()")
    def _adapter_add_out_op(adapter: Tensor, visual_query: Tensor, out: Tensor) -> None:
        _launch_adapter_add(adapter, visual_query, out)

    @torch.library.triton_op("surgery::adapter_attention_triton", mutates_args=())
    def _adapter_attention_op(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor,
                              new_gate: Optional[Tensor]) -> Tensor:
        out = xq.new_empty(xq.shape)  # (B, H, T, hd), contiguous
        _launch_adapter_attention(xq, k_t, v, gate, new_gate, out)
        return out

    if INTERPRETED:
        # wrap_triton hands an interpreted kernel back unwrapped, so tracing the op bodies would run
        # numpy on fake tensors: keep the ops opaque (the ops' own fakes, no functional decomposition).
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        def _opaque(mode, op, types, args, kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)

        def _returning_nothing(fake_out):  # the _out ops return () (a custom op cannot return an alias)
            def fake(*args) -> None:
                fake_out(*args)

            return fake

        for _defined, _fake in ((_query_concat_op, query_concat_op.fake),
                                (_query_concat_out_op, _returning_nothing(query_concat_op.fake_out)),
                                (_adapter_add_op, adapter_add_op.fake),
                                (_adapter_add_out_op, _returning_nothing(adapter_add_op.fake_out)),
                                (_adapter_attention_op, adapter_attention_op.fake)):
            _defined.register_fake(_fake)
            _defined.register_torch_dispatch(FunctionalTensorMode, _opaque)

    for _defined, _op in ((_query_concat_op, query_concat_op), (_adapter_add_op, adapter_add_op),
                          (_adapter_attention_op, adapter_attention_op)):
        _defined.register_autograd(_op.backward, setup_context=_op.setup_context)


# -- where the kernels run -----------------------------------------------------------------------


def available(device: torch.device, dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of `device` (and `dtype`, if given) here, and why not."""
    device = torch.device(device)
    if triton is None:
        return False, f"triton cannot be imported: {_TRITON_ERROR}"
    if INTERPRETED:
        if device.type != "cpu":
            return False, (f"the Triton kernels were defined under TRITON_INTERPRET=1 (the interpreter) in this "
                           f"process; they run on CPU tensors, not {device.type}")
        if dtype is not None and dtype != torch.float32:
            return False, INTERPRETER_DTYPE_REASON.format(dtype=dtype)
        return True, ""
    if device.type == "cpu":
        return False, INTERPRETER_REASON
    if device.type != "cuda":
        return False, f"the Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device.type}"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available (torch.cuda.is_available() is False)"
    if dtype == torch.bfloat16 and torch.version.hip is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(index) < (8, 0):
            return False, "bfloat16 Triton kernels need a GPU of compute capability 8.0 or newer"
    return True, ""
