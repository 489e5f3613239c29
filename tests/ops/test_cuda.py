"""The CUDA kernels (`csrc/cuda/ops.cu`) against the eager reference, on CUDA tensors.

Called as `torch.ops.surgery.*` (the kernels themselves, not the Python dispatch in
`surgery.ops`), with the extension `surgery._C` that setup.py built. The whole module is skipped
without a CUDA GPU (CI has none; lent GPU machines run it) or when the installed extension has no
CUDA kernels (built without a CUDA toolkit, or not built): rebuild with
`FORCE_CUDA=1 pip install --no-build-isolation -e .` to run it.

Copies and adds must be exact (torch.equal); the attention is checked against a float64 truth
with the tolerance of one rounding to the dtype, and must be at least as close to it as the eager
reference (which rounds the softmax, the gates and the scores to the dtype on the way).
"""

from __future__ import annotations

import math

import pytest
import torch

from surgery.ops import _extension
from surgery.ops import reference as R


def _why_skip() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if _extension.extension() is None:
        return f"surgery._C is not loaded: {_extension.extension_error()}"
    if not _extension.has_cuda_kernels():
        return "surgery._C was built without CUDA kernels (FORCE_CUDA=1 pip install --no-build-isolation -e .)"
    return None


_SKIP = _why_skip()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "bf16", "f16"]
CUDA = "cuda"
ops = torch.ops.surgery


@pytest.fixture(scope="module", autouse=True)
def _registered():
    _extension.require_registration()  # fake tensors + autograd, for opcheck and torch.compile


def dtypes(f):
    return pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)(f)


def maker(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=CUDA, dtype=dtype)

    return r


def shifted(t: torch.Tensor, by: int) -> torch.Tensor:
    """A copy of t whose data starts `by` elements into its storage (misaligned for by % 8 != 0)."""
    flat = torch.empty(t.numel() + by, device=t.device, dtype=t.dtype)
    view = flat[by:].view(t.shape)
    view.copy_(t)
    return view


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), device=CUDA, dtype=dtype)


# -- query_concat --------------------------------------------------------------------------------

QC_SHAPES = [  # Q, N, B, C
    (1, 1, 1, 1), (1, 5, 1, 4096 + 3), (3, 7, 2, 4096), (10, 257, 3, 64), (5, 3, 4, 1537), (2, 1, 1, 6),
]


@dtypes
@pytest.mark.parametrize("Q,N,B,C", QC_SHAPES)
def test_query_concat_exact(dtype, Q, N, B, C):
    r = maker(dtype)
    q, f = r(Q, C), r(B, N, C)
    got = ops.query_concat(q, f)
    assert got.shape == (B, Q + N, C) and got.dtype == dtype and got.is_contiguous() and got.is_cuda
    assert torch.equal(got, R.query_concat(q, f))


@dtypes
@pytest.mark.parametrize("offset", range(8))
@pytest.mark.parametrize("C", [64, 130, 4096 + 3])
def test_query_concat_misaligned_and_every_pack_width(dtype, offset, C):
    r = maker(dtype, seed=offset)
    q, f = shifted(r(4, C), offset), shifted(r(3, 9, C), (offset * 3) % 8)
    assert torch.equal(ops.query_concat(q, f), R.query_concat(q, f))


@dtypes
def test_query_concat_strided_inputs(dtype):
    r = maker(dtype)
    Q, N, B, C = 6, 9, 3, 130
    q = r(Q, C + 10)[:, 3:3 + C]  # row stride C+10, odd offset
    f = r(N, B, C).transpose(0, 1)  # (B, N, C), batch stride C
    f_inner = r(B, C, N).transpose(1, 2)  # (B, N, C), channel stride N
    q_inner = r(C, Q).t()  # (Q, C), channel stride Q
    f_step = r(B, 2 * N, C)[:, ::2]  # every other token
    for qq, ff in [(q, f), (q, f_inner), (q_inner, f), (q_inner, f_inner), (q, f_step)]:
        assert torch.equal(ops.query_concat(qq, ff), R.query_concat(qq, ff))
    one = r(1, 1, C).expand(B, 1, C)  # stride 0 over the batch
    assert torch.equal(ops.query_concat(q, one), R.query_concat(q, one))


@dtypes
def test_query_concat_out(dtype):
    r = maker(dtype)
    q, f = r(3, 40), r(2, 5, 40)
    out = poisoned((2, 8, 40), dtype)
    res = ops.query_concat.out(q, f, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, R.query_concat(q, f))
    out2 = shifted(poisoned((2, 8, 40), dtype), 1)  # contiguous but misaligned: the scalar path
    ops.query_concat(q, f, out=out2)
    assert torch.equal(out2, R.query_concat(q, f))


# -- adapter_add ---------------------------------------------------------------------------------

AA_SHAPES = [  # L, B, Q, D
    (1, 1, 1, 1), (1, 1, 1, 4096 + 3), (3, 2, 5, 7), (4, 3, 10, 4096), (30, 1, 10, 4096), (2, 8, 1, 4096 + 3),
]


@dtypes
@pytest.mark.parametrize("L,B,Q,D", AA_SHAPES)
def test_adapter_add_exact(dtype, L, B, Q, D):
    r = maker(dtype)
    a, vq = r(L, Q, D), r(B, Q, D)
    got = ops.adapter_add(a, vq)
    assert got.shape == (L, B, Q, D) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, R.adapter_add(a, vq))
    flat = a.reshape(L * Q, D)  # the flat (L*Q, D) form
    assert torch.equal(ops.adapter_add(flat, vq), got)


@dtypes
@pytest.mark.parametrize("offset", range(8))
def test_adapter_add_misaligned_and_every_pack_width(dtype, offset):
    r = maker(dtype, seed=offset)
    L, B, Q, D = 3, 2, 5, 264
    a, vq = shifted(r(L, Q, D), offset), shifted(r(B, Q, D), (offset + 2) % 8)
    assert torch.equal(ops.adapter_add(a, vq), R.adapter_add(a, vq))


@dtypes
def test_adapter_add_strided_inputs(dtype):
    r = maker(dtype)
    L, B, Q, D = 4, 3, 10, 136
    a = r(L, Q, D + 8)[..., 8:]  # sliced rows
    a_t = r(Q, L, D).transpose(0, 1)  # (L, Q, D), layer stride D
    a_flat = r(L * Q, 2 * D)[:, ::2]  # flat form, channel stride 2
    a_inner = r(L, D, Q).transpose(1, 2)  # channel stride Q
    vq = r(Q, B, D).transpose(0, 1)
    vq_inner = r(B, D, Q).transpose(1, 2)
    vq_bcast = r(1, Q, D).expand(B, Q, D)
    for aa in (a, a_t, a_flat, a_inner):
        for vv in (vq, vq_inner, vq_bcast):
            assert torch.equal(ops.adapter_add(aa, vv), R.adapter_add(aa, vv)), (aa.stride(), vv.stride())


@dtypes
def test_adapter_add_out(dtype):
    r = maker(dtype)
    a, vq = r(6, 24), r(2, 3, 24)  # flat adapter: L = 2
    out = poisoned((2, 2, 3, 24), dtype)
    assert ops.adapter_add.out(a, vq, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, R.adapter_add(a, vq))


# -- adapter_attention ---------------------------------------------------------------------------

# Against the float64 truth: one rounding to the dtype (plus fp32 accumulation).
ATOL_RTOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (1e-4, 2**-7), torch.float16: (1e-5, 2**-10)}


def truth(xq, k_t, v, gate, new_gate):
    x, k, vv = xq.double(), k_t.double(), v.double()
    p = torch.softmax(x @ k / math.sqrt(xq.shape[-1]), dim=-1)
    out = gate.double() * (p @ vv)
    return out if new_gate is None else new_gate.double() * out


def attention_inputs(dtype, B, H, T, hd, Q, seed=0, new_gate=True):
    r = maker(dtype, seed)
    xq, k_t, v = r(B, H, T, hd), r(B, H, hd, Q), r(B, H, Q, hd)
    gate = torch.tanh(r(1, H, 1, 1))
    ng = torch.tanh(r(1, 1, 1, 1)) if new_gate else None
    return xq, k_t, v, gate, ng


def check_attention(got, xq, k_t, v, gate, ng):
    dtype = xq.dtype
    assert got.shape == xq.shape and got.dtype == dtype and got.is_contiguous() and got.is_cuda
    assert torch.isfinite(got).all()
    want = truth(xq, k_t, v, gate, ng)
    atol, rtol = ATOL_RTOL[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    if dtype != torch.float32:
        # one rounding: at least as close to the truth as the eager reference, which rounds the
        # scores, the softmax and the gates to the dtype on the way (in float32 both are far under
        # the tolerance above, and cuBLAS may sum a long Q more accurately than the kernel's loop)
        ref = R.adapter_attention(xq, k_t, v, gate, ng)
        err_got = (got.double() - want).norm() / want.norm()
        err_ref = (ref.double() - want).norm() / want.norm()
        assert err_got <= err_ref * 1.05 + 1e-7, (float(err_got), float(err_ref))


ATTN_SHAPES = [  # B, H, T, hd, Q
    (1, 1, 1, 1, 1), (1, 1, 1, 128, 1), (2, 3, 1, 128, 10), (8, 32, 1, 128, 10), (2, 4, 3, 128, 256),
    (1, 2, 5, 64, 7), (3, 2, 2, 80, 33), (1, 3, 1, 67, 16), (2, 2, 1, 16, 1000), (1, 1, 2, 128, 20000),
]


@dtypes
@pytest.mark.parametrize("B,H,T,hd,Q", ATTN_SHAPES)
@pytest.mark.parametrize("with_new_gate", [True, False], ids=["new_gate", "no_new_gate"])
def test_attention_matches_truth(dtype, B, H, T, hd, Q, with_new_gate):
    args = attention_inputs(dtype, B, H, T, hd, Q, seed=B * 7 + Q, new_gate=with_new_gate)
    check_attention(ops.adapter_attention(*args), *args)


@dtypes
def test_attention_strided_inputs(dtype):
    r = maker(dtype, seed=3)
    B, H, T, hd, Q = 2, 4, 3, 128, 16
    _, _, _, gate, ng = attention_inputs(dtype, B, H, T, hd, Q)
    xq = r(B, T, H, hd).transpose(1, 2)  # the model's layout: (B, T, H, hd) viewed as (B, H, T, hd)
    k_t_from_k = r(B, H, Q, hd).transpose(2, 3)  # q stride hd: the scalar path over q
    k_t = r(B, H, hd, Q + 8)[..., 4:4 + Q]  # sliced, 16-byte aligned rows only for some dtypes
    v = r(B, H, Q, hd + 16)[..., :hd]
    v_inner = r(B, H, hd, Q).transpose(2, 3)  # d stride Q: the scalar path over d
    v_bcast = r(1, H, Q, hd).expand(B, H, Q, hd)
    gate_strided = torch.tanh(r(1, 2 * H, 1, 3))[:, ::2, :, 1:2]
    ng_strided = torch.tanh(r(1, 1, 1, 4))[..., 2:3]
    for kk in (k_t, k_t_from_k):
        for vv in (v, v_inner, v_bcast):
            check_attention(ops.adapter_attention(xq, kk, vv, gate, ng), xq, kk, vv, gate, ng)
    check_attention(ops.adapter_attention(xq, k_t, v, gate_strided, ng_strided), xq, k_t, v, gate_strided, ng_strided)


@dtypes
def test_attention_misaligned(dtype):
    xq, k_t, v, gate, ng = attention_inputs(dtype, 2, 3, 1, 128, 24)
    for by in (1, 2, 4):
        args = (shifted(xq, by), shifted(k_t, by), shifted(v, by), gate, ng)
        check_attention(ops.adapter_attention(*args), *args)


def test_attention_softmax_is_stable_for_large_scores():
    xq, k_t, v, gate, ng = attention_inputs(torch.float32, 2, 2, 1, 128, 40)
    xq = xq * 300  # scores in the thousands: exp would overflow without the max subtraction
    got = ops.adapter_attention(xq, k_t, v, gate, ng)
    torch.testing.assert_close(got.double(), truth(xq, k_t, v, gate, ng), atol=1e-5, rtol=1e-4)


def test_attention_q_too_large_for_shared_memory_is_an_error():
    xq, k_t, v, gate, ng = attention_inputs(torch.bfloat16, 1, 1, 1, 128, 200_000)
    with pytest.raises(RuntimeError, match="shared memory"):
        ops.adapter_attention(xq, k_t, v, gate, ng)


# -- streams, devices, graphs ------------------------------------------------------------------


def test_runs_on_the_current_stream():
    r = maker(torch.bfloat16)
    q, f = r(10, 4096), r(4, 300, 4096)
    a, vq = r(32, 10, 4096), r(4, 10, 4096)
    args = attention_inputs(torch.bfloat16, 4, 32, 1, 128, 10)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        got = (ops.query_concat(q, f), ops.adapter_add(a, vq), ops.adapter_attention(*args))
    side.synchronize()
    assert torch.equal(got[0], R.query_concat(q, f)) and torch.equal(got[1], R.adapter_add(a, vq))
    check_attention(got[2], *args)


def test_cuda_graph_capture():
    r = maker(torch.float16)
    q, f = r(10, 256), r(2, 30, 256)
    args = attention_inputs(torch.float16, 2, 4, 1, 128, 10)
    out = torch.empty(2, 40, 256, device=CUDA, dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (device info, smem attribute) outside the capture
        ops.query_concat(q, f, out=out)
        ops.adapter_attention(*args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.query_concat(q, f, out=out)
        att = ops.adapter_attention(*args)
    f.copy_(r(2, 30, 256))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, R.query_concat(q, f))
    check_attention(att, *args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    r = maker(torch.float32)
    q, f = r(3, 64).to("cuda:1"), r(2, 5, 64).to("cuda:1")
    got = ops.query_concat(q, f)
    assert got.device == torch.device("cuda:1") and torch.equal(got, R.query_concat(q, f))


# -- through surgery.ops, opcheck, torch.compile -----------------------------------------------


def test_surgery_ops_cuda_backend():
    from surgery import ops as sops

    r = maker(torch.bfloat16)
    q, f = r(10, 64), r(2, 7, 64)
    a, vq = r(3, 10, 64), r(2, 10, 64)
    assert sops.can_run("cuda", torch.device(CUDA)) == (True, "")
    assert torch.equal(sops.query_concat(q, f, backend="cuda"), R.query_concat(q, f))
    assert torch.equal(sops.adapter_add(a, vq, backend="cuda"), R.adapter_add(a, vq))
    args = attention_inputs(torch.bfloat16, 2, 4, 1, 128, 10)
    check_attention(sops.adapter_attention(*args, backend="cuda"), *args)


@dtypes
def test_opcheck(dtype):
    r = maker(dtype)

    def grad(x):
        return x.detach().clone().requires_grad_()

    q, f = r(3, 24), r(2, 5, 24)
    a, vq = r(2, 3, 24), r(2, 3, 24)
    att = attention_inputs(dtype, 2, 2, 1, 16, 8)
    cases = [
        (ops.query_concat.default, (q, f), {}),
        (ops.query_concat.default, (grad(q), grad(f)), {}),
        (ops.query_concat.default, (r(24, 3).t(), r(5, 2, 24).transpose(0, 1)), {}),
        (ops.adapter_add.default, (a, vq), {}),
        (ops.adapter_add.default, (grad(a.reshape(6, 24)), grad(vq)), {}),
        (ops.adapter_attention.default, att, {}),
        (ops.adapter_attention.default, att[:4] + (None,), {}),
        (ops.adapter_attention.default, tuple(grad(x) for x in att), {}),
    ]
    for op, args, kwargs in cases:
        torch.library.opcheck(op, args, kwargs)
    # The .out overloads return an aliased Tensor(a!), which AOT dispatch (and so torch.compile)
    # cannot functionalize for a custom op: schema and fake tensors only (as tests/ops/test_cpp.py).
    only = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.query_concat.out, (q, f), {"out": torch.empty(2, 8, 24, device=CUDA, dtype=dtype)},
                          test_utils=only)
    torch.library.opcheck(ops.adapter_add.out, (a, vq), {"out": torch.empty(2, 2, 3, 24, device=CUDA, dtype=dtype)},
                          test_utils=only)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@dtypes
def test_torch_compile_fullgraph(dtype, fresh_dynamo):
    """The functional ops; the .out overloads cannot be compiled (see test_opcheck)."""
    r = maker(dtype)
    q, f = r(10, 72), r(2, 7, 72)
    a, vq = r(3, 10, 72), r(2, 10, 72)
    args = attention_inputs(dtype, 2, 4, 1, 128, 10)

    @torch.compile(fullgraph=True)
    def concat(q, f):
        return ops.query_concat(q, f) * 2

    @torch.compile(fullgraph=True)
    def add(a, vq):
        return ops.adapter_add(a, vq) + 1

    @torch.compile(fullgraph=True)
    def attention(xq, k_t, v, gate, ng):
        return ops.adapter_attention(xq, k_t, v, gate, ng)

    assert torch.equal(concat(q, f), R.query_concat(q, f) * 2)
    assert torch.equal(add(a, vq), R.adapter_add(a, vq) + 1)
    got = attention(*args)
    assert torch.equal(got, ops.adapter_attention(*args))  # same kernel, same bits
    check_attention(got, *args)


# -- bad input: errors, not crashes --------------------------------------------------------------


@pytest.fixture
def t():
    """Small valid float32 CUDA inputs of every op, for the bad calls below to spoil."""
    from types import SimpleNamespace

    r = maker(torch.float32)
    xq, k_t, v, gate, ng = attention_inputs(torch.float32, 2, 2, 1, 8, 4)
    return SimpleNamespace(r=r, q=r(3, 8), f=r(2, 5, 8), a=r(2, 3, 8), vq=r(2, 3, 8),
                           xq=xq, k_t=k_t, v=v, gate=gate, ng=ng)


def _empty(*shape):
    return torch.empty(*shape, device=CUDA)


def _aliasing_out(t):
    big = torch.zeros(2 * 2 * 3 * 8 + 24, device=CUDA)
    vq_alias = big[:24].view(1, 3, 8).expand(2, 3, 8)  # the visual query lies inside out
    return ops.adapter_add.out(t.a, vq_alias, out=big[:96].view(2, 2, 3, 8))


BAD = [  # (what the message says, the call)
    # dtype mismatch, unsupported dtype
    ("share one dtype", lambda t: ops.query_concat(t.q, t.f.half())),
    ("share one dtype", lambda t: ops.adapter_add(t.a.half(), t.vq)),
    ("share one dtype", lambda t: ops.adapter_attention(t.xq, t.k_t, t.v.half(), t.gate, t.ng)),
    ("share one dtype", lambda t: ops.adapter_attention(t.xq, t.k_t, t.v, t.gate, t.ng.half())),
    ("allowed dtypes", lambda t: ops.query_concat(t.q.double(), t.f.double())),
    ("allowed dtypes", lambda t: ops.adapter_add(t.a.int(), t.vq.int())),
    ("allowed dtypes", lambda t: ops.adapter_attention(t.xq.double(), t.k_t.double(), t.v.double(),
                                                       t.gate.double(), None)),
    # a CPU tensor with CUDA tensors
    ("one device", lambda t: ops.query_concat(t.q.cpu(), t.f)),
    ("one device", lambda t: ops.query_concat(t.q, t.f.cpu())),
    ("one device", lambda t: ops.adapter_add(t.a, t.vq.cpu())),
    ("one device", lambda t: ops.adapter_attention(t.xq, t.k_t.cpu(), t.v, t.gate, t.ng)),
    ("one device", lambda t: ops.adapter_attention(t.xq, t.k_t, t.v, t.gate.cpu(), t.ng)),
    ("one device", lambda t: ops.adapter_attention(t.xq, t.k_t, t.v, t.gate, t.ng.cpu())),
    # ranks and shapes
    ("expected", lambda t: ops.query_concat(t.q[0], t.f)),
    ("expected", lambda t: ops.query_concat(t.q, t.f[0])),
    ("must agree", lambda t: ops.query_concat(t.r(3, 9), t.f)),
    ("expected", lambda t: ops.adapter_add(t.r(2, 3, 8, 1), t.vq)),
    ("must agree", lambda t: ops.adapter_add(t.r(2, 4, 8), t.vq)),
    ("must agree", lambda t: ops.adapter_add(t.r(2, 3, 9), t.vq)),
    ("not a multiple", lambda t: ops.adapter_add(t.r(7, 8), t.vq)),
    ("expected", lambda t: ops.adapter_attention(t.xq[0], t.k_t, t.v, t.gate, t.ng)),
    ("k_t must be", lambda t: ops.adapter_attention(t.xq, t.k_t[..., :3], t.v, t.gate, t.ng)),
    ("k_t must be", lambda t: ops.adapter_attention(t.xq, t.k_t, t.v[:1], t.gate, t.ng)),
    ("k_t must be", lambda t: ops.adapter_attention(t.xq, t.k_t, t.r(2, 2, 4, 9), t.gate, t.ng)),
    ("gate must be", lambda t: ops.adapter_attention(t.xq, t.k_t, t.v, t.r(1, 3, 1, 1), t.ng)),
    ("new_gate must be", lambda t: ops.adapter_attention(t.xq, t.k_t, t.v, t.gate, t.r(1, 1, 1, 2))),
    # empty tensors
    ("empty", lambda t: ops.query_concat(_empty(0, 8), t.f)),
    ("empty", lambda t: ops.query_concat(t.q, _empty(0, 5, 8))),
    ("empty", lambda t: ops.adapter_add(_empty(0, 3, 8), t.vq)),
    ("empty", lambda t: ops.adapter_add(t.a, _empty(2, 3, 0))),
    ("empty", lambda t: ops.adapter_attention(_empty(2, 2, 0, 8), t.k_t, t.v, t.gate, t.ng)),
    ("empty", lambda t: ops.adapter_attention(t.xq, _empty(2, 2, 8, 0), _empty(2, 2, 0, 8), t.gate, t.ng)),
    # out=
    ("expected", lambda t: ops.query_concat.out(t.q, t.f, out=_empty(2, 7, 8))),
    ("expected", lambda t: ops.query_concat.out(t.q, t.f, out=_empty(2, 8, 8).half())),
    ("expected", lambda t: ops.query_concat.out(t.q, t.f, out=torch.empty(2, 8, 8))),  # on the CPU
    ("contiguous", lambda t: ops.query_concat.out(t.q, t.f, out=_empty(8, 2, 8).transpose(0, 1))),
    ("expected", lambda t: ops.adapter_add.out(t.a, t.vq, out=_empty(2, 2, 3, 9))),
    ("shares memory", _aliasing_out),
]


@pytest.mark.parametrize("match,call", BAD, ids=[f"{i}-{m.replace(' ', '_')}" for i, (m, _) in enumerate(BAD)])
def test_bad_input_is_an_error_not_a_crash(t, match, call):
    with pytest.raises(RuntimeError, match=match):
        call(t)
    torch.cuda.synchronize()  # the context is still healthy
    assert torch.equal(ops.query_concat(t.q, t.f), R.query_concat(t.q, t.f))
