"""surgery/bench/kernels.py: bytes per op, the check before timing, rows with consistent units,
the limits named, backends of another device refused."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from surgery import ops
from surgery.bench import BenchmarkError, DeviceUnavailableError, OutputMismatchError, backends, kernels, limits
from surgery.bench.kernels import Case, Impl, KernelConfig
from surgery.bench.timing import Timing

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
    # the copy limit: the output's size, except for the attention (k_t and v: what it reads)
    assert small("adapter_add").copy_numel() == 4 * 2 * 3 * 16
    assert small("adapter_attention").copy_numel() == 2 * 2 * 4 * 5 * 16
    # the write-only floor: the output's size; none for the attention (one row per head)
    assert small("query_concat").fill_numel() == 2 * (3 + 5) * 8
    assert small("adapter_add").fill_numel() == 4 * 2 * 3 * 16
    assert small("adapter_attention").fill_numel() is None


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
    kernels.verify(case, "upstream", backends.upstream_form(op)(*args), args)  # does not raise


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


def _check_units(row: kernels.KernelRow, case: Case, timer: str = "torch.utils.benchmark") -> None:
    assert row.status == "ok" and row.samples >= 1 and row.timer == timer
    assert row.ms_p20 <= row.ms_p50 <= row.ms_p80
    assert row.gbps == pytest.approx(row.bytes / (row.ms_p50 * 1e-3) / 1e9)
    assert row.op_bytes == case.bytes_moved()
    assert row.copy_limit_fraction == pytest.approx(row.copy_limit_ms / row.ms_p50)
    assert row.peak_gbps is None and row.peak_fraction is None
    if case.op == "adapter_attention":
        assert row.write_floor_ms is None and row.write_floor_fraction is None
        assert row.limit == "copy limit" and row.fraction_of_limit == row.copy_limit_fraction
    else:
        assert row.write_floor_fraction == pytest.approx(row.write_floor_ms / row.ms_p50)
        assert row.limit == "write-only floor" and row.fraction_of_limit == row.write_floor_fraction


@needs_cpp
@pytest.mark.parametrize("op", kernels.OPS)
def test_run_case_times_what_agrees_and_refuses_what_does_not(op, tiny_budget):
    case = small(op)
    impls, missing = kernels.implementations(case, CPU, ("upstream", "cpp", "cpp.out"))
    assert missing == {}
    impls["bad"] = _bad_impl(op)
    rows = {r.backend: r for r in kernels.run_case(case, CPU, tiny_budget, 1, NO_PEAK, impls, missing)}
    backends = {"upstream", "cpp", "bad"} | ({"cpp.out"} if op != "adapter_attention" else set())
    references = {"copy"} | ({"fill", "memset"} if op != "adapter_attention" else set())
    assert set(rows) == backends | references
    bad = rows["bad"]
    assert bad.status == "refused" and "differs from the reference" in bad.note
    assert bad.ms_p50 is None and bad.gbps is None and bad.op_bytes == case.bytes_moved()  # never timed
    copy = rows["copy"]
    _check_units(copy, case)
    assert copy.bytes == limits.copy_bytes(case.copy_numel(), 4) and copy.copy_limit_fraction == pytest.approx(1.0)
    for fill in ("fill", "memset"):
        if fill in rows:
            _check_units(rows[fill], case)
            assert rows[fill].bytes == 4 * case.fill_numel() and rows[fill].write_floor_fraction <= 1.0
    for name in backends - {"bad"}:
        _check_units(rows[name], case)
        assert rows[name].bytes == case.bytes_moved() and rows[name].copy_limit_ms == copy.ms_p50


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
    assert {r.backend for r in results.rows} == {"copy", "fill", "memset", "cpp.out", "bad"}
    assert len(results.refused) == len(kernels.grid([torch.float32], True, ("query_concat",)))
    files = kernels.write(results, tmp_path)
    names = {p.name for p in files}
    assert names == {"kernels.csv", "kernels.json", "kernels_cpu_float32.png", "summary.md"}
    with open(tmp_path / "kernels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results.rows)
    required = {"op", "backend", "shape", "dtype", "ms_p20", "ms_p50", "ms_p80", "bytes", "op_bytes", "gbps",
                "copy_limit_ms", "copy_limit_fraction", "write_floor_ms", "write_floor_fraction", "limit",
                "fraction_of_limit", "device_name", "torch", "triton", "git_commit", "timestamp", "threads"}
    assert required <= set(rows[0])
    for row in rows:
        if row["status"] == "ok":
            assert float(row["gbps"]) == pytest.approx(int(row["bytes"]) / (float(row["ms_p50"]) * 1e-3) / 1e9)
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["meta"]["threads"] == 1 and len(data["rows"]) == len(rows)
    assert (tmp_path / "kernels_cpu_float32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "summary.md").read_text()
    assert "| query_concat |" in summary and "Refused" in summary
    assert "copy limit ms" in summary and "write-only floor ms" in summary
    assert {row["limit"] for row in rows if row["status"] == "ok"} == {"write-only floor"}


# -- bookkeeping, with fake timings (nothing here measures anything) ------------------------------


def fake_time_many(ms: dict[str, float], seen: dict):
    """A `time_many` that records the callables it is given and returns fixed medians (p20/p80 +-10%)."""
    def time_many(fns, device, budget, threads=None):
        seen.update(fns)
        return {name: Timing(0.9 * ms[name], ms[name], 1.1 * ms[name], 5, "fake") for name in fns}

    return time_many


def test_the_summary_reports_the_bytes_the_op_moves_not_the_copys(monkeypatch, tiny_budget):
    """adapter_add at B=8 reads little and writes L*B*Q*D: the copy of its output moves almost
    twice the op's bytes, and "MB the op moves" must be the op's."""
    case = Case("adapter_add", (("L", 31), ("Q", 2), ("B", 8), ("D", 256)), torch.float32, "test")
    op_elements = 31 * 2 * 256 + 8 * 2 * 256 + 31 * 8 * 2 * 256  # by hand: adapter, visual_query, output
    monkeypatch.setattr(kernels, "time_many", fake_time_many({"copy": 1.0, "fill": 0.5, "memset": 0.5,
                                                              "upstream": 2.0}, {}))
    impls, missing = kernels.implementations(case, CPU, ("upstream",))
    rows = kernels.run_case(case, CPU, tiny_budget, 1, NO_PEAK, impls, missing)
    assert {r.op_bytes for r in rows} == {4 * op_elements}
    assert next(r for r in rows if r.backend == "copy").bytes == 2 * 4 * 31 * 8 * 2 * 256
    summary = kernels.summary_markdown(kernels.KernelResults(rows))
    header, _, line = summary.split("\n\n")[1].splitlines()[:3]
    names, values = ([c.strip() for c in text.strip("|").split("|")] for text in (header, line))
    cells = dict(zip(names, values))
    assert cells["MB the op moves"] == f"{4 * op_elements / 1e6:.2f}" == "0.59"  # the copy's would be 1.02


def test_the_write_only_floor_is_timed_with_the_op_and_named(monkeypatch, tmp_path, tiny_budget):
    """On CPU an op that reads less than it writes beats the copy; the faster same-run fill of its
    output is the floor no implementation can beat, and every file names which limit is which."""
    case = small("adapter_add")
    seen: dict = {}
    monkeypatch.setattr(kernels, "time_many", fake_time_many({"copy": 1.0, "fill": 0.45, "memset": 0.4,
                                                              "upstream": 0.5}, seen))
    impls, missing = kernels.implementations(case, CPU, ("upstream",))
    rows = {r.backend: r for r in kernels.run_case(case, CPU, tiny_budget, 1, NO_PEAK, impls, missing)}
    # both fills write zeros over a tensor of the output's size, nothing read
    for name in ("fill", "memset"):
        written = seen[name]()
        assert written.numel() == math.prod(case.out_shape()) and written.dtype == case.dtype
        written.fill_(7.0)
        seen[name]()
        assert not written.any()
    fill, up = rows["memset"], rows["upstream"]  # the faster fill is the floor
    assert fill.bytes == 4 * math.prod(case.out_shape()) and fill.gbps == pytest.approx(fill.bytes / 0.4e-3 / 1e9)
    assert up.copy_limit_fraction == pytest.approx(2.0)  # faster than the copy...
    assert up.write_floor_ms == 0.4 and up.write_floor_fraction == pytest.approx(0.8)  # ...not than the floor
    assert up.write_floor_gbps == pytest.approx(fill.gbps)
    assert (up.limit, up.fraction_of_limit) == ("write-only floor", pytest.approx(0.8))

    results = kernels.KernelResults(list(rows.values()), env=_env(), peak=NO_PEAK)
    kernels.write(results, tmp_path)
    with open(tmp_path / "kernels.csv", newline="") as f:
        csv_rows = {r["backend"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["upstream"]["write_floor_fraction"]) == pytest.approx(0.8)
    assert csv_rows["upstream"]["limit"] == "write-only floor"
    assert [r["backend"] for r in json.loads((tmp_path / "kernels.json").read_text())["rows"]][:3] == [
        "copy", "fill", "memset"]
    summary = (tmp_path / "summary.md").read_text()
    assert "copy limit / write-only floor." in summary  # the order of the fractions in each cell
    assert "| 0.5000 (2.00 / 0.80) |" in summary and f"| 0.4000 ({fill.gbps:.1f}, memset) |" in summary


def test_adapter_attention_has_no_fill_its_limit_is_the_named_copy(monkeypatch, tiny_budget):
    case = small("adapter_attention")
    seen: dict = {}
    monkeypatch.setattr(kernels, "time_many", fake_time_many({"copy": 1.0, "upstream": 4.0}, seen))
    impls, missing = kernels.implementations(case, CPU, ("upstream",))
    rows = {r.backend: r for r in kernels.run_case(case, CPU, tiny_budget, 1, NO_PEAK, impls, missing)}
    assert set(seen) == {"copy", "upstream"} and set(rows) == {"copy", "upstream"}
    assert (rows["upstream"].limit, rows["upstream"].fraction_of_limit) == ("copy limit", pytest.approx(0.25))
    summary = kernels.summary_markdown(kernels.KernelResults(list(rows.values())))
    assert "| 4.0000 (0.25) |" in summary and "| - |" in summary  # no floor column value


def _env() -> dict:
    return {"device": "cpu", "device_name": "test cpu", "threads": 1, "torch": torch.__version__,
            "timestamp": "now", "git_commit": "abc"}


@pytest.mark.parametrize("backends", [("cuda",), ("cpp", "triton.out")])
def test_backends_of_another_device_are_refused_before_anything_runs(monkeypatch, backends, tiny_budget):
    """`--backends cuda` on a CPU run used to time only the copy and report that as a result."""
    def never(*args, **kwargs):
        raise AssertionError("nothing may be timed")

    monkeypatch.setattr(kernels, "time_many", never)
    config = KernelConfig(quick=True, ops=("query_concat",), backends=backends, threads=1, budget=tiny_budget)
    with pytest.raises(DeviceUnavailableError) as info:
        kernels.run(config)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--backends ")
    assert [b for b in backends if b not in kernels.CPU_BACKENDS] == message.split()[1].rstrip(":").split(",")
    assert "available with --device cpu: upstream, compile, cpp, cpp.out" in message


def test_the_cli_refuses_a_gpu_backend_on_a_cpu_run_in_one_line(tmp_path, capsys):
    from surgery.cli import main

    code = main(["bench", "kernels", "--quick", "--backends", "cuda", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert err.startswith("surgery: error: --backends cuda: not a backend of a cpu run") and "cpp.out" in err
    assert not (tmp_path / "kernels.csv").exists()
