"""The C++ CPU kernels of torch.ops.surgery.* (csrc/ops.cpp) against the eager reference.

Copies and adds are exact in every dtype (torch.equal); the attention accumulates in fp32 and
rounds once, so it is compared with the reference computed in fp32 (within an ulp or two of the
dtype) and, more loosely, with the reference in the dtype (which rounds the scores and the
softmax on the way). Also: out=, non-contiguous inputs, gradients, fake tensors / opcheck,
torch.compile, refused inputs, special values (NaN, inf, denormals) bit for bit, the lower
instruction-set variants (baseline, AVX2) in subprocesses, and the lazy, CUDA-free import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from surgery.ops import _extension, reference

ext = _extension.extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"surgery._C not available: {_extension.extension_error()}")

if ext is not None:
    _extension.require_registration()
    S = torch.ops.surgery

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# attention vs the reference computed in fp32 from the same inputs, rounded to the dtype: ~1 ulp
TIGHT = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-3),
         torch.float16: dict(rtol=1e-3, atol=1e-4)}
# vs the reference run in the dtype (it rounds the scores and the softmax before the gate)
LOOSE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
         torch.float16: dict(rtol=4e-3, atol=4e-3)}


def randn(*shape, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    return torch.randn(*shape, generator=g).to(dtype)


def attention_inputs(B, H, T, Q, hd, dtype, new_gate=True):
    xq = randn(B, H, T, hd, dtype=dtype, seed=1)
    k_t = randn(B, H, hd, Q, dtype=dtype, seed=2)
    v = randn(B, H, Q, hd, dtype=dtype, seed=3)
    gate = randn(1, H, 1, 1, seed=4).tanh().to(dtype)
    ng = randn(1, 1, 1, 1, dtype=dtype, seed=5) if new_gate else None
    return xq, k_t, v, gate, ng


def check_attention(out, xq, k_t, v, gate, ng):
    dtype = xq.dtype
    assert out.dtype == dtype and out.shape == xq.shape and out.is_contiguous()
    ref32 = reference.adapter_attention(*(t.float() if t is not None else None for t in (xq, k_t, v, gate, ng)))
    torch.testing.assert_close(out.float(), ref32.to(dtype).float(), **TIGHT[dtype])
    torch.testing.assert_close(out, reference.adapter_attention(xq, k_t, v, gate, ng), **LOOSE[dtype])


# -- query_concat ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Q,B,N,C", [(1, 1, 1, 1), (3, 2, 5, 7), (10, 3, 257, 64), (2, 2, 3, 4099), (1, 5, 1, 3)])
def test_query_concat_exact(dtype, Q, B, N, C):
    queries, feats = randn(Q, C, dtype=dtype), randn(B, N, C, dtype=dtype)
    out = S.query_concat(queries, feats)
    assert out.shape == (B, Q + N, C) and out.is_contiguous()
    assert torch.equal(out, reference.query_concat(queries, feats))


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_concat_non_contiguous(dtype):
    big = randn(9, 40, dtype=dtype)
    queries_sliced = big[2:6, 3:3 + 16]  # a slice of a bigger table: row stride 40
    queries_t = randn(16, 4, dtype=dtype).t()  # strided rows: copied first
    feats_t = randn(3, 16, 11, dtype=dtype).transpose(1, 2)  # (B, N, C) from (B, C, N)
    feats_sliced = randn(3, 30, 20, dtype=dtype)[:, 5:25:2, 2:18]
    feats_strided = randn(3, 7, 32, dtype=dtype)[..., ::2]  # innermost stride 2
    feats_expanded = randn(1, 7, 16, dtype=dtype).expand(3, 7, 16)  # batch stride 0
    for queries in (queries_sliced, queries_t):
        for feats in (feats_t, feats_sliced, feats_strided, feats_expanded):
            assert torch.equal(S.query_concat(queries, feats), reference.query_concat(queries, feats))


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_concat_out(dtype):
    queries, feats = randn(4, 9, dtype=dtype), randn(3, 6, 9, dtype=dtype)
    out = torch.full((3, 10, 9), float("nan"), dtype=dtype)
    result = S.query_concat.out(queries, feats, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, reference.query_concat(queries, feats))
    feats_t = randn(3, 9, 6, dtype=dtype).transpose(1, 2)
    S.query_concat.out(queries, feats_t, out=out)
    assert torch.equal(out, reference.query_concat(queries, feats_t))


# -- adapter_add ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,Q,D", [(1, 1, 1, 1), (3, 2, 5, 7), (30, 2, 10, 256), (2, 3, 1, 4099), (1, 4, 3, 33)])
@pytest.mark.parametrize("flat", [False, True])
def test_adapter_add_exact(dtype, L, B, Q, D, flat):
    adapter = randn(L * Q, D, dtype=dtype) if flat else randn(L, Q, D, dtype=dtype)
    vq = randn(B, Q, D, dtype=dtype)
    out = S.adapter_add(adapter, vq)
    assert out.shape == (L, B, Q, D) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, reference.adapter_add(adapter, vq))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_add_large_output_streaming_path(dtype):
    """Outputs of 8 MB and more take the other walk (q blocks, non-temporal stores): exact too,
    with a row length that leaves a tail after the vector loop."""
    L, B, Q, D = 8, 8, 8 if dtype == torch.float32 else 16, 4096 + 24  # 8.4 MB
    adapter, vq = randn(L, Q, D, dtype=dtype), randn(B, Q, D, dtype=dtype)
    out = S.adapter_add(adapter, vq)
    assert out.numel() * out.element_size() >= 8 << 20
    assert torch.equal(out, reference.adapter_add(adapter, vq))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_add_non_contiguous(dtype):
    L, B, Q, D = 3, 2, 4, 24
    table = randn(L + 2, Q + 3, D + 8, dtype=dtype)
    adapters = [
        table[1:1 + L, 2:2 + Q, 4:4 + D],  # a slice of a bigger (L, Q, D) table
        randn(L * Q + 5, D + 3, dtype=dtype)[5:, 3:],  # a slice of a bigger flat table
        randn(D, L * Q, dtype=dtype).t(),  # strided rows: copied first
        randn(L, D, Q, dtype=dtype).transpose(1, 2),
    ]
    vqs = [
        randn(B, D, Q, dtype=dtype).transpose(1, 2),
        randn(B, Q, 2 * D, dtype=dtype)[..., ::2],
        randn(1, Q, D, dtype=dtype).expand(B, Q, D),
    ]
    for adapter in adapters:
        for vq in vqs:
            assert torch.equal(S.adapter_add(adapter, vq), reference.adapter_add(adapter, vq))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_add_out(dtype):
    adapter, vq = randn(6, 8, dtype=dtype), randn(2, 3, 8, dtype=dtype)
    out = torch.empty(2, 2, 3, 8, dtype=dtype)
    result = S.adapter_add.out(adapter, vq, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, reference.adapter_add(adapter, vq))


def special_values(dtype, n=4 * 64):
    """Rows that hit every rounding case of the bf16/fp16 add: NaN and inf inputs, sums that
    overflow, sums that are fp32 denormals (the AVX512-BF16 instruction would flush them),
    signed zeros, and ties, placed so that some vectors have one special lane among ordinary ones."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g)
    info = torch.finfo(dtype)
    tiny = info.tiny  # smallest normal of the dtype
    cases = [(float("nan"), 1.0), (1.0, float("nan")), (float("inf"), 1.0), (float("-inf"), float("inf")),
             (info.max, info.max), (-info.max, -info.max), (tiny, -tiny / 2), (tiny / 4, tiny / 8),
             (-tiny / 2, tiny / 4), (0.0, -0.0), (-0.0, -0.0), (1.0, 2.0 ** -8), (1.0, 3 * 2.0 ** -9)]
    for i, (x, y) in enumerate(cases):
        a[i * 19 % n], b[i * 19 % n] = x, y  # spread over different vectors and lanes
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_add_special_values_bit_exact(dtype):
    """NaN, inf, overflow, denormal sums, signed zeros, ties: the same bits as eager torch."""
    a, b = special_values(dtype)
    adapter, vq = a.view(2, 2, 64), b.view(2, 2, 64)  # L=2, Q=2, D=64; B=2
    got = S.adapter_add(adapter, vq)
    expected = reference.adapter_add(adapter, vq)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


# -- adapter_attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,Q,hd", [(1, 1, 1, 1, 1), (2, 3, 5, 10, 16), (1, 32, 1, 10, 128), (2, 4, 9, 7, 13),
                                        (1, 2, 3, 3, 4099), (3, 2, 1, 17, 40), (1, 2, 1, 70, 24), (2, 2, 3, 130, 64)])
@pytest.mark.parametrize("new_gate", [True, False])
def test_adapter_attention(dtype, B, H, T, Q, hd, new_gate):
    inputs = attention_inputs(B, H, T, Q, hd, dtype, new_gate)
    check_attention(S.adapter_attention(*inputs), *inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 6])  # decoding (one row per (b, h)), prefill (several)
def test_adapter_attention_non_contiguous(dtype, T):
    B, H, Q, hd = 2, 3, 5, 16
    xq = randn(B, T, H, hd, dtype=dtype).transpose(1, 2)  # (B, H, T, hd) from (B, T, H, hd)
    k_t = randn(B, H, Q, hd, dtype=dtype).transpose(2, 3)  # strided rows: copied first
    k_t_sliced = randn(B, H + 1, hd, Q + 4, dtype=dtype)[:, 1:, :, 2:2 + Q]
    v = randn(B, H, Q + 2, 2 * hd, dtype=dtype)[:, :, 1:1 + Q, ::2]
    v_sliced = randn(B, H, Q, hd + 5, dtype=dtype)[..., 5:]
    gate = randn(1, 2 * H, 1, 1, dtype=dtype).tanh()[:, ::2]
    ng = randn(2, 1, 1, 1, dtype=dtype)[1:]
    for k in (k_t, k_t_sliced):
        for vv in (v, v_sliced):
            check_attention(S.adapter_attention(xq, k, vv, gate, ng), xq, k, vv, gate, ng)


def test_adapter_attention_extreme_scores():
    """Large scores: the softmax subtracts the max (no inf/nan); a single token gets all the weight."""
    xq, k_t, v, gate, ng = attention_inputs(1, 2, 3, 4, 8, torch.float32)
    out = S.adapter_attention(xq * 1e3, k_t, v, gate, ng)
    assert torch.isfinite(out).all()
    check_attention(out, xq * 1e3, k_t, v, gate, ng)


@pytest.mark.parametrize("capability,isa", [("default", "DEFAULT"), ("avx2", "AVX2")])
def test_lower_isa_kernels_in_a_subprocess(capability, isa):
    """ATEN_CPU_CAPABILITY=default / avx2 makes the extension pick its baseline / AVX2 kernels,
    which then agree with the reference as the best variant does (this machine's is tested above)."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    code = textwrap.dedent(f"""
        import sys
        import torch
        from surgery.ops import _extension, reference
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cpp import special_values
        assert _extension.build_info()["cpu_isa"] == {isa!r}, _extension.build_info()
        S = torch.ops.surgery
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q, f = torch.randn(3, 37).to(dtype), torch.randn(2, 5, 37).to(dtype)
            assert torch.equal(S.query_concat(q, f), reference.query_concat(q, f))
            a, vq = torch.randn(4 * 3, 37).to(dtype), torch.randn(2, 3, 37).to(dtype)
            assert torch.equal(S.adapter_add(a, vq), reference.adapter_add(a, vq))
            if dtype != torch.float32:
                a, b = special_values(dtype)
                got, want = S.adapter_add(a.view(2, 2, 64), b.view(2, 2, 64)), reference.adapter_add(a.view(2, 2, 64), b.view(2, 2, 64))
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), dtype
            for T, Q in ((1, 6), (5, 6), (1, 70)):
                x, k, v = torch.randn(2, 3, T, 19), torch.randn(2, 3, 19, Q), torch.randn(2, 3, Q, 19)
                g, ng = torch.rand(1, 3, 1, 1), torch.rand(1, 1, 1, 1)
                ins = [t.to(dtype) for t in (x, k, v, g, ng)]
                ref = reference.adapter_attention(*[t.float() for t in ins]).to(dtype)
                torch.testing.assert_close(S.adapter_attention(*ins).float(), ref.float(), rtol=8e-3, atol=1e-3)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_many_threads_match_one():
    inputs = attention_inputs(4, 8, 16, 10, 64, torch.bfloat16)
    adapter, vq = randn(30 * 10, 512, dtype=torch.bfloat16), randn(4, 10, 512, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = S.adapter_attention(*inputs), S.adapter_add(adapter, vq)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(max(threads, 2))
    try:
        many = S.adapter_attention(*inputs), S.adapter_add(adapter, vq)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


# -- gradients ------------------------------------------------------------------------------------


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [leaf.grad if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("flat", [False, True])
def test_gradients_concat_and_add(flat):
    queries, feats = randn(4, 6), randn(3, 5, 6)
    g = randn(3, 9, 6, seed=7)
    out, grads = _grads(S.query_concat, (queries, feats), g)
    ref, ref_grads = _grads(reference.query_concat, (queries, feats), g)
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    adapter = randn(2 * 3, 8) if flat else randn(2, 3, 8)
    vq = randn(4, 3, 8)
    g = randn(2, 4, 3, 8, seed=8)
    out, grads = _grads(S.adapter_add, (adapter, vq), g)
    ref, ref_grads = _grads(reference.adapter_add, (adapter, vq), g)
    assert grads[0].shape == adapter.shape
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("new_gate", [True, False])
def test_gradients_attention(new_gate):
    inputs = attention_inputs(2, 3, 4, 5, 8, torch.float32, new_gate)
    g = randn(2, 3, 4, 8, seed=9)
    out, grads = _grads(S.adapter_attention, inputs, g)
    ref, ref_grads = _grads(reference.adapter_attention, inputs, g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_bf16_keep_dtypes():
    inputs = attention_inputs(1, 2, 3, 4, 8, torch.bfloat16)
    out, grads = _grads(S.adapter_attention, inputs, torch.ones(1, 2, 3, 8, dtype=torch.bfloat16))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 5
    assert [g.shape for g in grads] == [t.shape for t in inputs]


def test_gradient_of_one_input_only():
    xq, k_t, v, gate, ng = attention_inputs(1, 2, 3, 4, 8, torch.float32)
    v = v.requires_grad_(True)
    S.adapter_attention(xq, k_t, v, gate, ng).sum().backward()
    vr = v.detach().clone().requires_grad_(True)
    reference.adapter_attention(xq, k_t, vr, gate, ng).sum().backward()
    torch.testing.assert_close(v.grad, vr.grad)


# -- torch.library: opcheck (schema, autograd registration, fake tensors, AOT dispatch) ----------


def _opcheck_samples():
    yield S.query_concat.default, (randn(3, 5), randn(2, 4, 5)), {}
    yield S.query_concat.default, (randn(3, 5).requires_grad_(), randn(2, 5, 4).transpose(1, 2).requires_grad_()), {}
    yield S.query_concat.default, (randn(2, 6, dtype=torch.bfloat16), randn(1, 3, 6, dtype=torch.bfloat16)), {}
    yield S.adapter_add.default, (randn(6, 7), randn(2, 3, 7)), {}
    yield S.adapter_add.default, (randn(2, 3, 7).requires_grad_(), randn(2, 3, 7).requires_grad_()), {}
    yield S.adapter_add.default, (randn(4, 7, dtype=torch.float16), randn(3, 2, 7, dtype=torch.float16)), {}
    yield S.adapter_attention.default, attention_inputs(2, 3, 4, 5, 8, torch.float32), {}
    with_grad = attention_inputs(2, 2, 1, 3, 8, torch.float32)
    yield S.adapter_attention.default, tuple(t.requires_grad_() for t in with_grad), {}
    no_new_gate = attention_inputs(1, 2, 3, 4, 8, torch.float32, new_gate=False)
    yield S.adapter_attention.default, tuple(t.requires_grad_() if t is not None else None for t in no_new_gate), {}
    yield S.adapter_attention.default, attention_inputs(1, 2, 3, 4, 8, torch.bfloat16), {}


@pytest.mark.parametrize("index", range(10))
def test_opcheck(index):
    op, args, kwargs = list(_opcheck_samples())[index]
    torch.library.opcheck(op, args, kwargs)


def test_opcheck_out_overloads():
    queries, feats = randn(3, 5), randn(2, 4, 5)
    torch.library.opcheck(S.query_concat.out, (queries, feats), {"out": torch.empty(2, 7, 5)},
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(S.adapter_add.out, (randn(6, 7), randn(2, 3, 7)), {"out": torch.empty(2, 2, 3, 7)},
                          test_utils=("test_schema", "test_faketensor"))


def test_meta_tensors():
    m = dict(device="meta")
    assert S.query_concat(torch.empty(3, 5, **m), torch.empty(2, 4, 5, **m)).shape == (2, 7, 5)
    assert S.adapter_add(torch.empty(6, 7, **m), torch.empty(2, 3, 7, **m)).shape == (2, 2, 3, 7)
    out = S.adapter_attention(torch.empty(2, 3, 4, 8, **m), torch.empty(2, 3, 8, 5, **m), torch.empty(2, 3, 5, 8, **m),
                              torch.empty(1, 3, 1, 1, **m), None)
    assert out.shape == (2, 3, 4, 8) and out.device.type == "meta"


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(queries, feats, adapter, vq, xq, k_t, v, gate, ng):
        return S.query_concat(queries, feats), S.adapter_add(adapter, vq), S.adapter_attention(xq, k_t, v, gate, ng)

    args = (randn(3, 5), randn(2, 4, 5), randn(6, 7), randn(2, 3, 7), *attention_inputs(2, 3, 4, 5, 8, torch.float32))
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(*args), f(*args)):
        assert torch.equal(got, want)


# -- refused inputs: a clear error, never a wrong result ------------------------------------------


def _bad_calls():
    """Bad calls of every op, on CPU tensors: (name, functional op, its surgery.ops function, args, kwargs)."""
    from surgery import ops

    q, f = randn(3, 5), randn(2, 4, 5)
    a, vq = randn(6, 7), randn(2, 3, 7)
    xq, k_t, v, gate, ng = attention_inputs(2, 3, 4, 5, 8, torch.float32)
    qc, aa, at = (S.query_concat, ops.query_concat), (S.adapter_add, ops.adapter_add), \
        (S.adapter_attention, ops.adapter_attention)
    calls = [
        (qc, (q, f.bfloat16()), {}), (qc, (q.long(), f.long()), {}), (qc, (q[None], f), {}), (qc, (q, f[0]), {}),
        (qc, (randn(3, 6), f), {}), (qc, (q, torch.empty(2, 0, 5)), {}), (qc, (torch.empty(0, 5), f), {}),
        (qc, (q, f), {"out": torch.empty(2, 7, 6)}), (qc, (q, f), {"out": torch.empty(2, 7, 5).half()}),
        (qc, (q, f), {"out": torch.empty(5, 7, 2).transpose(0, 2)}),
        (aa, (a, vq.half()), {}), (aa, (a[0], vq), {}), (aa, (a, vq[0]), {}), (aa, (randn(7, 7), vq), {}),
        (aa, (randn(2, 4, 7), vq), {}), (aa, (randn(6, 8), vq), {}), (aa, (torch.empty(0, 7), vq), {}),
        (aa, (a, vq), {"out": torch.empty(2, 2, 3, 8)}),
        (aa, (a, vq), {"out": torch.empty(2, 3, 2, 7).transpose(1, 2)}),
        (at, (xq, k_t.bfloat16(), v, gate, ng), {}), (at, (xq[0], k_t, v, gate, ng), {}),
        (at, (xq, k_t, v, gate[0], ng), {}), (at, (xq, k_t[..., :4], v, gate, ng), {}),
        (at, (xq, k_t, v, randn(1, 4, 1, 1), ng), {}), (at, (xq, k_t, v, gate, randn(1, 1, 1, 2)), {}),
        (at, (torch.empty(2, 3, 0, 8), k_t, v, gate, ng), {}),
    ]
    return [(torch_op.out if "out" in kwargs else torch_op, public, args, kwargs)
            for (torch_op, public), args, kwargs in calls]


def _message(error, call) -> str:
    with pytest.raises(error) as caught:
        call()
    return str(caught.value)


def test_fake_implementations_refuse_with_the_kernels_words():
    """The checks are written twice, in C++ (csrc/checks.h) and in Python (surgery/ops/checks.py, for
    the fake implementations and the public functions): on meta tensors the ops must fail exactly
    as the C++ kernels do on CPU tensors."""
    def meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    for torch_op, public, args, kwargs in _bad_calls():
        on_cpu = _message(RuntimeError, lambda: torch_op(*args, **kwargs))
        assert on_cpu.startswith(f"surgery::{public.__name__}: ")
        meta_args, meta_kwargs = [meta(x) for x in args], {k: meta(x) for k, x in kwargs.items()}
        on_meta = _message(RuntimeError, lambda: torch_op(*meta_args, **meta_kwargs))
        assert on_meta == on_cpu.replace("cpu", "meta")


def test_public_functions_refuse_with_the_kernels_words():
    """surgery.ops raises OpInputError with the kernels' message, less their "surgery::" head, before
    any backend runs (eager included)."""
    from surgery.errors import OpInputError

    for torch_op, public, args, kwargs in _bad_calls():
        on_cpu = _message(RuntimeError, lambda: torch_op(*args, **kwargs))
        for backend in ("eager", "cpp"):
            said = _message(OpInputError, lambda: public(*args, **kwargs, backend=backend))
            assert "surgery::" + said == on_cpu


def test_public_functions_refuse_what_only_the_kernels_refused_before():
    """Overlapping out=, an out= that requires grad and sparse inputs: refused by every backend."""
    from surgery import ops
    from surgery.errors import OpInputError

    q, f = randn(3, 5), randn(2, 4, 5)
    buffer = torch.zeros(2 * 7 * 5 + 40)
    overlapping = buffer[:2 * 4 * 5].view(2, 4, 5)
    for backend in ("eager", "cpp"):
        with pytest.raises(OpInputError, match=r"^query_concat: out shares memory with feats"):
            ops.query_concat(q, overlapping, out=buffer[:70].view(2, 7, 5), backend=backend)
        with pytest.raises(OpInputError, match="out= does not support automatic differentiation"):
            ops.query_concat(q, f, out=torch.empty(2, 7, 5, requires_grad=True), backend=backend)
        with pytest.raises(OpInputError, match=r"queries is not a dense \(strided\) tensor"):
            ops.query_concat(q.to_sparse(), f, backend=backend)
    assert torch.equal(buffer, torch.zeros(2 * 7 * 5 + 40))
    # meta tensors have no memory to share, and disjoint pieces of one buffer are fine
    meta = torch.empty(2, 7, 5, device="meta")
    assert ops.query_concat(q.to("meta"), f.to("meta"), out=meta, backend="eager") is meta
    out = buffer[40:].view(2, 7, 5)
    ops.query_concat(q, buffer[:40].view(2, 4, 5).copy_(f), out=out, backend="cpp")
    assert torch.equal(out, reference.query_concat(q, f))


def _refused(fn, *args, match, **kwargs):
    with pytest.raises(RuntimeError, match=match):
        fn(*args, **kwargs)


def test_query_concat_refuses():
    q, f = randn(3, 5), randn(2, 4, 5)
    _refused(S.query_concat, q, f.to(torch.bfloat16),
             match=r"surgery::query_concat: feats is bfloat16 but queries is float32; all inputs must share one dtype")
    _refused(S.query_concat, q.long(), f.long(),
             match=r"queries is int64; allowed dtypes: float32, bfloat16 or float16")
    _refused(S.query_concat, q.double(), f.double(), match=r"queries is float64; allowed dtypes")
    _refused(S.query_concat, q[None], f, match=r"queries has shape \[1, 3, 5\] \(3 dimensions\); expected \(Q, C\)")
    _refused(S.query_concat, q, f[0], match=r"feats has shape \[4, 5\] \(2 dimensions\); expected \(B, N, C\)")
    _refused(S.query_concat, randn(3, 6), f, match=r"queries have C=6 channels but feats have C=5; they must agree")
    _refused(S.query_concat, q, torch.empty(2, 0, 5), match=r"feats is empty \(shape \[2, 0, 5\]\); every dimension")
    _refused(S.query_concat, torch.empty(0, 5), f, match=r"queries is empty")
    _refused(S.query_concat, q.to("meta"), f,
             match=r"feats is on cpu but queries is on meta; all inputs must be on one device")


def test_adapter_add_refuses():
    a, vq = randn(6, 7), randn(2, 3, 7)
    _refused(S.adapter_add, a, vq.half(), match=r"surgery::adapter_add: visual_query is float16 but adapter is float32")
    _refused(S.adapter_add, a.long(), vq.long(), match=r"adapter is int64; allowed dtypes")
    _refused(S.adapter_add, a[0], vq,
             match=r"adapter has shape \[7\] \(1 dimensions\); expected \(L, Q, D\) or \(L\*Q, D\)")
    _refused(S.adapter_add, a, vq[0], match=r"visual_query has shape \[3, 7\] \(2 dimensions\); expected \(B, Q, D\)")
    _refused(S.adapter_add, randn(7, 7), vq,
             match=r"a flat adapter needs L\*Q rows; 7 rows is not a multiple of visual_query's Q=3")
    _refused(S.adapter_add, randn(2, 4, 7), vq, match=r"adapter has Q=4 tokens per layer but visual_query has Q=3")
    _refused(S.adapter_add, randn(6, 8), vq, match=r"adapter has D=8 but visual_query has D=7")
    _refused(S.adapter_add, a, torch.empty(0, 3, 7), match=r"visual_query is empty")
    _refused(S.adapter_add, torch.empty(0, 7), vq, match=r"adapter is empty")
    _refused(S.adapter_add, a, vq.to("meta"), match=r"visual_query is on meta but adapter is on cpu")


def test_adapter_attention_refuses():
    xq, k_t, v, gate, ng = attention_inputs(2, 3, 4, 5, 8, torch.float32)
    A = S.adapter_attention
    _refused(A, xq, k_t.bfloat16(), v, gate, ng, match=r"surgery::adapter_attention: k_t is bfloat16 but xq is float32")
    _refused(A, xq, k_t, v, gate, ng.half(), match=r"new_gate is float16 but xq is float32")
    _refused(A, *(t.double() for t in (xq, k_t, v, gate, ng)), match=r"xq is float64; allowed dtypes")
    _refused(A, *(t.long() for t in (xq, k_t, v, gate, ng)), match=r"xq is int64; allowed dtypes")
    _refused(A, xq[0], k_t, v, gate, ng, match=r"xq has shape \[3, 4, 8\] \(3 dimensions\); expected \(B, H, T, hd\)")
    _refused(A, xq, k_t, v, gate[0], ng, match=r"gate has shape \[3, 1, 1\] \(3 dimensions\); expected \(1, H, 1, 1\)")
    _refused(A, xq, k_t, v, gate, ng[0], match=r"new_gate has shape \[1, 1, 1\]")
    _refused(A, xq, k_t[..., :4], v, gate, ng,
             match=r"k_t must be \(B, H, hd, Q\) and v \(B, H, Q, hd\) for one Q; got k_t \[2, 3, 8, 4\], "
                   r"v \[2, 3, 5, 8\]")
    _refused(A, xq, k_t, v[..., :7], gate, ng, match=r"k_t must be \(B, H, hd, Q\)")
    _refused(A, xq, k_t[:1], v[:1], gate, ng, match=r"for one Q")
    _refused(A, xq, k_t, v, randn(1, 4, 1, 1), ng,
             match=r"gate must be \(1, 3, 1, 1\), one value per head; got \[1, 4, 1, 1\]")
    _refused(A, xq, k_t, v, gate, randn(1, 1, 1, 2), match=r"new_gate must be \(1, 1, 1, 1\); got \[1, 1, 1, 2\]")
    _refused(A, torch.empty(2, 3, 0, 8), k_t, v, gate, ng, match=r"xq is empty \(shape \[2, 3, 0, 8\]\)")
    _refused(A, xq, torch.empty(2, 3, 8, 0), torch.empty(2, 3, 0, 8), gate, ng, match=r"k_t is empty")
    _refused(A, xq, k_t, v.to("meta"), gate, ng, match=r"v is on meta but xq is on cpu")


def test_out_refused():
    queries, feats = randn(3, 5), randn(2, 4, 5)
    _refused(S.query_concat.out, queries, feats, out=torch.empty(2, 7, 6),
             match=r"surgery::query_concat: out is \[2, 7, 6\] float32 on cpu; expected \[2, 7, 5\] float32 on cpu")
    _refused(S.query_concat.out, queries, feats, out=torch.empty(2, 7, 5, dtype=torch.float16),
             match=r"out is \[2, 7, 5\] float16 on cpu; expected \[2, 7, 5\] float32")
    _refused(S.query_concat.out, queries, feats, out=torch.empty(5, 7, 2).transpose(0, 2),
             match=r"out must be contiguous")
    _refused(S.query_concat.out, queries, feats, out=torch.empty(0), match=r"out is \[0\] float32 on cpu; expected")
    buffer = torch.zeros(2 * 7 * 5 + 40)
    overlapping = buffer[:2 * 4 * 5].view(2, 4, 5)
    _refused(S.query_concat.out, queries, overlapping, out=buffer[:70].view(2, 7, 5),
             match=r"out shares memory with feats")
    adapter, vq = randn(6, 7), randn(2, 3, 7)
    _refused(S.adapter_add.out, adapter, vq, out=torch.empty(2, 2, 3, 8),
             match=r"surgery::adapter_add: out is \[2, 2, 3, 8\]")
    _refused(S.adapter_add.out, adapter, vq, out=torch.empty(2, 3, 2, 7).transpose(1, 2),
             match=r"out must be contiguous")
    _refused(S.adapter_add.out, adapter, vq, out=torch.empty(2, 2, 3, 7, dtype=torch.bfloat16),
             match=r"bfloat16 on cpu; expected")
    assert torch.equal(buffer, torch.zeros(2 * 7 * 5 + 40))  # refused before anything was written


def test_out_overloads_refuse_inputs_that_require_grad():
    queries, feats = randn(3, 5).requires_grad_(), randn(2, 4, 5)
    out = torch.empty(2, 7, 5)
    _refused(S.query_concat.out, queries, feats, out=out,
             match=r"surgery::query_concat.out: queries requires grad, but the out= overload does not support "
                   r"automatic differentiation")
    adapter, vq = randn(6, 7), randn(2, 3, 7).requires_grad_()
    _refused(S.adapter_add.out, adapter, vq, out=torch.empty(2, 2, 3, 7),
             match=r"adapter_add.out: visual_query requires grad")
    version = out._version
    with torch.no_grad():
        S.query_concat.out(queries, feats, out=out)
    assert torch.equal(out, reference.query_concat(queries, feats).detach())
    assert out._version > version  # an in-place write, seen by autograd's saved-tensor checks


# -- loading: lazy, no CUDA initialised, reasons kept, build info ---------------------------------


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_import_is_lazy_and_does_not_initialise_cuda():
    done = _run("""
        import sys, warnings
        warnings.simplefilter("error")
        import torch, surgery, surgery.ops
        from surgery.ops import _extension
        assert "surgery._C" not in sys.modules
        assert not torch.cuda.is_initialized()
        assert _extension.extension() is not None
        _extension.build_info(), _extension.has_cuda_kernels()
        assert not torch.cuda.is_initialized()
        print("ok")
    """)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_importing_the_bare_extension_names_the_registration_module():
    """surgery._C alone has the kernels but no fake implementations; torch's error names the module
    that has them (set_python_module), and importing it is enough."""
    done = _run("""
        import torch, surgery._C
        args = torch.empty(6, 7, device="meta"), torch.empty(2, 3, 7, device="meta")
        try:
            torch.ops.surgery.adapter_add(*args)
        except NotImplementedError as exc:
            assert "surgery.ops.registration" in str(exc), exc
        import surgery.ops.registration
        assert torch.ops.surgery.adapter_add(*args).shape == (2, 2, 3, 7)
        print("ok")
    """)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_disabled_extension_keeps_the_reason_and_warns_once():
    done = _run("""
        import warnings
        from surgery.ops import _extension
        from surgery.errors import BackendUnavailableError
        assert _extension.extension() is None and _extension.build_info() == {}
        assert not _extension.has_cuda_kernels()
        assert "SURGERY_NO_EXTENSION" in _extension.extension_error()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _extension.warn_fallback("cpu")
            _extension.warn_fallback("cpu")
        assert len(caught) == 1 and issubclass(caught[0].category, _extension.ExtensionWarning), caught
        assert "SURGERY_NO_EXTENSION" in str(caught[0].message)
        try:
            _extension.require_registration()
        except BackendUnavailableError as exc:
            assert "SURGERY_NO_EXTENSION" in str(exc)
        else:
            raise AssertionError("no error")
        print("ok")
    """, SURGERY_NO_EXTENSION="1")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_build_info():
    info = _extension.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_isa"] in ("DEFAULT", "AVX2", "AVX512_BF16")
    assert info["openmp"] is True or sys.platform != "linux"
    assert isinstance(info["cuda_sources"], bool) and isinstance(info["cuda_kernels"], bool)
    if info["cuda_sources"]:
        assert info["cuda"] and info["cuda_archs"]
    else:
        assert info["cuda"] is None and not info["cuda_kernels"]
    assert _extension.extension_error() is None
