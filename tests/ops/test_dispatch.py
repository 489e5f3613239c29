"""Choosing a backend, refusing bad input the same way everywhere, and the model on every backend."""

import json
import subprocess
import sys

import pytest
import torch

import surgery
from surgery import ops
from surgery.errors import BackendUnavailableError, OpInputError

CPU = torch.device("cpu")


def runnable_on_cpu():
    return [name for name in ops.BACKENDS if ops.can_run(name, CPU)[0]]


def small_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return {
        "query_concat": (r(3, 8), r(2, 5, 8)),
        "adapter_add": (r(4, 3, 8), r(2, 3, 8)),
        "adapter_attention": (r(2, 4, 1, 16), r(2, 4, 16, 5), r(2, 4, 5, 16), r(1, 4, 1, 1).tanh(), r(1, 1, 1, 1)),
    }


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_every_backend_that_runs_here_matches_the_reference(backend):
    if not ops.can_run(backend, CPU)[0]:
        pytest.skip(ops.can_run(backend, CPU)[1])
    for name, args in small_inputs().items():
        got = getattr(ops, name)(*args, backend=backend)
        torch.testing.assert_close(got, getattr(ops.reference, name)(*args), rtol=1e-5, atol=1e-6)


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNEL", "cuda")
    q, f = small_inputs()["query_concat"]
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run on cpu tensors"):
        ops.query_concat(q, f)
    monkeypatch.setenv("SURGERY_KERNEL", "eager")
    assert torch.equal(ops.query_concat(q, f), ops.reference.query_concat(q, f))
    monkeypatch.setenv("SURGERY_KERNEL", "fastest")
    with pytest.raises(BackendUnavailableError, match="unknown kernel backend 'fastest'"):
        ops.query_concat(q, f)


def test_auto_prefers_cpp_on_cpu_when_loaded():
    from surgery.ops.dispatch import choose

    expected = "cpp" if ops.can_run("cpp", CPU)[0] else "eager"
    assert choose(None, torch.zeros(1)) == expected


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_bad_input_is_refused_by_every_backend(backend):
    if not ops.can_run(backend, CPU)[0]:
        pytest.skip(ops.can_run(backend, CPU)[1])
    q, f = small_inputs()["query_concat"]
    a, vq = small_inputs()["adapter_add"]
    xq, k_t, v, gate, new_gate = small_inputs()["adapter_attention"]
    cases = [
        (lambda: ops.query_concat(q.double(), f.double(), backend=backend), "allowed dtypes"),
        (lambda: ops.query_concat(q.half(), f, backend=backend), "feats is float32 but queries is float16"),
        (lambda: ops.query_concat(q.to("meta"), f, backend=backend), "must be on one device"),
        (lambda: ops.query_concat(q[:, :5], f, backend=backend), "C=5 channels but feats have C=8"),
        (lambda: ops.query_concat(q, f[:, :0], backend=backend), "is empty"),
        (lambda: ops.query_concat(q, f, out=torch.empty(2, 7, 8), backend=backend),
         "out is \\[2, 7, 8\\] float32 on cpu; expected \\[2, 8, 8\\]"),
        (lambda: ops.query_concat(q.requires_grad_(), f, out=torch.empty(2, 8, 8), backend=backend),
         "out= does not support automatic differentiation"),
        (lambda: ops.adapter_add(a[:, :2], vq, backend=backend), "Q=2 tokens per layer but visual_query has Q=3"),
        (lambda: ops.adapter_add(a.reshape(12, 8)[:11], vq, backend=backend), "not a multiple"),
        (lambda: ops.adapter_add(a, vq[0], backend=backend), "expected \\(B, Q, D\\)"),
        (lambda: ops.adapter_attention(xq, k_t[:, :, :, :4], v, gate, new_gate, backend=backend), "one Q"),
        (lambda: ops.adapter_attention(xq, k_t, v, gate[:, :3], new_gate, backend=backend), "one value per head"),
    ]
    for call, message in cases:
        with pytest.raises(OpInputError, match=message):
            call()


def test_import_does_not_initialise_cuda():
    code = ("import surgery, surgery.ops, torch; surgery.ops.backends(); "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_backends_cli_json(capsys):
    from surgery.cli import main

    assert main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {b["name"]: b for b in report["backends"]}
    assert set(by_name) == set(ops.BACKENDS)
    assert by_name["eager"]["built"] and "cpu" in by_name["eager"]["devices"]
    assert (by_name["cpp"]["built"] and "cpu" in by_name["cpp"]["devices"]) == ops.can_run("cpp", CPU)[0]
    assert not by_name["cuda"]["devices"] or torch.cuda.is_available()
    assert report["torch"] == torch.__version__


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_llama_adapter_outputs_unchanged_on_every_backend(backend, monkeypatch):
    if not ops.can_run(backend, CPU)[0]:
        pytest.skip(ops.can_run(backend, CPU)[1])
    torch.manual_seed(0)
    model = surgery.build("llama_adapter_v2_tiny")
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("SURGERY_KERNEL", "eager")
    with torch.no_grad():
        expected = model.forward_inference(model.forward_visual(images), tokens, 0)
        greedy = model.generate_tokens(images, [[1, 5, 9], [1, 7]], max_gen_len=5, temperature=0, eos_id=2)
    model.drop_caches()
    monkeypatch.setenv("SURGERY_KERNEL", backend)
    with torch.no_grad():
        got = model.forward_inference(model.forward_visual(images), tokens, 0)
        assert model.generate_tokens(images, [[1, 5, 9], [1, 7]], max_gen_len=5, temperature=0, eos_id=2) == greedy
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
