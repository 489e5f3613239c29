"""surgery/bench/kernels.py: bytes per op, the check before timing, rows with consistent units."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from surgery import ops
from surgery.bench import BenchmarkError, OutputMismatchError, kernels, limits
from surgery.bench.kernels import Case, Impl, KernelConfig

CPU = torch.device("cpu")
NO_PEAK = limits.Peak(None, "cpu")
needs_cpp = pytest.mark.skipif(not ops.can_run("cpp", CPU)[0], reason="the C++ extension is not built")


def small(op: str, dtype=torch.float32) -> Case:
    dims = {"query_concat": (("Q", 3), ("B", 2), ("N", 5), ("C", 8)),
            "adapter_add": (("L", 4), ("Q", 3), ("B", 2), ("D", 16)),
            "adapter_attention": (("Q", 5), ("B", 2), ("H", 4), ("T", 1), ("hd", 16))}[op]
    return Case(op, dims, dtype, "test")


def test_bytes_the_op_must_move_by_hand():
    assert small("query_concat").bytes_moved() == 4 * (3 * 8 + 2 * 5 * 8 + 2 * 8 * 8)
    assert small("adapter_add").bytes_moved() == 4 * (4 * 3 * 16 + 2 * 3 * 16 + 4 * 2 * 3 * 16)
    assert small("adapter_attention", torch.bfloat16).bytes_moved() == 2 * (2 * 2 * 4 * 16 + 2 * 2 * 4 * 5 * 16 + 4 + 1)
    # the limit copy: the output's size, except for the attention (k_t and v: what it reads)
    assert small("adapter_add").copy_numel() == 4 * 2 * 3 * 16
    assert small("adapter_attention").copy_numel() == 2 * 2 * 4 * 5 * 16


def test_grid_has_the_7b_shapes_and_a_sweep_without_repeats():
    cases = kernels.grid([torch.float32], quick=False)
    table = {(c.op, c.d["Q"], c.d["B"]) for c in cases if c.grid == "7b"}
    assert table == {(op, q, b) for op in kernels.OPS for q in (10, 64, 256) for b in (1, 8)}
    add = next(c for c in cases if c.op == "adapter_add")
    assert add.d == {"L": 31, "Q": 10, "B": 1, "D": 4096}
    assert len({(c.op, c.shape) for c in cases}) == len(cases)
    assert {c.d["B"] for c in cases if c.grid == "sweep"} == {2, 4, 16, 32, 64}
    assert len(kernels.grid([torch.float32], quick=True)) < len(cases)


@pytest.mark.parametrize("op", kernels.OPS)
def test_the_upstream_forms_agree_with_the_reference(op):
    case = small(op)
    args = case.inputs(CPU)
    kernels.verify(case, "upstream", kernels._upstream(op)(*args), args)  # does not raise


@pytest.mark.parametrize("op", kernels.OPS)
def test_a_wrong_output_is_refused(op):
    case = small(op)
    args = case.inputs(CPU)
    from surgery.ops import reference

    good = getattr(reference, op)(*args)
    bad = good.clone()
    bad.view(-1)[0] += 1.0
    with pytest.raises(OutputMismatchError, match="differs from the reference"):
        kernels.verify(case, "bad", bad, args)
    with pytest.raises(OutputMismatchError, match="reference is"):
        kernels.verify(case, "bad", good[:1], args)
    with pytest.raises(OutputMismatchError, match="reference is"):
        kernels.verify(case, "bad", good.double(), args)


def _bad_impl(op: str) -> Impl:
    from surgery.ops import reference

    def call(args, out):
        result = getattr(reference, op)(*args).clone()
        result.view(-1)[-1] = 42.0  # one wrong element
        return result

    return Impl("bad", call)


def _check_units(row: kernels.KernelRow) -> None:
    assert row.status == "ok" and row.samples >= 1 and row.timer == "torch.utils.benchmark"
    assert row.ms_p20 <= row.ms_p50 <= row.ms_p80
    assert row.gbps == pytest.approx(row.bytes / (row.ms_p50 * 1e-3) / 1e9)
    assert row.copy_fraction == pytest.approx(row.copy_ms / row.ms_p50)
    assert row.limit == "cpu copy" and row.fraction_of_limit == row.copy_fraction
    assert row.peak_gbps is None and row.peak_fraction is None


@needs_cpp
@pytest.mark.parametrize("op", kernels.OPS)
def test_run_case_times_what_agrees_and_refuses_what_does_not(op, tiny_budget):
    case = small(op)
    impls, missing = kernels.implementations(case, CPU, ("upstream", "cpp", "cpp.out"))
    assert missing == {}
    impls["bad"] = _bad_impl(op)
    rows = {r.backend: r for r in kernels.run_case(case, CPU, tiny_budget, 1, NO_PEAK, impls, missing)}
    expected = {"copy", "upstream", "cpp", "bad"} | ({"cpp.out"} if op != "adapter_attention" else set())
    assert set(rows) == expected
    bad = rows["bad"]
    assert bad.status == "refused" and "differs from the reference" in bad.note
    assert bad.ms_p50 is None and bad.gbps is None  # never timed
    copy = rows["copy"]
    _check_units(copy)
    assert copy.bytes == limits.copy_bytes(case.copy_numel(), 4) and copy.fraction_of_limit == pytest.approx(1.0)
    for name in expected - {"bad", "copy"}:
        _check_units(rows[name])
        assert rows[name].bytes == case.bytes_moved() and rows[name].copy_ms == copy.ms_p50


def test_a_backend_that_raises_is_refused_with_its_error(tiny_budget):
    case = small("query_concat")

    def boom(args, out):
        raise RuntimeError("kernel exploded")

    rows = kernels.run_case(case, CPU, tiny_budget, 1, NO_PEAK, {"boom": Impl("boom", boom)}, {"cuda": "no GPU"})
    by = {r.backend: r for r in rows}
    assert by["boom"].status == "refused" and "RuntimeError: kernel exploded" in by["boom"].note
    assert by["cuda"].status == "unavailable" and by["cuda"].note == "no GPU"
    assert by["copy"].status == "ok"


def test_config_names_are_checked():
    with pytest.raises(BenchmarkError, match="unknown dtype 'float8'.*allowed: float32"):
        KernelConfig(dtypes=("float8",)).checked()
    with pytest.raises(BenchmarkError, match="unknown op 'softmax'"):
        KernelConfig(ops=("softmax",)).checked()
    with pytest.raises(BenchmarkError, match="unknown backend 'cudnn'"):
        KernelConfig(backends=("cudnn",)).checked()


@needs_cpp
def test_run_and_write_a_small_grid(tmp_path, tiny_budget):
    """The quick grid of one op and one backend, with a wrong backend injected: every file is
    written and parses, the wrong backend is listed as refused."""
    def with_bad(case, device, backends):
        impls, missing = kernels.implementations(case, device, backends)
        return {**impls, "bad": _bad_impl(case.op)}, missing

    config = KernelConfig(quick=True, ops=("query_concat",), backends=("cpp.out",), threads=1, budget=tiny_budget)
    results = kernels.run(config, impls=with_bad)
    assert {r.backend for r in results.rows} == {"copy", "cpp.out", "bad"}
    assert len(results.refused) == len(kernels.grid([torch.float32], True, ("query_concat",)))
    files = kernels.write(results, tmp_path)
    names = {p.name for p in files}
    assert names == {"kernels.csv", "kernels.json", "kernels_cpu_float32.png", "summary.md"}
    with open(tmp_path / "kernels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results.rows)
    required = {"op", "backend", "shape", "dtype", "ms_p20", "ms_p50", "ms_p80", "bytes", "gbps",
                "fraction_of_limit", "device_name", "torch", "triton", "git_commit", "timestamp", "threads"}
    assert required <= set(rows[0])
    for row in rows:
        if row["status"] == "ok":
            assert float(row["gbps"]) == pytest.approx(int(row["bytes"]) / (float(row["ms_p50"]) * 1e-3) / 1e9)
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["meta"]["threads"] == 1 and len(data["rows"]) == len(rows)
    assert (tmp_path / "kernels_cpu_float32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "summary.md").read_text()
    assert "| query_concat |" in summary and "Refused" in summary and "cpu copy" in summary
