"""adapter_attention on every backend (conftest.py) against upstream's formula, written here.

The kernels (cpp, cuda, triton) accumulate in fp32 and round once: within one rounding of the
float64 truth and at least as close to it as upstream's form run in the dtype, which rounds the
scores, the softmax and the gates on the way. The eager backend is upstream's form: close to it.
Also: strided and misaligned inputs, large scores, gradients (against float64 autograd), opcheck,
torch.compile forward and backward, and bad input refused in one wording by every backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_backends import grads_of, opcheck, shifted

from surgery.errors import OpInputError

NAMES = ("xq", "k_t", "v", "gate", "new_gate")


def upstream(xq, k_t, v, gate, new_gate):
    """LLaMA-Adapter V2's adapter branch, in the inputs' dtype: gate.tanh() (given here already
    squashed) * softmax(xq @ adapter_k^T / sqrt(hd) in float32).type_as(xq), times new_gate, @ adapter_v."""
    scores = torch.matmul(xq, k_t) / math.sqrt(xq.shape[-1])  # (B, H, T, Q)
    scores = gate * torch.softmax(scores.float(), dim=-1).type_as(xq)
    if new_gate is not None:
        scores = new_gate * scores
    return torch.matmul(scores, v)  # (B, H, T, hd)


def float64(tensors):
    return [t.double() if t is not None else None for t in tensors]


def truth(xq, k_t, v, gate, new_gate):
    """The same in float64."""
    return upstream(*float64((xq, k_t, v, gate, new_gate)))


# vs upstream's form run in the dtype (it rounds on the way); vs the float64 truth after one rounding
LOOSE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
         torch.float16: dict(rtol=4e-3, atol=4e-3)}
ONE_ROUNDING = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-4, rtol=2**-7),
                torch.float16: dict(atol=1e-5, rtol=2**-10)}


def attention_inputs(r, B, H, T, hd, Q, new_gate=True):
    return r(B, H, T, hd), r(B, H, hd, Q), r(B, H, Q, hd), r(1, H, 1, 1).tanh(), r(1, 1, 1, 1) if new_gate else None


def check_attention(backend, got, args):
    xq = args[0]
    dtype = xq.dtype
    assert got.shape == xq.shape and got.dtype == dtype and got.device == xq.device and got.is_contiguous()
    assert torch.isfinite(got).all()
    in_dtype = upstream(*args)
    torch.testing.assert_close(got, in_dtype, **LOOSE[dtype])
    if backend.name == "eager":
        return  # upstream's own rounding, checked above
    want = truth(*args)
    torch.testing.assert_close(got.double(), want, **ONE_ROUNDING[dtype])
    if dtype != torch.float32:
        # one rounding of the fp32 result: every element within half an ulp of the truth (plus fp32
        # noise), and nowhere, nor overall, further from it than upstream's form in the dtype
        bound = want.abs() * (torch.finfo(dtype).eps / 2 + 1e-5) + 1e-6
        assert ((got.double() - want).abs() <= bound).all()
        assert (got.double() - want).abs().max() <= (in_dtype.double() - want).abs().max() + 1e-6
        assert (got.double() - want).norm() <= (in_dtype.double() - want).norm() * 1.05 + 1e-7 * want.norm()


SHAPES = [  # B, H, T, hd, Q: decoding (T=1) and prefill, Q=1, hd and Q not powers of two, Q over many blocks
    (1, 1, 1, 1, 1), (1, 1, 1, 16, 1), (1, 1, 1, 128, 1), (2, 3, 5, 16, 10), (2, 3, 7, 24, 10), (2, 3, 1, 128, 10),
    (2, 4, 1, 128, 10), (1, 32, 1, 128, 10), (8, 32, 1, 128, 10), (2, 4, 9, 13, 7), (1, 2, 5, 64, 7),
    (1, 2, 3, 200, 5), (1, 2, 3, 4099, 3), (3, 2, 1, 40, 17), (1, 1, 70, 80, 17), (1, 3, 1, 67, 16),
    (3, 2, 2, 80, 33), (1, 2, 1, 24, 70), (2, 2, 3, 64, 130), (1, 2, 40, 20, 150), (2, 4, 3, 128, 256),
    (2, 2, 1, 16, 1000), (1, 1, 2, 128, 20000),
]


@pytest.mark.parametrize("B,H,T,hd,Q", SHAPES)
@pytest.mark.parametrize("new_gate", [True, False], ids=["new_gate", "no_new_gate"])
def test_matches_upstream(backend, dtype, B, H, T, hd, Q, new_gate):
    args = attention_inputs(backend.maker(dtype, seed=B * 7 + Q), B, H, T, hd, Q, new_gate)
    check_attention(backend, backend("adapter_attention", *args), args)


@pytest.mark.parametrize("T", [1, 6])  # decoding (one row per (b, h)), prefill (several)
def test_strided_inputs_are_read_in_place(backend, dtype, T):
    """The model's layouts and more: xq from (B, T, H, hd), k_t a transposed view or a slice or
    expanded over the batch, v sliced, strided or expanded, gates sliced out of bigger tensors."""
    r = backend.maker(dtype, seed=3)
    B, H, hd, Q = 2, 3, 128, 16
    xq = r(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
    keys = {
        "from k": r(B, H, Q, hd).transpose(2, 3),  # q stride hd
        "sliced": r(B, H + 1, hd, Q + 8)[:, 1:, :, 4:4 + Q],
        "expanded": r(1, H, Q, hd).transpose(-1, -2).expand(B, H, hd, Q),
    }
    values = {
        "sliced rows": r(B, H, Q, hd + 16)[..., 5:5 + hd],
        "channel stride 2": r(B, H, Q + 2, 2 * hd)[:, :, 1:1 + Q, ::2],
        "channel stride Q": r(B, H, hd, Q).transpose(2, 3),
        "expanded": r(1, H, Q, hd + 8)[..., 4:hd + 4].expand(B, H, Q, hd),
    }
    gate = r(2, 2 * H, 1, 3).tanh()[1:, ::2, :, 1:2]  # (1, H, 1, 1), stride 2 over the heads
    new_gate = r(3, 1, 1, 4)[2:, ..., 2:3]
    for k_t in keys.values():
        for v in values.values():
            args = (xq, k_t, v, gate, new_gate)
            assert not k_t.is_contiguous() and not v.is_contiguous() and (T == 1 or not xq.is_contiguous())
            check_attention(backend, backend("adapter_attention", *args), args)


def test_misaligned_inputs(backend, dtype):
    args = attention_inputs(backend.maker(dtype), 2, 3, 1, 128, 24)
    for by in (1, 2, 4):
        shifted_args = (shifted(args[0], by), shifted(args[1], by), shifted(args[2], by), args[3], args[4])
        check_attention(backend, backend("adapter_attention", *shifted_args), shifted_args)


@pytest.mark.parametrize("scale_xq,scale_k,shape", [(1e3, 1, (1, 2, 3, 8, 4)), (300, 1, (2, 2, 1, 128, 40)),
                                                    (30, 30, (1, 2, 3, 16, 100))])
def test_softmax_is_stable_for_large_scores(backend, scale_xq, scale_k, shape):
    """Scores far beyond exp's range: the softmax subtracts the max (no inf, no NaN)."""
    xq, k_t, v, gate, new_gate = attention_inputs(backend.maker(), *shape)
    args = (xq * scale_xq, k_t * scale_k, v, gate, new_gate)
    got = backend("adapter_attention", *args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, upstream(*args), atol=1e-5, rtol=1e-4)


def test_q_too_large_for_shared_memory_is_an_error(backend):
    if backend.name != "cuda":
        pytest.skip("only the CUDA kernel keeps a row of scores in shared memory")
    args = attention_inputs(backend.maker(torch.bfloat16), 1, 1, 1, 128, 200_000)
    with pytest.raises(RuntimeError, match="shared memory"):
        backend("adapter_attention", *args)


# -- gradients -------------------------------------------------------------------------------------


def grad_tolerance(dtype, scale):
    if dtype == torch.float32:
        return dict(atol=1e-5 * max(1.0, scale), rtol=1e-4)
    return dict(atol=2e-2 * max(1.0, scale), rtol=2e-2)


@pytest.mark.parametrize("B,H,T,hd,Q", [(2, 3, 4, 8, 5), (2, 3, 7, 24, 10), (1, 2, 20, 16, 70)])
@pytest.mark.parametrize("new_gate", [True, False], ids=["new_gate", "no_new_gate"])
def test_gradients_match_truth(backend, dtype, B, H, T, hd, Q, new_gate):
    """Every input's gradient, in its dtype and shape, against autograd through upstream in float64."""
    args = attention_inputs(backend.maker(dtype), B, H, T, hd, Q, new_gate)
    grad = backend.maker(dtype, seed=3)(B, H, T, hd)
    _, got = grads_of(lambda *a: backend("adapter_attention", *a), args, grad)
    _, want = grads_of(truth, float64(args), grad.double())
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, **grad_tolerance(dtype, b.abs().max().item()), msg=name)


@pytest.mark.parametrize("which", NAMES)
def test_gradient_of_one_input_only(backend, which):
    args = attention_inputs(backend.maker(), 1, 2, 4, 16, 6)
    index = NAMES.index(which)
    leaf = args[index].clone().requires_grad_()
    with_leaf = args[:index] + (leaf,) + args[index + 1:]
    (got,) = torch.autograd.grad(backend("adapter_attention", *with_leaf).sum(), [leaf])
    want_leaf = args[index].double().requires_grad_()
    truth(*(a.double() for a in args[:index]), want_leaf, *(a.double() for a in args[index + 1:])).sum().backward()
    torch.testing.assert_close(got.double(), want_leaf.grad, **grad_tolerance(torch.float32, 1.0))


# -- torch.library and torch.compile ---------------------------------------------------------------


def test_opcheck(backend, dtype):
    r = backend.maker(dtype)
    op = backend.op("adapter_attention")
    opcheck(op.default, attention_inputs(r, 2, 3, 4, 8, 5))
    opcheck(op.default, attention_inputs(r, 2, 3, 5, 24, 10, new_gate=False))
    opcheck(op.default, tuple(t.requires_grad_() for t in attention_inputs(r, 2, 2, 1, 16, 8)))
    opcheck(op.default, tuple(t.requires_grad_() if t is not None else None
                              for t in attention_inputs(r, 1, 2, 3, 8, 4, new_gate=False)))


def test_meta_tensors(backend):
    op = backend.meta_op("adapter_attention")
    meta = dict(device="meta")
    out = op(torch.empty(2, 3, 4, 8, **meta), torch.empty(2, 3, 8, 5, **meta), torch.empty(2, 3, 5, 8, **meta),
             torch.empty(1, 3, 1, 1, **meta), None)
    assert out.shape == (2, 3, 4, 8) and out.device.type == "meta"


def test_torch_compile_fullgraph(backend, dtype):
    args = attention_inputs(backend.maker(dtype), 2, 4, 1, 128, 10)
    expected = backend("adapter_attention", *args)  # loads the backend, outside the graph
    torch._dynamo.reset()
    got = torch.compile(lambda *a: backend("adapter_attention", *a), fullgraph=True)(*args)
    if backend.name != "eager":  # the same kernel: the same bits (the eager form may be fused differently)
        assert torch.equal(got, expected)
    check_attention(backend, got, args)
    torch._dynamo.reset()


def test_torch_compile_backward(backend):
    args = attention_inputs(backend.maker(), 1, 2, 3, 16, 7)
    grad = backend.maker(seed=4)(1, 2, 3, 16)
    backend("adapter_attention", *args)  # loads the backend, outside the graph
    torch._dynamo.reset()
    _, got = grads_of(torch.compile(lambda *a: backend("adapter_attention", *a), fullgraph=True), args, grad)
    _, want = grads_of(truth, float64(args), grad.double())
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4, msg=name)
    torch._dynamo.reset()


# -- bad input: one wording from every backend, and from the C++ kernels and their fakes ----------------

def bad_calls(r, device):
    """(args, what the refusal says: a regex, the public wording without "surgery::")."""
    xq, k_t, v, gate, ng = attention_inputs(r, 2, 3, 4, 8, 5)
    dev = str(device)
    return [
        ((xq, k_t.bfloat16(), v, gate, ng), r"^adapter_attention: k_t is bfloat16 but xq is float32; all inputs "
                                            r"must share one dtype"),
        ((xq, k_t, v.half(), gate, ng), r"^adapter_attention: v is float16 but xq is float32"),
        ((xq, k_t, v, gate, ng.half()), r"^adapter_attention: new_gate is float16 but xq is float32"),
        (tuple(t.double() for t in (xq, k_t, v, gate, ng)), r"^adapter_attention: xq is float64; allowed dtypes"),
        ((xq.double(), k_t.double(), v.double(), gate.double(), None), r"^adapter_attention: xq is float64"),
        (tuple(t.long() for t in (xq, k_t, v, gate, ng)), r"^adapter_attention: xq is int64; allowed dtypes"),
        ((xq[0], k_t, v, gate, ng), r"^adapter_attention: xq has shape \[3, 4, 8\] \(3 dimensions\); expected "
                                    r"\(B, H, T, hd\) \(4 dimensions\)$"),
        ((xq, k_t, v, gate[0], ng), r"^adapter_attention: gate has shape \[3, 1, 1\] \(3 dimensions\); expected "
                                    r"\(1, H, 1, 1\)"),
        ((xq, k_t, v, gate, ng[0]), r"^adapter_attention: new_gate has shape \[1, 1, 1\]"),
        ((xq, k_t[..., :4], v, gate, ng), r"^adapter_attention: with xq \[2, 3, 4, 8\] \(B, H, T, hd\), k_t must be "
                                          r"\(B, H, hd, Q\) and v \(B, H, Q, hd\) for one Q; got k_t \[2, 3, 8, 4\], "
                                          r"v \[2, 3, 5, 8\]$"),
        ((xq, k_t, v[..., :7], gate, ng), r"^adapter_attention: with xq .* k_t must be \(B, H, hd, Q\)"),
        ((xq, k_t[:1], v[:1], gate, ng), r"^adapter_attention: .* for one Q"),
        ((xq, k_t, r(2, 3, 4, 9), gate, ng), r"^adapter_attention: .* for one Q"),
        ((xq, k_t, v, r(1, 4, 1, 1), ng), r"^adapter_attention: gate must be \(1, 3, 1, 1\), one value per head; "
                                          r"got \[1, 4, 1, 1\]$"),
        ((xq, k_t, v, gate, r(1, 1, 1, 2)), r"^adapter_attention: new_gate must be \(1, 1, 1, 1\); got "
                                            r"\[1, 1, 1, 2\]$"),
        ((xq[:, :, :0], k_t, v, gate, ng), r"^adapter_attention: xq is empty \(shape \[2, 3, 0, 8\]\)"),
        ((xq, k_t[..., :0], v[:, :, :0], gate, ng), r"^adapter_attention: k_t is empty"),
        ((xq, k_t, v.to("meta"), gate, ng), rf"^adapter_attention: v is on meta but xq is on {dev}; all inputs "
                                            r"must be on one device$"),
        ((xq, k_t, v, gate.to("meta"), ng), r"^adapter_attention: gate is on meta"),
        ((xq, k_t, v, gate, ng.to("meta")), r"^adapter_attention: new_gate is on meta"),
    ] + ([] if device.type == "cpu" else [  # CPU tensors among GPU ones
        ((xq, k_t.cpu(), v, gate, ng), rf"^adapter_attention: k_t is on cpu but xq is on {dev}; all inputs must"),
        ((xq, k_t, v, gate.cpu(), ng), r"^adapter_attention: gate is on cpu"),
        ((xq, k_t, v, gate, ng.cpu()), r"^adapter_attention: new_gate is on cpu"),
    ])


def test_bad_input_is_refused(backend):
    for args, message in bad_calls(backend.maker(), backend.device):
        with pytest.raises(OpInputError, match=message):
            backend("adapter_attention", *args)


def test_kernel_and_fake_refuse_in_the_same_words(backend):
    """As query_concat's: "surgery::" + the public wording, and the same from the fake on meta tensors."""
    if not backend.compiled:
        pytest.skip("only the C++ ops check their inputs themselves")
    r = backend.maker()
    op = backend.op("adapter_attention")
    for args, _ in bad_calls(r, backend.device):
        with pytest.raises(RuntimeError) as kernel:
            op(*args)
        with pytest.raises(OpInputError) as public:
            backend("adapter_attention", *args)
        assert str(kernel.value) == "surgery::" + str(public.value)
        if len({t.device for t in args if t is not None}) > 1:
            continue  # a device mismatch: it cannot be put on meta tensors
        with pytest.raises(RuntimeError) as fake:
            op(*(t.to("meta") if t is not None else None for t in args))
        assert str(fake.value) == str(kernel.value).replace(str(backend.device), "meta")
    args = attention_inputs(r, 2, 2, 1, 8, 4)
    check_attention(backend, op(*args), args)  # after the refusals (a CUDA context too)
