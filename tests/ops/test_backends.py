"""Each backend's loading, and what only one backend has (the ops on every backend: test_<op>.py).

* the compiled extension (surgery/ops/_extension.py, registration.py): loaded lazily without
  initialising CUDA, the reason kept when it is not there, its build info, the module torch names
  for the fakes, the lower instruction-set variants of the CPU kernels, any thread count;
* Triton (surgery/ops/triton_ops.py): importing it never fails nor initialises CUDA; where it runs
  with and without the interpreter; its ops' names; on a GPU machine, the op tests again under the
  interpreter (on a CPU-only one, conftest.py runs them so already);
* CUDA: the kernels run on the current stream, in a captured graph, on a second device.
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

from surgery.ops import _extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
needs_extension = pytest.mark.skipif(_extension.extension() is None,
                                     reason=f"surgery._C not available: {_extension.extension_error()}")
needs_cuda_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and _extension.has_cuda_kernels()),
                                        reason="needs a CUDA GPU and surgery._C built with CUDA kernels")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, from the repository root, with tests/ops importable."""
    environ = {**os.environ, **env}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(HERE), environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={k: v for k, v in environ.items() if v is not None})


def assert_ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# -- the compiled extension ----------------------------------------------------------------------


@needs_extension
def test_import_is_lazy_and_does_not_initialise_cuda():
    assert_ok(run_python("""
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
    """))


@needs_extension
def test_importing_the_bare_extension_names_the_registration_module():
    """surgery._C alone has the kernels but no fake implementations; torch's error names the module
    that registers them (set_python_module), and importing it is enough."""
    assert_ok(run_python("""
        import torch, surgery._C
        args = torch.empty(6, 7, device="meta"), torch.empty(2, 3, 7, device="meta")
        try:
            torch.ops.surgery.adapter_add(*args)
        except NotImplementedError as exc:
            assert "surgery.ops.registration" in str(exc), exc
        import surgery.ops.registration
        assert torch.ops.surgery.adapter_add(*args).shape == (2, 2, 3, 7)
        print("ok")
    """))


def test_disabled_extension_keeps_the_reason_and_warns_once():
    assert_ok(run_python("""
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
    """, SURGERY_NO_EXTENSION="1"))


@needs_extension
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


@needs_extension
@pytest.mark.parametrize("capability,isa", [("default", "DEFAULT"), ("avx2", "AVX2")])
def test_lower_isa_kernels_in_a_subprocess(capability, isa):
    """ATEN_CPU_CAPABILITY=default / avx2 makes the extension pick its baseline / AVX2 kernels,
    which then agree with upstream as the best variant does (this machine's: test_<op>.py)."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    assert_ok(run_python(f"""
        import torch
        from surgery.ops import _extension
        from test_adapter_add import special_values, upstream as adapter_add
        from test_adapter_attention import truth
        from test_query_concat import upstream as query_concat
        assert _extension.build_info()["cpu_isa"] == {isa!r}, _extension.build_info()
        S = torch.ops.surgery
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q, f = torch.randn(3, 37).to(dtype), torch.randn(2, 5, 37).to(dtype)
            assert torch.equal(S.query_concat(q, f), query_concat(q, f))
            a, vq = torch.randn(4 * 3, 37).to(dtype), torch.randn(2, 3, 37).to(dtype)
            assert torch.equal(S.adapter_add(a, vq), adapter_add(a, vq))
            if dtype != torch.float32:
                a, b = (t.view(2, 2, 64) for t in special_values(dtype))
                assert torch.equal(S.adapter_add(a, b).view(torch.int16), adapter_add(a, b).view(torch.int16)), dtype
            for T, Q in ((1, 6), (5, 6), (1, 70)):
                x, k, v = torch.randn(2, 3, T, 19), torch.randn(2, 3, 19, Q), torch.randn(2, 3, Q, 19)
                g, ng = torch.rand(1, 3, 1, 1), torch.rand(1, 1, 1, 1)
                ins = [t.to(dtype) for t in (x, k, v, g, ng)]
                want = truth(*ins).to(dtype).float()
                torch.testing.assert_close(S.adapter_attention(*ins).float(), want, rtol=8e-3, atol=1e-3)
        print("ok")
    """, ATEN_CPU_CAPABILITY=capability))


@needs_extension
def test_many_threads_match_one():
    _extension.require_registration()
    S = torch.ops.surgery
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).bfloat16()  # noqa: E731
    attention = r(4, 8, 16, 64), r(4, 8, 64, 10), r(4, 8, 10, 64), r(1, 8, 1, 1).tanh(), r(1, 1, 1, 1)
    adapter, visual_query = r(30 * 10, 512), r(4, 10, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = S.adapter_attention(*attention), S.adapter_add(adapter, visual_query)
        torch.set_num_threads(max(threads, 2))
        many = S.adapter_attention(*attention), S.adapter_add(adapter, visual_query)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


# -- Triton --------------------------------------------------------------------------------------

IMPORT_SCRIPTS = {
    "without triton": """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        from surgery import ops
        from surgery.errors import BackendUnavailableError
        from surgery.ops import triton_ops as T
        assert not torch.cuda.is_initialized()
        ok, why = T.available(torch.device("cuda"))
        assert not ok and "triton cannot be imported" in why, why
        assert not hasattr(torch.ops.surgery, "query_concat_triton")
        try:
            ops.query_concat(torch.zeros(2, 3), torch.zeros(1, 4, 3), backend="triton")
        except BackendUnavailableError as exc:
            assert "triton cannot be imported" in str(exc), exc
        else:
            raise AssertionError("no error")
        assert not torch.cuda.is_initialized()
        print("ok")
    """,
    "with triton": """
        import torch
        from surgery import ops
        from surgery.errors import BackendUnavailableError
        from surgery.ops import triton_ops as T
        assert not torch.cuda.is_initialized()
        assert T.triton is None or hasattr(torch.ops.surgery, "adapter_attention_triton")
        ok, why = T.available(torch.device("cpu"))
        assert not torch.cuda.is_initialized()
        if T.triton is not None:  # CPU tensors are refused without the interpreter
            assert (ok, why) == (False, T.INTERPRETER_REASON)
            assert why == "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
            calls = [lambda: ops.query_concat(torch.zeros(2, 3), torch.zeros(1, 4, 3), backend="triton"),
                     lambda: ops.adapter_attention(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 16, 2),
                                                   torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 1, 1), backend="triton")]
            for call in calls:
                try:
                    call()
                except BackendUnavailableError as exc:
                    assert "TRITON_INTERPRET=1 (set before importing triton)" in str(exc), exc
                else:
                    raise AssertionError("no error")
        print("ok")
    """,
    "under the interpreter": """
        import torch
        from surgery import ops
        from surgery.errors import BackendUnavailableError
        from surgery.ops import triton_ops as T
        assert not torch.cuda.is_initialized()
        if T.triton is not None:
            assert T.INTERPRETED
            assert T.available(torch.device("cpu")) == (True, "")
            assert T.available(torch.device("cpu"), torch.float32) == (True, "")
            ok, why = T.available(torch.device("cpu"), torch.bfloat16)
            assert not ok and "float32 only" in why, why
            ok, why = T.available(torch.device("cuda"))
            assert not ok and "TRITON_INTERPRET=1" in why, why
            for dtype in (torch.bfloat16, torch.float16):
                r = lambda *shape: torch.randn(*shape).to(dtype)
                calls = [lambda: ops.query_concat(r(3, 8), r(2, 5, 8), backend="triton"),
                         lambda: ops.adapter_add(r(4, 3, 8), r(2, 3, 8), backend="triton"),
                         lambda: ops.adapter_attention(r(1, 2, 3, 16), r(1, 2, 16, 4), r(1, 2, 4, 16),
                                                       r(1, 2, 1, 1), r(1, 1, 1, 1), backend="triton")]
                for call in calls:
                    try:
                        call()
                    except BackendUnavailableError as exc:
                        assert "float32 only" in str(exc), exc
                    else:
                        raise AssertionError("no error")
        assert not torch.cuda.is_initialized()
        print("ok")
    """,
}


@pytest.mark.parametrize("case", sorted(IMPORT_SCRIPTS))
def test_triton_import_and_where_it_runs(case):
    interpret = "1" if case == "under the interpreter" else None
    assert_ok(run_python(IMPORT_SCRIPTS[case], TRITON_INTERPRET=interpret))


def test_triton_ops_are_registered_under_their_names():
    from surgery.ops import triton_ops

    if triton_ops.triton is None:
        pytest.skip(f"triton cannot be imported: {triton_ops._TRITON_ERROR}")
    for name in ("query_concat_triton", "query_concat_triton_out", "adapter_add_triton", "adapter_add_triton_out",
                 "adapter_attention_triton"):
        assert hasattr(torch.ops.surgery, name), name
    schema = str(torch.ops.surgery.query_concat_triton_out.default._schema)
    assert re.search(r"Tensor\(a\d*!\) out\) -> \(\)$", schema), schema


def test_triton_on_cuda():
    from surgery.ops import triton_ops

    if not torch.cuda.is_available() or triton_ops.triton is None or triton_ops.INTERPRETED:
        pytest.skip("needs a CUDA GPU and triton (not the interpreter)")
    assert triton_ops.available(torch.device("cuda")) == (True, "")
    assert triton_ops.available(torch.device("cuda"), torch.float16)[0]


def test_triton_op_tests_under_the_interpreter():
    """Where the Triton tests of this run use the GPU, test_<op>.py's once more on CPU tensors under
    the interpreter, in a process of their own (TRITON_INTERPRET=1 before the kernels are defined)."""
    from surgery.ops import triton_ops

    if triton_ops.triton is None:
        pytest.skip(f"triton cannot be imported: {triton_ops._TRITON_ERROR}")
    if triton_ops.INTERPRETED:
        pytest.skip("this run's Triton tests already run under the interpreter")
    files = [str(HERE / f"test_{op}.py") for op in ("query_concat", "adapter_add", "adapter_attention")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-k", "triton", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0 and " passed" in done.stdout, tail


# -- CUDA: streams, graphs, devices --------------------------------------------------------------


def cuda_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device="cuda", dtype=dtype)  # noqa: E731
    return r


@needs_cuda_kernels
def test_cuda_kernels_run_on_the_current_stream():
    from test_adapter_add import upstream as adapter_add
    from test_adapter_attention import truth
    from test_query_concat import upstream as query_concat

    ops = torch.ops.surgery
    r = cuda_inputs(torch.bfloat16)
    q, f = r(10, 4096), r(4, 300, 4096)
    a, vq = r(32, 10, 4096), r(4, 10, 4096)
    attention = r(4, 32, 1, 128), r(4, 32, 128, 10), r(4, 32, 10, 128), r(1, 32, 1, 1).tanh(), r(1, 1, 1, 1)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        got = ops.query_concat(q, f), ops.adapter_add(a, vq), ops.adapter_attention(*attention)
    side.synchronize()
    assert torch.equal(got[0], query_concat(q, f)) and torch.equal(got[1], adapter_add(a, vq))
    torch.testing.assert_close(got[2].double(), truth(*attention), atol=1e-4, rtol=2**-7)


@needs_cuda_kernels
def test_cuda_graph_capture():
    from test_adapter_attention import truth
    from test_query_concat import upstream as query_concat

    ops = torch.ops.surgery
    r = cuda_inputs(torch.float16)
    q, f = r(10, 256), r(2, 30, 256)
    attention = r(2, 4, 1, 128), r(2, 4, 128, 10), r(2, 4, 10, 128), r(1, 4, 1, 1).tanh(), r(1, 1, 1, 1)
    out = torch.empty(2, 40, 256, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (device info, smem attribute) outside the capture
        ops.query_concat(q, f, out=out)
        ops.adapter_attention(*attention)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.query_concat(q, f, out=out)
        got = ops.adapter_attention(*attention)
    f.copy_(r(2, 30, 256))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, query_concat(q, f))
    torch.testing.assert_close(got.double(), truth(*attention), atol=1e-5, rtol=2**-10)


@needs_cuda_kernels
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device():
    from test_query_concat import upstream as query_concat

    r = cuda_inputs(torch.float32)
    q, f = r(3, 64).to("cuda:1"), r(2, 5, 64).to("cuda:1")
    got = torch.ops.surgery.query_concat(q, f)
    assert got.device == torch.device("cuda:1") and torch.equal(got, query_concat(q, f))
