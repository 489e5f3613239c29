"""query_concat on every backend (conftest.py) against upstream's own form, written here.

A copy: exact in every dtype (torch.equal), whatever the inputs' strides and alignment; out=,
gradients, opcheck, torch.compile, and bad input refused in one wording by every backend (and by
the C++ kernels themselves, and their fakes on meta tensors, in the same words).
"""

from __future__ import annotations

import pytest
import torch
from op_backends import grads_of, opcheck, shifted

from surgery import ops
from surgery.errors import OpInputError


def upstream(queries, feats):
    """LLaMA-Adapter V2: visual_query.weight.unsqueeze(0).repeat(B, 1, 1), then cat with the features."""
    return torch.cat([queries.unsqueeze(0).repeat(feats.shape[0], 1, 1), feats], dim=1)


SHAPES = [  # Q, N, B, C: single elements, C past a vector width or a 4096 tile, long N, batch of one
    (1, 1, 1, 1), (3, 5, 2, 7), (3, 5, 2, 17), (2, 1, 1, 6), (1, 1, 5, 3), (10, 257, 3, 64), (1, 7, 1, 1030),
    (5, 3, 4, 1537), (3, 7, 2, 4096), (1, 5, 1, 4099), (2, 3, 2, 4099),
]


@pytest.mark.parametrize("Q,N,B,C", SHAPES)
def test_matches_upstream_exactly(backend, dtype, Q, N, B, C):
    r = backend.maker(dtype)
    queries, feats = r(Q, C), r(B, N, C)
    got = backend("query_concat", queries, feats)
    assert got.shape == (B, Q + N, C) and got.dtype == dtype and got.device == feats.device and got.is_contiguous()
    assert torch.equal(got, upstream(queries, feats))


def test_strided_inputs_are_read_in_place(backend, dtype):
    r = backend.maker(dtype)
    Q, N, B, C = 6, 9, 3, 130
    queries = {
        "sliced": r(Q + 3, C + 10)[2:2 + Q, 3:3 + C],  # a slice of a bigger table: odd offset, row stride C+10
        "transposed": r(C, Q).t(),  # channel stride Q
        "expanded": r(1, C).expand(Q, C),  # row stride 0
    }
    feats = {
        "transposed": r(B, C, N).transpose(1, 2),  # channel stride N
        "batch strided": r(N, B, C).transpose(0, 1),  # batch stride C
        "sliced": r(B, 2 * N + 5, C + 4)[:, 5::2, 2:2 + C],  # every other token of a slice
        "channel stride 2": r(B, N, 2 * C)[..., ::2],
        "expanded": r(1, N, C).expand(B, N, C),  # batch stride 0
    }
    for q_name, q in queries.items():
        for f_name, f in feats.items():
            assert not q.is_contiguous() and not f.is_contiguous()
            assert torch.equal(backend("query_concat", q, f), upstream(q, f)), (q_name, f_name)


@pytest.mark.parametrize("offset", range(8))
@pytest.mark.parametrize("C", [64, 130, 4096 + 3])
def test_misaligned_inputs(backend, dtype, offset, C):
    """Data pointers at every offset from a 16-byte boundary: every vector width of the copy."""
    r = backend.maker(dtype, seed=offset)
    queries, feats = shifted(r(4, C), offset), shifted(r(3, 9, C), (offset * 3) % 8)
    assert torch.equal(backend("query_concat", queries, feats), upstream(queries, feats))


def test_out(backend, dtype):
    r = backend.maker(dtype)
    queries, feats = r(4, 33), r(2, 7, 33)
    out = torch.full((2, 11, 33), float("nan"), device=backend.device, dtype=dtype)
    assert backend("query_concat", queries, feats, out=out) is out
    assert torch.equal(out, upstream(queries, feats))
    feats_t = r(2, 33, 7).transpose(1, 2)  # strided input into the same out
    backend("query_concat", queries, feats_t, out=out)
    assert torch.equal(out, upstream(queries, feats_t))
    buffer = torch.zeros(3, 2, 11, 33, device=backend.device, dtype=dtype)
    backend("query_concat", queries, feats, out=buffer[1])  # a contiguous slice of a bigger buffer
    assert torch.equal(buffer[1], upstream(queries, feats))
    assert not buffer[0].any() and not buffer[2].any()
    misaligned = shifted(torch.full((2, 11, 33), float("nan"), device=backend.device, dtype=dtype), 1)
    backend("query_concat", queries, feats, out=misaligned)  # contiguous, not 16-byte aligned
    assert torch.equal(misaligned, upstream(queries, feats))


def test_out_sharing_memory_with_an_input_is_refused_and_nothing_is_written(backend):
    r = backend.maker()
    queries, feats = r(3, 5), r(2, 4, 5)
    buffer = torch.zeros(2 * 7 * 5 + 40, device=backend.device)
    overlapping = buffer[:2 * 4 * 5].view(2, 4, 5)
    with pytest.raises(OpInputError, match=r"^query_concat: out shares memory with feats; the kernels read"):
        backend("query_concat", queries, overlapping, out=buffer[:70].view(2, 7, 5))
    assert not buffer.any()
    out = buffer[40:].view(2, 7, 5)  # disjoint pieces of one buffer are fine
    backend("query_concat", queries, buffer[:40].view(2, 4, 5).copy_(feats), out=out)
    assert torch.equal(out, upstream(queries, feats))


def test_out_on_meta_tensors_has_no_memory_to_share():
    meta = torch.empty(2, 7, 5, device="meta")
    assert ops.query_concat(torch.empty(3, 5, device="meta"), torch.empty(2, 4, 5, device="meta"), out=meta,
                            backend="eager") is meta


def test_out_refuses_inputs_that_need_grad(backend):
    r = backend.maker()
    queries, feats = r(3, 8).requires_grad_(), r(2, 5, 8)
    out = torch.empty(2, 8, 8, device=backend.device)
    with pytest.raises(OpInputError, match="out= does not support automatic differentiation"):
        backend("query_concat", queries, feats, out=out)
    with pytest.raises(OpInputError, match="out= does not support automatic differentiation"):
        backend("query_concat", queries.detach(), feats, out=out.requires_grad_())
    with torch.no_grad():
        got = backend("query_concat", queries, feats, out=out.detach())
    assert torch.equal(got, upstream(queries, feats).detach())


def test_gradients_match_upstream(backend, dtype):
    r = backend.maker(dtype)
    g = backend.maker(dtype, seed=1)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for queries, feats in [(r(3, 20), r(2, 5, 20)), (r(20, 4).t(), r(3, 20, 6).transpose(1, 2))]:
        grad = g(feats.shape[0], queries.shape[0] + feats.shape[1], 20)
        out, got = grads_of(lambda q, f: backend("query_concat", q, f), (queries, feats), grad)
        want_out, want = grads_of(upstream, (queries, feats), grad)
        assert torch.equal(out, want_out)
        for name, a, b in zip(("queries", "feats"), got, want):
            assert a.dtype == dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, **tol, msg=name)


def test_opcheck(backend, dtype):
    """The backend's op: schema, autograd registration, fake tensors and AOT dispatch; its out= op:
    the C++ `.out` returns an alias (Tensor(a!)), which AOT dispatch cannot functionalise, so
    schema and fake tensors only there."""
    r = backend.maker(dtype)
    op = backend.op("query_concat")
    opcheck(op.default, (r(3, 17), r(2, 5, 17)))
    opcheck(op.default, (r(17, 3).t().requires_grad_(), r(2, 17, 5).transpose(1, 2).requires_grad_()))
    out_op, args, kwargs = backend.out_call("query_concat", (r(3, 17), r(2, 5, 17)),
                                            torch.empty(2, 8, 17, device=backend.device, dtype=dtype))
    opcheck(out_op, args, kwargs, utils=("test_schema", "test_faketensor") if backend.compiled else None)


def test_meta_tensors(backend):
    op = backend.meta_op("query_concat")
    out = op(torch.empty(3, 5, device="meta"), torch.empty(2, 4, 5, device="meta"))
    assert out.shape == (2, 7, 5) and out.device.type == "meta"


def test_torch_compile_fullgraph(backend, dtype):
    """The public function compiles without a graph break (out= too, except the C++ `.out`, see
    test_opcheck); the compiled code computes what upstream does."""
    r = backend.maker(dtype)
    queries, feats = r(10, 72), r(2, 7, 72)
    expected = upstream(queries, feats)
    assert torch.equal(backend("query_concat", queries, feats), expected)  # loads the backend, outside the graph
    torch._dynamo.reset()
    concat = torch.compile(lambda q, f: backend("query_concat", q, f) * 2, fullgraph=True)
    assert torch.equal(concat(queries, feats), expected * 2)
    if not backend.compiled:
        out = torch.empty(2, 17, 72, device=backend.device, dtype=dtype)
        torch.compile(lambda q, f, o: backend("query_concat", q, f, out=o), fullgraph=True)(queries, feats, out)
        assert torch.equal(out, expected)
    torch._dynamo.reset()


# -- bad input: one wording from every backend, and from the C++ kernels and their fakes ----------------

def bad_calls(r, device):
    """(args, kwargs, what the refusal says: a regex, the public wording without "surgery::")."""
    q, f = r(3, 5), r(2, 4, 5)
    dev = str(device)
    return [
        ((q, f.bfloat16()), {}, r"^query_concat: feats is bfloat16 but queries is float32; all inputs must share one "
                                r"dtype \(float32, bfloat16 or float16\)$"),
        ((q.half(), f), {}, r"^query_concat: feats is float32 but queries is float16"),
        ((q.long(), f.long()), {}, r"^query_concat: queries is int64; allowed dtypes: float32, bfloat16 or float16$"),
        ((q.double(), f.double()), {}, r"^query_concat: queries is float64; allowed dtypes"),
        ((q[None], f), {}, r"^query_concat: queries has shape \[1, 3, 5\] \(3 dimensions\); expected \(Q, C\)"),
        ((q, f[0]), {}, r"^query_concat: feats has shape \[4, 5\] \(2 dimensions\); expected \(B, N, C\)"),
        ((r(3, 6), f), {}, r"^query_concat: queries have C=6 channels but feats have C=5; they must agree$"),
        ((q, f[:, :0]), {}, r"^query_concat: feats is empty \(shape \[2, 0, 5\]\); every dimension must be >= 1$"),
        ((q[:0], f), {}, r"^query_concat: queries is empty"),
        ((q.to("meta"), f), {}, rf"^query_concat: feats is on {dev} but queries is on meta; all inputs must be on "
                                r"one device$"),
        ((q, f), {"out": r(2, 7, 6)}, rf"^query_concat: out is \[2, 7, 6\] float32 on {dev}; expected \[2, 7, 5\] "
                                      rf"float32 on {dev}$"),
        ((q, f), {"out": r(2, 7, 5).half()}, r"^query_concat: out is \[2, 7, 5\] float16 on \S+; expected"),
        ((q, f), {"out": r(0)}, r"^query_concat: out is \[0\] float32 on \S+; expected"),
        ((q, f), {"out": torch.empty(2, 7, 5, device="meta")}, r"^query_concat: out is \[2, 7, 5\] float32 on meta"),
        ((q, f), {"out": r(5, 7, 2).transpose(0, 2)}, r"^query_concat: out must be contiguous \(it is written row by "
                                                      r"row\); got strides"),
    ] + ([] if device.type == "cpu" else [  # CPU tensors among GPU ones
        ((q.cpu(), f), {}, rf"^query_concat: feats is on {dev} but queries is on cpu; all inputs must be on one"),
        ((q, f.cpu()), {}, rf"^query_concat: feats is on cpu but queries is on {dev}"),
        ((q, f), {"out": torch.empty(2, 7, 5)}, rf"^query_concat: out is \[2, 7, 5\] float32 on cpu; expected "
                                                rf"\[2, 7, 5\] float32 on {dev}$"),
    ])


def test_bad_input_is_refused(backend):
    r = backend.maker()
    for args, kwargs, message in bad_calls(r, backend.device):
        with pytest.raises(OpInputError, match=message):
            backend("query_concat", *args, **kwargs)
    with pytest.raises(OpInputError, match=r"^query_concat: queries is not a dense \(strided\) tensor"):
        backend("query_concat", r(3, 5).to_sparse(), r(2, 4, 5))


def test_kernel_and_fake_refuse_in_the_same_words(backend):
    """The checks are written twice, in C++ (csrc/checks.h) and in Python (surgery/ops/checks.py, for the
    public functions and the fakes): the C++ op says "surgery::" + what the public function says, and on
    meta tensors its fake says the same (with the device named meta)."""
    if not backend.compiled:
        pytest.skip("only the C++ ops check their inputs themselves")
    r = backend.maker()
    op = backend.op("query_concat")
    for args, kwargs, _ in bad_calls(r, backend.device):
        call = op.out if "out" in kwargs else op
        with pytest.raises(RuntimeError) as kernel:
            call(*args, **kwargs)
        assert str(kernel.value).startswith("surgery::query_concat: ")
        with pytest.raises(OpInputError) as public:
            backend("query_concat", *args, **kwargs)
        assert str(kernel.value) == "surgery::" + str(public.value)
        if len({t.device for t in (*args, *kwargs.values())}) > 1:
            continue  # a device mismatch: it cannot be put on meta tensors
        meta_args = [t.to("meta") for t in args]
        meta_kwargs = {k: t.to("meta") for k, t in kwargs.items()}
        with pytest.raises(RuntimeError) as fake:
            call(*meta_args, **meta_kwargs)
        assert str(fake.value) == str(kernel.value).replace(str(backend.device), "meta")
    buffer = torch.zeros(2 * 7 * 5 + 40, device=backend.device)  # sharing memory: no meta form
    with pytest.raises(RuntimeError, match=r"^surgery::query_concat: out shares memory with feats; the kernels"):
        op.out(r(3, 5), buffer[:40].view(2, 4, 5), out=buffer[:70].view(2, 7, 5))
    assert not buffer.any()
    queries, feats = r(3, 8), r(2, 5, 8)
    assert torch.equal(op(queries, feats), upstream(queries, feats))  # after the refusals (a CUDA context too)


def test_kernel_out_refuses_inputs_that_require_grad(backend):
    if not backend.compiled:
        pytest.skip("the C++ `.out` overload's own check (the public function refuses first)")
    r = backend.maker()
    queries, feats = r(3, 5).requires_grad_(), r(2, 4, 5)
    out = torch.empty(2, 7, 5, device=backend.device)
    with pytest.raises(RuntimeError, match=r"^surgery::query_concat.out: queries requires grad, but the out= "
                                           r"overload does not support automatic differentiation"):
        backend.op("query_concat").out(queries, feats, out=out)
    version = out._version
    with torch.no_grad():
        backend.op("query_concat").out(queries, feats, out=out)
    assert torch.equal(out, upstream(queries, feats).detach())
    assert out._version > version  # an in-place write, seen by autograd's saved-tensor checks
