"""The Triton backend (`surgery/ops/triton_ops.py`) against the eager reference.

Two runs of this one file:

* the normal run (`python -m pytest`): GPU tests (float32/bfloat16/float16 on CUDA; skipped
  without a GPU), the import guard (a subprocess where triton cannot be imported), CPU refusal
  without the interpreter, and `test_interpreter_suite`, which runs this file again in a
  subprocess under `TRITON_INTERPRET=1` (it must be set before triton is first imported, and
  torch/timm may already have imported it in this process);
* that inner run (`SURGERY_TRITON_INNER=1 TRITON_INTERPRET=1`): the same op tests on CPU in
  float32, plus interpreter-only checks. To run it by hand:
  `SURGERY_TRITON_INNER=1 TRITON_INTERPRET=1 python -m pytest tests/ops/test_triton.py --noconftest`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from surgery.errors import BackendUnavailableError, OpInputError
from surgery.ops import reference as R
from surgery.ops import triton_ops as T

CUDA_INITIALISED_BY_IMPORT = torch.cuda.is_initialized()  # (this module is imported first in the inner run)
INNER = os.environ.get("SURGERY_TRITON_INNER") == "1"
ROOT = Path(__file__).resolve().parents[2]

if INNER:
    if not T.INTERPRETED:
        pytest.exit("SURGERY_TRITON_INNER=1 needs TRITON_INTERPRET=1 set before triton is imported", returncode=3)
    DEVICE_DTYPES = [("cpu", torch.float32)]
else:
    _gpu = torch.cuda.is_available() and T.triton is not None and not T.INTERPRETED
    _skip = pytest.mark.skipif(not _gpu, reason="needs a CUDA GPU and triton (not the interpreter)")
    DEVICE_DTYPES = [pytest.param("cuda", dt, marks=_skip, id=f"cuda-{str(dt)[6:]}")
                     for dt in (torch.float32, torch.bfloat16, torch.float16)]


def dd(f):
    return pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)(f)


def maker(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return r


# Tolerances of the attention against the fp32 truth: a single rounding to the dtype.
ATOL_RTOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (1e-4, 2**-7), torch.float16: (1e-5, 2**-10)}


# -- query_concat --------------------------------------------------------------------------------

QC_SHAPES = [(1, 1, 1, 1), (3, 5, 2, 17), (1, 7, 1, 1030), (10, 257, 3, 64), (5, 3, 4, 1537)]  # Q, N, B, C


@dd
@pytest.mark.parametrize("Q,N,B,C", QC_SHAPES)
def test_query_concat_matches_reference_exactly(device, dtype, Q, N, B, C):
    r = maker(device, dtype)
    q, f = r(Q, C), r(B, N, C)
    got = T.query_concat(q, f)
    assert got.shape == (B, Q + N, C) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, R.query_concat(q, f))


@dd
def test_query_concat_strided_inputs(device, dtype):
    r = maker(device, dtype)
    Q, N, B, C = 6, 9, 3, 130
    inputs = {
        "transposed": (r(C, Q).t(), r(B, C, N).transpose(1, 2)),
        "sliced": (r(2 * Q, C + 5)[::2, 3:C + 3], r(B + 1, 2 * N, C + 1)[1:, 1::2, :C]),
        "expanded": (r(1, C).expand(Q, C), r(1, N, C).expand(B, N, C)),
    }
    for name, (q, f) in inputs.items():
        assert not q.is_contiguous() and not f.is_contiguous(), name
        assert torch.equal(T.query_concat(q, f), R.query_concat(q, f)), name


@dd
def test_query_concat_out(device, dtype):
    r = maker(device, dtype)
    q, f = r(4, 33), r(2, 7, 33)
    out = torch.full((2, 11, 33), float("nan"), device=device, dtype=dtype)
    assert T.query_concat(q, f, out=out) is out
    assert torch.equal(out, R.query_concat(q, f))
    buffer = torch.zeros(3, 2, 11, 33, device=device, dtype=dtype)
    T.query_concat(q.t().contiguous().t(), f, out=buffer[1])  # a contiguous slice of a bigger buffer
    assert torch.equal(buffer[1], R.query_concat(q, f))
    assert not buffer[0].any() and not buffer[2].any()


# -- adapter_add ---------------------------------------------------------------------------------

AA_SHAPES = [(1, 1, 1, 1), (3, 2, 5, 17), (1, 1, 10, 1030), (4, 3, 1, 2049), (30, 2, 10, 96)]  # L, B, Q, D


@dd
@pytest.mark.parametrize("L,B,Q,D", AA_SHAPES)
@pytest.mark.parametrize("flat", [False, True])
def test_adapter_add_matches_reference_exactly(device, dtype, L, B, Q, D, flat):
    r = maker(device, dtype)
    adapter, vq = r(L, Q, D), r(B, Q, D)
    if flat:
        adapter = adapter.reshape(L * Q, D)
    got = T.adapter_add(adapter, vq)
    assert got.shape == (L, B, Q, D) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, R.adapter_add(adapter, vq))


@dd
def test_adapter_add_strided_inputs(device, dtype):
    r = maker(device, dtype)
    L, B, Q, D = 3, 2, 5, 70
    inputs = {
        "transposed": (r(L, D, Q).transpose(1, 2), r(D, B, Q).permute(1, 2, 0)),
        "sliced": (r(L * Q, 2 * D)[:, ::2], r(B, Q + 2, D + 3)[:, 2:, 1:D + 1]),
        "flat transposed": (r(D, L * Q).t(), r(B, Q, D)),
        "expanded": (r(1, Q, D).expand(L, Q, D), r(1, Q, D).expand(B, Q, D)),
    }
    for name, (a, v) in inputs.items():
        assert not (a.is_contiguous() and v.is_contiguous()), name
        assert torch.equal(T.adapter_add(a, v), R.adapter_add(a, v)), name


@dd
@pytest.mark.parametrize("flat", [False, True])
def test_adapter_add_out(device, dtype, flat):
    r = maker(device, dtype)
    adapter, vq = r(4, 3, 19), r(2, 3, 19)
    if flat:
        adapter = adapter.reshape(12, 19)
    out = torch.full((4, 2, 3, 19), float("nan"), device=device, dtype=dtype)
    assert T.adapter_add(adapter, vq, out=out) is out
    assert torch.equal(out, R.adapter_add(adapter, vq))


# -- adapter_attention ---------------------------------------------------------------------------

# B, H, T, hd, Q: decode (T=1), Q=1, hd and Q not powers of two, Q over several BLOCK_Q, T over several BLOCK_T
ATT_SHAPES = [(1, 1, 1, 16, 1), (2, 3, 7, 24, 10), (1, 2, 40, 20, 150), (2, 4, 1, 128, 10), (1, 1, 70, 80, 17),
              (1, 2, 3, 200, 5)]


def attention_inputs(r, B, H, T_, hd, Q):
    return r(B, H, T_, hd), r(B, H, hd, Q), r(B, H, Q, hd), r(1, H, 1, 1).tanh(), r(1, 1, 1, 1)


def fp32_truth(xq, k_t, v, gate, new_gate):
    return R.adapter_attention(xq.float(), k_t.float(), v.float(), gate.float(),
                               None if new_gate is None else new_gate.float())


def assert_attention_close(got, args):
    dtype = args[0].dtype
    truth = fp32_truth(*args)
    assert got.dtype == dtype and got.shape == truth.shape
    atol, rtol = ATOL_RTOL[dtype]
    torch.testing.assert_close(got.float(), truth, atol=atol, rtol=rtol)
    if dtype != torch.float32:
        # one rounding of the fp32 result: every element within half an ulp of the truth (plus fp32 noise),
        # and never further from it than the eager reference (which rounds scores and probabilities too)
        bound = truth.abs() * (torch.finfo(dtype).eps / 2 + 1e-5) + 1e-6
        assert ((got.float() - truth).abs() <= bound).all()
        eager = R.adapter_attention(*args).float()
        assert (got.float() - truth).abs().max() <= (eager - truth).abs().max() + 1e-6


@dd
@pytest.mark.parametrize("B,H,T_,hd,Q", ATT_SHAPES)
@pytest.mark.parametrize("with_new_gate", [True, False])
def test_adapter_attention_matches_reference(device, dtype, B, H, T_, hd, Q, with_new_gate):
    r = maker(device, dtype)
    xq, k_t, v, gate, new_gate = attention_inputs(r, B, H, T_, hd, Q)
    args = (xq, k_t, v, gate, new_gate if with_new_gate else None)
    got = T.adapter_attention(*args)
    assert got.is_contiguous()
    assert_attention_close(got, args)


@dd
def test_adapter_attention_strided_inputs(device, dtype):
    """The layouts the model produces: xq from (B, T, H, hd), k_t a transposed view, per-image
    keys/values expanded over the batch, gates sliced out of bigger tensors."""
    r = maker(device, dtype)
    B, H, T_, hd, Q = 2, 3, 5, 24, 10
    xq = r(B, T_, H, hd).transpose(1, 2)  # (B, H, T, hd)
    k_t = r(1, H, Q, hd).transpose(-1, -2).expand(B, H, hd, Q)
    v = r(1, H, Q, hd + 8)[..., 4:hd + 4].expand(B, H, Q, hd)
    gate = r(2, 2 * H, 1, 1).tanh()[1:, ::2]  # (1, H, 1, 1), stride 2 over the heads
    new_gate = r(3, 1, 1, 1)[2:]
    for t in (xq, k_t, v, gate):
        assert not t.is_contiguous()
    assert_attention_close(T.adapter_attention(xq, k_t, v, gate, new_gate), (xq, k_t, v, gate, new_gate))


def test_adapter_attention_softmax_is_stable():
    """Scores far beyond exp's range: the online softmax subtracts the running max."""
    device, dtype = DEVICE_DTYPES[0] if INNER else ("cuda", torch.float32)
    if not INNER and not _gpu:
        pytest.skip("needs a CUDA GPU and triton (not the interpreter)")
    r = maker(device, dtype)
    xq, k_t, v, gate, new_gate = attention_inputs(r, 1, 2, 3, 16, 100)
    xq, k_t = xq * 30, k_t * 30  # scores of order 900 / 4
    got = T.adapter_attention(xq, k_t, v, gate, new_gate)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, fp32_truth(xq, k_t, v, gate, new_gate), atol=1e-5, rtol=1e-5)


# -- gradients -----------------------------------------------------------------------------------


def grads_of(fn, args, grad_out):
    args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    out = fn(*args)
    out.backward(grad_out)
    return out, [a.grad if a is not None else None for a in args]


def grad_tolerance(dtype):
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@dd
@pytest.mark.parametrize("flat", [False, True])
def test_gradients_of_the_copy_ops_match_reference(device, dtype, flat):
    r = maker(device, dtype)
    q, f = r(3, 20), r(2, 5, 20)
    g = maker(device, dtype, seed=1)(2, 8, 20)
    _, got = grads_of(T.query_concat, (q, f), g)
    _, want = grads_of(R.query_concat, (q, f), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **grad_tolerance(dtype))
    adapter, vq = r(4, 3, 20), r(2, 3, 20)
    if flat:
        adapter = adapter.reshape(12, 20)
    g = maker(device, dtype, seed=2)(4, 2, 3, 20)
    _, got = grads_of(T.adapter_add, (adapter, vq), g)
    _, want = grads_of(R.adapter_add, (adapter, vq), g)
    assert got[0].shape == adapter.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **grad_tolerance(dtype))


@dd
@pytest.mark.parametrize("with_new_gate", [True, False])
@pytest.mark.parametrize("B,H,T_,hd,Q", [(2, 3, 7, 24, 10), (1, 2, 20, 16, 70)])
def test_adapter_attention_gradients_match_reference(device, dtype, with_new_gate, B, H, T_, hd, Q):
    r = maker(device, dtype)
    xq, k_t, v, gate, new_gate = attention_inputs(r, B, H, T_, hd, Q)
    args = (xq, k_t, v, gate, new_gate if with_new_gate else None)
    g = maker(device, dtype, seed=3)(B, H, T_, hd)
    _, got = grads_of(T.adapter_attention, args, g)
    # the truth: autograd through the reference in fp32
    _, want = grads_of(R.adapter_attention, [a.float() if a is not None else None for a in args], g.float())
    for name, a, b in zip(("xq", "k_t", "v", "gate", "new_gate"), got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        scale = b.abs().max().item()
        tol = grad_tolerance(dtype)
        torch.testing.assert_close(a.float(), b, atol=tol["atol"] * max(1.0, scale), rtol=tol["rtol"], msg=name)


@dd
def test_adapter_attention_gradient_of_some_inputs_only(device, dtype):
    r = maker(device, dtype)
    xq, k_t, v, gate, new_gate = attention_inputs(r, 1, 2, 4, 16, 6)
    xq.requires_grad_()
    out = T.adapter_attention(xq, k_t, v, gate, new_gate)
    (grad,) = torch.autograd.grad(out.sum(), [xq])
    ref_x = xq.detach().float().requires_grad_()
    R.adapter_attention(ref_x, k_t.float(), v.float(), gate.float(), new_gate.float()).sum().backward()
    torch.testing.assert_close(grad.float(), ref_x.grad, **grad_tolerance(dtype))


@dd
def test_out_refuses_inputs_that_need_grad(device, dtype):
    r = maker(device, dtype)
    q, f = r(3, 8).requires_grad_(), r(2, 5, 8)
    with pytest.raises(OpInputError, match="out= does not support automatic differentiation"):
        T.query_concat(q, f, out=torch.empty(2, 8, 8, device=device, dtype=dtype))
    with torch.no_grad():
        out = T.query_concat(q, f, out=torch.empty(2, 8, 8, device=device, dtype=dtype))
    assert torch.equal(out, R.query_concat(q, f).detach())
    a, v = r(2, 3, 8), r(1, 3, 8).requires_grad_()
    with pytest.raises(OpInputError, match="out= does not support automatic differentiation"):
        T.adapter_add(a, v, out=torch.empty(2, 1, 3, 8, device=device, dtype=dtype))


# -- torch.library: opcheck and torch.compile ----------------------------------------------------


def op_cases(device, dtype):
    r = maker(device, dtype)
    e = lambda *s: torch.empty(*s, device=device, dtype=dtype)  # noqa: E731
    return [
        (T._query_concat_op, (r(3, 17), r(2, 5, 17))),
        (T._query_concat_op, (r(17, 3).t(), r(2, 17, 5).transpose(1, 2))),
        (T._query_concat_out_op, (r(3, 17), r(2, 5, 17), e(2, 8, 17))),
        (T._adapter_add_op, (r(4, 3, 17), r(2, 3, 17))),
        (T._adapter_add_op, (r(12, 17), r(2, 3, 17))),
        (T._adapter_add_out_op, (r(12, 17), r(2, 3, 17), e(4, 2, 3, 17))),
        (T._adapter_attention_op, attention_inputs(r, 2, 3, 5, 24, 10)),
        (T._adapter_attention_op, attention_inputs(r, 1, 2, 3, 16, 7)[:4] + (None,)),
    ]


@dd
def test_opcheck(device, dtype):
    """test_schema, test_autograd_registration, test_faketensor and test_aot_dispatch_dynamic: all pass,
    under the interpreter too (there the ops are opaque, with shape-only fake kernels)."""
    for op, args in op_cases(device, dtype):
        mutating = op in (T._query_concat_out_op, T._adapter_add_out_op)
        if not mutating and dtype == torch.float32:
            args = tuple(a.requires_grad_() if a is not None else None for a in args)
        result = torch.library.opcheck(op, args, raise_exception=False)
        assert set(result) >= {"test_schema", "test_autograd_registration", "test_faketensor",
                               "test_aot_dispatch_dynamic"}
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_ops_are_registered_under_their_names():
    for name in ("query_concat_triton", "query_concat_triton_out", "adapter_add_triton", "adapter_add_triton_out",
                 "adapter_attention_triton"):
        assert hasattr(torch.ops.surgery, name), name
    schema = str(torch.ops.surgery.query_concat_triton_out.default._schema)
    assert re.search(r"Tensor\(a\d*!\) out\) -> \(\)$", schema), schema


@dd
def test_torch_compile_fullgraph(device, dtype):
    r = maker(device, dtype)
    q, f = r(3, 17), r(2, 5, 17)
    adapter, vq = r(12, 17), r(2, 3, 17)
    att = attention_inputs(r, 2, 3, 5, 24, 10)

    def fn(q, f, adapter, vq, xq, k_t, v, gate, new_gate):
        return T.query_concat(q, f), T.adapter_add(adapter, vq), T.adapter_attention(xq, k_t, v, gate, new_gate)

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(q, f, adapter, vq, *att)
    assert torch.equal(got[0], R.query_concat(q, f))
    assert torch.equal(got[1], R.adapter_add(adapter, vq))
    assert_attention_close(got[2], att)

    def with_out(q, f, out):
        return T.query_concat(q, f, out=out)

    out = torch.empty(2, 8, 17, device=device, dtype=dtype)
    torch.compile(with_out, fullgraph=True)(q, f, out)
    assert torch.equal(out, R.query_concat(q, f))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES[:1])
def test_torch_compile_backward(device, dtype):
    r = maker(device, dtype)
    args = attention_inputs(r, 1, 2, 3, 16, 7)

    def fn(xq, k_t, v, gate, new_gate):
        return T.adapter_attention(xq, k_t, v, gate, new_gate)

    torch._dynamo.reset()
    g = maker(device, dtype, seed=4)(1, 2, 3, 16)
    _, got = grads_of(torch.compile(fn, fullgraph=True), args, g)
    _, want = grads_of(R.adapter_attention, args, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# -- bad input -----------------------------------------------------------------------------------


@dd
def test_bad_input_is_refused_clearly(device, dtype):
    r = maker(device, dtype)
    cases = [
        (lambda: T.query_concat(r(3, 8), r(2, 5, 9)), "C=8 channels but feats have C=9"),
        (lambda: T.query_concat(r(3, 8, 1), r(2, 5, 8)), r"queries has shape \[3, 8, 1\] \(3 dimensions\); expected \(Q, C\)"),
        (lambda: T.query_concat(r(3, 8), r(2, 5, 8).double()), "feats is float64"),
        (lambda: T.query_concat(r(3, 8).long(), r(2, 5, 8).long()), "allowed dtypes"),
        (lambda: T.query_concat(r(0, 8), r(2, 5, 8)), "queries is empty"),
        (lambda: T.query_concat(r(3, 8), r(2, 5, 8), out=r(2, 8, 9)), r"out is \[2, 8, 9\]"),
        (lambda: T.query_concat(r(3, 8), r(2, 5, 8), out=r(2, 8, 16)[..., ::2]), "out must be contiguous"),
        (lambda: T.adapter_add(r(4, 3, 8), r(2, 5, 8)), "Q=3 tokens per layer but visual_query has Q=5"),
        (lambda: T.adapter_add(r(13, 8), r(2, 3, 8)), "13 rows is not a multiple"),
        (lambda: T.adapter_add(r(4, 3, 8), r(2, 3, 7)), "D=8 but visual_query has D=7"),
        (lambda: T.adapter_add(r(4, 3, 8), r(2, 3, 8), out=r(4, 2, 3, 9)), r"out is \[4, 2, 3, 9\]"),
        (lambda: T.adapter_attention(*attention_inputs(r, 2, 3, 5, 16, 4)[:2], r(2, 3, 5, 16), r(1, 3, 1, 1)),
         "k_t must be"),
        (lambda: T.adapter_attention(*attention_inputs(r, 2, 3, 5, 16, 4)[:3], r(1, 2, 1, 1)), "gate must be"),
        (lambda: T.adapter_attention(*attention_inputs(r, 2, 3, 5, 16, 4)[:4], r(1, 1, 1, 2)), "new_gate must be"),
        (lambda: T.adapter_attention(r(2, 3, 16), r(2, 3, 16, 4), r(2, 3, 4, 16), r(1, 3, 1, 1)), "xq has shape"),
    ]
    for call, message in cases:
        with pytest.raises(OpInputError, match=message):
            call()


# -- interpreter-only and normal-run-only checks -------------------------------------------------

if INNER:

    def test_available_under_the_interpreter():
        assert T.available(torch.device("cpu")) == (True, "")
        assert T.available(torch.device("cpu"), torch.float32) == (True, "")
        ok, why = T.available(torch.device("cpu"), torch.bfloat16)
        assert not ok and "float32 only" in why
        ok, why = T.available(torch.device("cuda"))
        assert not ok and "TRITON_INTERPRET=1" in why

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_precision_is_refused_under_the_interpreter(dtype):
        r = maker("cpu", dtype)
        calls = [lambda: T.query_concat(r(3, 8), r(2, 5, 8)), lambda: T.adapter_add(r(4, 3, 8), r(2, 3, 8)),
                 lambda: T.adapter_attention(*attention_inputs(r, 1, 2, 3, 16, 4))]
        for call in calls:
            with pytest.raises(BackendUnavailableError, match="float32 only"):
                call()

    def test_importing_did_not_initialise_cuda():
        assert not CUDA_INITIALISED_BY_IMPORT

else:

    def test_interpreter_suite():
        """This file again, in a fresh process with TRITON_INTERPRET=1: every op test on CPU in float32."""
        env = dict(os.environ, TRITON_INTERPRET="1", SURGERY_TRITON_INNER="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "--noconftest",
             "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        tail = (proc.stdout + proc.stderr)[-6000:]
        assert proc.returncode == 0, tail
        assert " passed" in proc.stdout and " failed" not in proc.stdout, tail

    IMPORT_SCRIPTS = {
        "without triton": """
            import sys
            sys.modules["triton"] = None  # import triton -> ImportError
            import torch
            from surgery.errors import BackendUnavailableError
            from surgery.ops import triton_ops as T
            assert not torch.cuda.is_initialized()
            ok, why = T.available(torch.device("cuda"))
            assert not ok and "triton cannot be imported" in why, why
            assert not hasattr(torch.ops.surgery, "query_concat_triton")
            try:
                T.query_concat(torch.zeros(2, 3), torch.zeros(1, 4, 3))
            except BackendUnavailableError as exc:
                assert "triton cannot be imported" in str(exc), exc
            else:
                raise AssertionError("no error")
            assert not torch.cuda.is_initialized()
            print("OK")
        """,
        "with triton": """
            import torch
            from surgery.ops import triton_ops as T
            assert not torch.cuda.is_initialized()
            assert T.triton is None or hasattr(torch.ops.surgery, "adapter_attention_triton")
            T.available(torch.device("cpu"))
            assert not torch.cuda.is_initialized()
            print("OK")
        """,
    }

    @pytest.mark.parametrize("case", sorted(IMPORT_SCRIPTS))
    def test_import_does_not_fail_or_initialise_cuda(case):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(IMPORT_SCRIPTS[case])], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr

    @pytest.mark.skipif(T.triton is None or T.INTERPRETED, reason="needs triton, not its interpreter")
    def test_cpu_tensors_are_refused_without_the_interpreter():
        assert T.available(torch.device("cpu")) == (False, T.INTERPRETER_REASON)
        assert T.INTERPRETER_REASON == ("Triton runs on CPU tensors only under TRITON_INTERPRET=1 "
                                        "(set before importing triton)")
        with pytest.raises(BackendUnavailableError, match=r"TRITON_INTERPRET=1 \(set before importing triton\)"):
            T.query_concat(torch.zeros(2, 3), torch.zeros(1, 4, 3))
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
            T.adapter_attention(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 16, 2), torch.zeros(1, 1, 2, 16),
                                torch.zeros(1, 1, 1, 1))

    @pytest.mark.skipif(not _gpu, reason="needs a CUDA GPU and triton (not the interpreter)")
    def test_available_on_cuda():
        assert T.available(torch.device("cuda")) == (True, "")
        assert T.available(torch.device("cuda"), torch.float16)[0]
