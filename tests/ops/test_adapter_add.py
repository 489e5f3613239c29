"""adapter_add on every backend (conftest.py) against upstream's own form, written here.

One add per element, in the dtype as eager torch does it: exact in every dtype (torch.equal), for
(L, Q, D) and flat (L*Q, D) adapters, any strides and alignment, large outputs, and the rounding
cases of bfloat16/float16 bit for bit; out=, gradients, opcheck, torch.compile, and bad input
refused in one wording by every backend (and by the C++ kernels and their fakes, in the same words).
"""

from __future__ import annotations

import pytest
import torch
from op_backends import grads_of, opcheck, shifted

from surgery.errors import OpInputError


def upstream(adapter, visual_query):
    """LLaMA-Adapter V2, per adapted layer i: adapter[i].repeat(B, 1, 1) + visual_query, stacked."""
    B, Q, D = visual_query.shape
    table = adapter.reshape(-1, Q, D)  # adapter_query.weight.reshape(-1, query_len, dim)
    return torch.stack([table[i].repeat(B, 1, 1) + visual_query for i in range(table.shape[0])])


SHAPES = [  # L, B, Q, D: single elements, D past a vector width or a 4096 tile, 30 layers, one token
    (1, 1, 1, 1), (3, 2, 5, 7), (3, 2, 5, 17), (1, 4, 3, 33), (30, 2, 10, 96), (30, 2, 10, 256), (1, 1, 10, 1030),
    (4, 3, 1, 2049), (4, 3, 10, 4096), (30, 1, 10, 4096), (1, 1, 1, 4099), (2, 3, 1, 4099), (2, 8, 1, 4099),
]


@pytest.mark.parametrize("L,B,Q,D", SHAPES)
@pytest.mark.parametrize("flat", [False, True], ids=["lqd", "flat"])
def test_matches_upstream_exactly(backend, dtype, L, B, Q, D, flat):
    r = backend.maker(dtype)
    adapter, visual_query = r(L, Q, D), r(B, Q, D)
    if flat:
        adapter = adapter.reshape(L * Q, D)
    got = backend("adapter_add", adapter, visual_query)
    assert got.shape == (L, B, Q, D) and got.dtype == dtype and got.device == adapter.device and got.is_contiguous()
    assert torch.equal(got, upstream(adapter, visual_query))


def test_large_output_is_exact(backend, dtype):
    """Outputs of 8 MB and more (the C++ kernel's streaming walk: q blocks, non-temporal stores), with
    a row length that leaves a tail after the vector loop."""
    L, B, Q, D = 8, 8, 8 if dtype == torch.float32 else 16, 4096 + 24
    r = backend.maker(dtype)
    adapter, visual_query = r(L, Q, D), r(B, Q, D)
    got = backend("adapter_add", adapter, visual_query)
    assert got.numel() * got.element_size() >= 8 << 20
    assert torch.equal(got, upstream(adapter, visual_query))


def test_strided_inputs_are_read_in_place(backend, dtype):
    r = backend.maker(dtype)
    L, B, Q, D = 4, 3, 5, 136
    adapters = {
        "sliced": r(L + 2, Q + 3, D + 8)[1:1 + L, 2:2 + Q, 8:],  # a slice of a bigger (L, Q, D) table
        "layer strided": r(Q, L, D).transpose(0, 1),  # layer stride D
        "channel stride Q": r(L, D, Q).transpose(1, 2),
        "expanded": r(1, Q, D).expand(L, Q, D),  # layer stride 0
        "flat sliced": r(L * Q + 5, D + 3)[5:, 3:],  # a slice of a bigger flat table
        "flat channel stride 2": r(L * Q, 2 * D)[:, ::2],
        "flat transposed": r(D, L * Q).t(),
    }
    visual_queries = {
        "batch strided": r(Q, B, D).transpose(0, 1),
        "channel stride Q": r(B, D, Q).transpose(1, 2),
        "permuted": r(D, B, Q).permute(1, 2, 0),
        "channel stride 2": r(B, Q, 2 * D)[..., ::2],
        "sliced": r(B, Q + 2, D + 3)[:, 2:, 1:D + 1],
        "expanded": r(1, Q, D).expand(B, Q, D),  # batch stride 0
    }
    for a_name, adapter in adapters.items():
        for v_name, visual_query in visual_queries.items():
            assert not adapter.is_contiguous() and not visual_query.is_contiguous()
            got = backend("adapter_add", adapter, visual_query)
            assert torch.equal(got, upstream(adapter, visual_query)), (a_name, v_name)


@pytest.mark.parametrize("offset", range(8))
def test_misaligned_inputs(backend, dtype, offset):
    """Data pointers at every offset from a 16-byte boundary: every vector width of the add."""
    r = backend.maker(dtype, seed=offset)
    L, B, Q, D = 3, 2, 5, 264
    adapter, visual_query = shifted(r(L, Q, D), offset), shifted(r(B, Q, D), (offset + 2) % 8)
    assert torch.equal(backend("adapter_add", adapter, visual_query), upstream(adapter, visual_query))


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


def test_special_values_bit_exact(backend, dtype):
    """NaN, inf, overflow, denormal sums, signed zeros, ties: the same bits as eager torch."""
    if dtype == torch.float32:
        pytest.skip("the rounding cases of the bfloat16/float16 add")
    a, b = special_values(dtype)
    adapter, visual_query = a.view(2, 2, 64).to(backend.device), b.view(2, 2, 64).to(backend.device)  # L=Q=B=2
    got = backend("adapter_add", adapter, visual_query)
    expected = upstream(adapter, visual_query)
    same_bits = got.view(torch.int16) == expected.view(torch.int16)
    if backend.name == "triton":  # Triton's float32 -> 16-bit conversion may give NaN another bit pattern
        same_bits |= got.isnan() & expected.isnan()
    assert same_bits.all()


@pytest.mark.parametrize("flat", [False, True], ids=["lqd", "flat"])
def test_out(backend, dtype, flat):
    r = backend.maker(dtype)
    adapter, visual_query = r(4, 3, 19), r(2, 3, 19)
    if flat:
        adapter = adapter.reshape(12, 19)
    out = torch.full((4, 2, 3, 19), float("nan"), device=backend.device, dtype=dtype)
    assert backend("adapter_add", adapter, visual_query, out=out) is out
    assert torch.equal(out, upstream(adapter, visual_query))


def test_out_sharing_memory_with_an_input_is_refused_and_nothing_is_written(backend):
    r = backend.maker()
    adapter = r(2, 3, 8)
    big = torch.zeros(2 * 2 * 3 * 8 + 24, device=backend.device)
    inside = big[:24].view(1, 3, 8).expand(2, 3, 8)  # the visual query lies inside out
    with pytest.raises(OpInputError, match=r"^adapter_add: out shares memory with visual_query"):
        backend("adapter_add", adapter, inside, out=big[:96].view(2, 2, 3, 8))
    assert not big.any()


def test_out_refuses_inputs_that_need_grad(backend):
    r = backend.maker()
    adapter, visual_query = r(2, 3, 8), r(1, 3, 8).requires_grad_()
    out = torch.empty(2, 1, 3, 8, device=backend.device)
    with pytest.raises(OpInputError, match="out= does not support automatic differentiation"):
        backend("adapter_add", adapter, visual_query, out=out)
    with torch.no_grad():
        got = backend("adapter_add", adapter, visual_query, out=out)
    assert torch.equal(got, upstream(adapter, visual_query).detach())


@pytest.mark.parametrize("flat", [False, True], ids=["lqd", "flat"])
def test_gradients_match_upstream(backend, dtype, flat):
    r = backend.maker(dtype)
    adapter, visual_query = r(4, 3, 20), r(2, 3, 20)
    if flat:
        adapter = adapter.reshape(12, 20)
    grad = backend.maker(dtype, seed=2)(4, 2, 3, 20)
    out, got = grads_of(lambda a, v: backend("adapter_add", a, v), (adapter, visual_query), grad)
    want_out, want = grads_of(upstream, (adapter, visual_query), grad)
    assert torch.equal(out, want_out)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name, a, b in zip(("adapter", "visual_query"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name  # the adapter's gradient in its own shape
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_opcheck(backend, dtype):
    """As query_concat's: the functional op fully, the out= op as far as its schema allows."""
    r = backend.maker(dtype)
    op = backend.op("adapter_add")
    opcheck(op.default, (r(6, 7), r(2, 3, 7)))
    opcheck(op.default, (r(4, 3, 17).requires_grad_(), r(2, 3, 17).requires_grad_()))
    opcheck(op.default, (r(12, 17).requires_grad_(), r(2, 17, 3).transpose(1, 2).requires_grad_()))
    out_op, args, kwargs = backend.out_call("adapter_add", (r(12, 17), r(2, 3, 17)),
                                            torch.empty(4, 2, 3, 17, device=backend.device, dtype=dtype))
    opcheck(out_op, args, kwargs, utils=("test_schema", "test_faketensor") if backend.compiled else None)


def test_meta_tensors(backend):
    op = backend.meta_op("adapter_add")
    for adapter in (torch.empty(6, 7, device="meta"), torch.empty(2, 3, 7, device="meta")):
        out = op(adapter, torch.empty(2, 3, 7, device="meta"))
        assert out.shape == (2, 2, 3, 7) and out.device.type == "meta"


def test_torch_compile_fullgraph(backend, dtype):
    r = backend.maker(dtype)
    adapter, visual_query = r(3, 10, 72), r(2, 10, 72)
    expected = upstream(adapter, visual_query)
    assert torch.equal(backend("adapter_add", adapter, visual_query), expected)  # loads the backend first
    torch._dynamo.reset()
    # * 2: exact in any dtype, also where the compiler fuses it with the eager add (one rounding);
    # static shapes: with symbolic sizes, the checks' messages (f-strings of sizes) break the graph
    add = torch.compile(lambda a, v: backend("adapter_add", a, v) * 2, fullgraph=True, dynamic=False)
    assert torch.equal(add(adapter, visual_query), expected * 2)
    assert torch.equal(add(adapter.reshape(30, 72), visual_query), expected * 2)  # the flat form
    if not backend.compiled:
        out = torch.empty(3, 2, 10, 72, device=backend.device, dtype=dtype)
        torch.compile(lambda a, v, o: backend("adapter_add", a, v, out=o), fullgraph=True)(adapter, visual_query, out)
        assert torch.equal(out, expected)
    torch._dynamo.reset()


# -- bad input: one wording from every backend, and from the C++ kernels and their fakes ----------------

def bad_calls(r, device):
    """(args, kwargs, what the refusal says: a regex, the public wording without "surgery::")."""
    a, vq = r(6, 7), r(2, 3, 7)
    dev = str(device)
    return [
        ((a, vq.half()), {}, r"^adapter_add: visual_query is float16 but adapter is float32; all inputs must share"),
        ((a.long(), vq.long()), {}, r"^adapter_add: adapter is int64; allowed dtypes: float32, bfloat16 or float16$"),
        ((a.int(), vq.int()), {}, r"^adapter_add: adapter is int32; allowed dtypes"),
        ((a[0], vq), {}, r"^adapter_add: adapter has shape \[7\] \(1 dimensions\); expected \(L, Q, D\) or "
                         r"\(L\*Q, D\)$"),
        ((r(2, 3, 7, 1), vq), {}, r"^adapter_add: adapter has shape \[2, 3, 7, 1\] \(4 dimensions\); expected"),
        ((a, vq[0]), {}, r"^adapter_add: visual_query has shape \[3, 7\] \(2 dimensions\); expected \(B, Q, D\)"),
        ((r(7, 7), vq), {}, r"^adapter_add: a flat adapter needs L\*Q rows; 7 rows is not a multiple of "
                            r"visual_query's Q=3$"),
        ((r(2, 4, 7), vq), {}, r"^adapter_add: adapter has Q=4 tokens per layer but visual_query has Q=3; they "
                               r"must agree$"),
        ((r(6, 8), vq), {}, r"^adapter_add: adapter has D=8 but visual_query has D=7; they must agree$"),
        ((a, vq[:0]), {}, r"^adapter_add: visual_query is empty"),
        ((a[:0], vq), {}, r"^adapter_add: adapter is empty"),
        ((a, vq[..., :0]), {}, r"^adapter_add: visual_query is empty \(shape \[2, 3, 0\]\); every dimension must be "
                               r">= 1$"),
        ((a, vq.to("meta")), {}, rf"^adapter_add: visual_query is on meta but adapter is on {dev}; all inputs "
                                 r"must be on one device$"),
        ((a, vq), {"out": r(2, 2, 3, 8)}, rf"^adapter_add: out is \[2, 2, 3, 8\] float32 on {dev}; expected "
                                          rf"\[2, 2, 3, 7\] float32 on {dev}$"),
        ((a, vq), {"out": r(2, 2, 3, 7).bfloat16()}, r"^adapter_add: out is \[2, 2, 3, 7\] bfloat16 on \S+; expected"),
        ((a, vq), {"out": r(2, 3, 2, 7).transpose(1, 2)}, r"^adapter_add: out must be contiguous"),
    ] + ([] if device.type == "cpu" else [  # CPU tensors among GPU ones
        ((a, vq.cpu()), {}, rf"^adapter_add: visual_query is on cpu but adapter is on {dev}; all inputs must be on"),
        ((a.cpu(), vq), {}, rf"^adapter_add: visual_query is on {dev} but adapter is on cpu"),
    ])


def test_bad_input_is_refused(backend):
    r = backend.maker()
    for args, kwargs, message in bad_calls(r, backend.device):
        with pytest.raises(OpInputError, match=message):
            backend("adapter_add", *args, **kwargs)


def test_kernel_and_fake_refuse_in_the_same_words(backend):
    """As query_concat's: "surgery::" + the public wording, and the same from the fake on meta tensors."""
    if not backend.compiled:
        pytest.skip("only the C++ ops check their inputs themselves")
    r = backend.maker()
    op = backend.op("adapter_add")
    for args, kwargs, _ in bad_calls(r, backend.device):
        call = op.out if "out" in kwargs else op
        with pytest.raises(RuntimeError) as kernel:
            call(*args, **kwargs)
        with pytest.raises(OpInputError) as public:
            backend("adapter_add", *args, **kwargs)
        assert str(kernel.value) == "surgery::" + str(public.value)
        if len({t.device for t in (*args, *kwargs.values())}) > 1:
            continue  # a device mismatch: it cannot be put on meta tensors
        with pytest.raises(RuntimeError) as fake:
            call(*[t.to("meta") for t in args], **{k: t.to("meta") for k, t in kwargs.items()})
        assert str(fake.value) == str(kernel.value).replace(str(backend.device), "meta")
    big = torch.zeros(2 * 2 * 3 * 8 + 24, device=backend.device)  # sharing memory: no meta form
    inside = big[:24].view(1, 3, 8).expand(2, 3, 8)  # the visual query lies inside out
    with pytest.raises(RuntimeError, match=r"^surgery::adapter_add: out shares memory with visual_query"):
        op.out(r(2, 3, 8), inside, out=big[:96].view(2, 2, 3, 8))
    assert not big.any()
    adapter, visual_query = r(2, 3, 8), r(2, 3, 8)
    assert torch.equal(op(adapter, visual_query), upstream(adapter, visual_query))  # after the refusals


def test_kernel_out_refuses_inputs_that_require_grad(backend):
    if not backend.compiled:
        pytest.skip("the C++ `.out` overload's own check (the public function refuses first)")
    r = backend.maker()
    adapter, visual_query = r(6, 7), r(2, 3, 7).requires_grad_()
    with pytest.raises(RuntimeError, match=r"^surgery::adapter_add.out: visual_query requires grad, but the out= "
                                           r"overload does not support automatic differentiation"):
        backend.op("adapter_add").out(adapter, visual_query, out=torch.empty(2, 2, 3, 7, device=backend.device))
