"""Each fused op x backend x shape x dtype, against its limits (`surgery bench kernels`).

Shapes are the 7B ones (L=31, D=4096, C=768, N=257, H=32, hd=128, T=1) at Q in {10, 64, 256} x B in
{1, 8}, plus a batch sweep at Q=10 for the GB/s-against-size plots. Each backend's output is checked
against the reference before it is timed; one that disagrees or fails gets a "refused" row and no
time. The limits and the columns are explained in docs/performance.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import BenchmarkError, OutputMismatchError
from . import limits, report
from .backends import CPU_BACKENDS, GPU_BACKENDS, Impl, implementations, require_backends_on
from .timing import Budget, Timing, resolve_device, set_threads, synchronize, time_many

OPS = ("query_concat", "adapter_add", "adapter_attention")
L7B, D7B, C7B, N7B, H7B, HD7B = 31, 4096, 768, 257, 32, 128
COPY, FILLS, REFERENCES = limits.COPY, limits.FILLS, limits.REFERENCES  # the references' rows
# adapter_attention against the fp32 reference rounded to the dtype (tests/ops/test_adapter_attention.py: LOOSE)
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}


# -- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One op at one shape and dtype."""

    op: str
    dims: tuple[tuple[str, int], ...]  # ordered (name, size)
    dtype: torch.dtype
    grid: str  # "7b" (the 7B table) or "sweep" (the size sweep)

    @property
    def d(self) -> dict[str, int]:
        return dict(self.dims)

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def out_shape(self) -> tuple[int, ...]:
        d = self.d
        if self.op == "query_concat":
            return (d["B"], d["Q"] + d["N"], d["C"])
        if self.op == "adapter_add":
            return (d["L"], d["B"], d["Q"], d["D"])
        return (d["B"], d["H"], d["T"], d["hd"])

    def bytes_moved(self) -> int:
        """Bytes the op must move: every input read once, the output written once."""
        d = self.d
        if self.op == "query_concat":
            n = d["Q"] * d["C"] + d["B"] * d["N"] * d["C"] + d["B"] * (d["Q"] + d["N"]) * d["C"]
        elif self.op == "adapter_add":
            n = d["L"] * d["Q"] * d["D"] + d["B"] * d["Q"] * d["D"] + d["L"] * d["B"] * d["Q"] * d["D"]
        else:
            n = 2 * d["B"] * d["H"] * d["T"] * d["hd"] + 2 * d["B"] * d["H"] * d["Q"] * d["hd"] + d["H"] + 1
        return n * self.element_size

    def copy_numel(self) -> int:
        """Elements of the copy limit: the output's; for adapter_attention k_t's and v's (what it must
        read: a copy of its one-row-per-head output would time only the call)."""
        d = self.d
        if self.op == "adapter_attention":
            return 2 * d["B"] * d["H"] * d["Q"] * d["hd"]
        return math.prod(self.out_shape())

    def fill_numel(self) -> Optional[int]:
        """Elements of the write-only floor: the output's; None for adapter_attention, whose output
        (one row per head) is too small for a fill of it to time anything but the call."""
        if self.op == "adapter_attention":
            return None
        return math.prod(self.out_shape())

    def inputs(self, device: torch.device, seed: int = 0) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)

        def r(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(device=device, dtype=self.dtype)

        d = self.d
        if self.op == "query_concat":
            return r(d["Q"], d["C"]), r(d["B"], d["N"], d["C"])
        if self.op == "adapter_add":
            return r(d["L"], d["Q"], d["D"]), r(d["B"], d["Q"], d["D"])
        B, H, T, hd, Q = d["B"], d["H"], d["T"], d["hd"], d["Q"]
        return r(B, H, T, hd), r(B, H, hd, Q), r(B, H, Q, hd), r(1, H, 1, 1).tanh(), r(1, 1, 1, 1)


def _dims(op: str, Q: int, B: int) -> tuple[tuple[str, int], ...]:
    if op == "query_concat":
        return (("Q", Q), ("B", B), ("N", N7B), ("C", C7B))
    if op == "adapter_add":
        return (("L", L7B), ("Q", Q), ("B", B), ("D", D7B))
    return (("Q", Q), ("B", B), ("H", H7B), ("T", 1), ("hd", HD7B))


def grid(dtypes: Sequence[torch.dtype], quick: bool, ops: Sequence[str] = OPS) -> list[Case]:
    """The 7B table (Q x B), then the batch sweep at Q=10, per dtype and op, without repeats.
    --quick: (Q, B) in (10, 1), (10, 8) and the sweep at B=2: three sizes per op."""
    if quick:
        table, sweep = ((10, 1), (10, 8)), (2,)
    else:
        table, sweep = tuple((Q, B) for Q in (10, 64, 256) for B in (1, 8)), (2, 4, 16, 32, 64)
    cases: list[Case] = []
    for dtype in dtypes:
        for op in ops:
            cases += [Case(op, _dims(op, Q, B), dtype, "7b") for Q, B in table]
            cases += [Case(op, _dims(op, 10, B), dtype, "sweep") for B in sweep if (10, B) not in table]
    return cases


# -- checking ------------------------------------------------------------------------------------


def verify(case: Case, backend: str, result: Any, args: tuple) -> None:
    """Raise OutputMismatchError unless `result` agrees with the reference: exactly for the copy-and-add
    ops, for adapter_attention with the fp32 reference rounded to the dtype (ATTENTION_TOL)."""
    from ..ops import reference

    got = torch.stack(result) if isinstance(result, (list, tuple)) else result
    if case.op == "adapter_attention":
        expected = reference.adapter_attention(*(a.float() for a in args)).to(case.dtype)
        rtol, atol = ATTENTION_TOL[case.dtype]
    else:
        expected = getattr(reference, case.op)(*args)
        rtol, atol = 0.0, 0.0
    where = f"{case.op} [{case.shape}, {case.dtype_name}] backend {backend!r}"
    if not isinstance(got, Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
        what = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, Tensor) else type(got).__name__
        raise OutputMismatchError(f"{where}: returned {what}, the reference is {tuple(expected.shape)} "
                                  f"{expected.dtype}; it is not timed")
    a, b = got.float(), expected.float()
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        diff = (a - b).abs().nan_to_num(float("inf")).max().item()
        raise OutputMismatchError(f"{where}: output differs from the reference (max |diff| {diff:.3g}; "
                                  f"allowed rtol={rtol:g}, atol={atol:g}); it is not timed")


# -- running -------------------------------------------------------------------------------------


@dataclass
class KernelConfig:
    device: str = "cpu"
    quick: bool = False
    dtypes: Optional[tuple[str, ...]] = None  # None: float32 with --quick, else float32 and bfloat16
    ops: tuple[str, ...] = OPS
    backends: Optional[tuple[str, ...]] = None  # None: every backend of the device
    threads: Optional[int] = None  # CPU intra-op threads (None: torch's current count)
    peak_gbps: Optional[float] = None  # GPU peak override
    budget: Optional[Budget] = None  # None: Budget.quick() with --quick, else Budget.full()

    def checked(self) -> "KernelConfig":
        for name in self.dtypes or ():
            if not isinstance(getattr(torch, name, None), torch.dtype) or name not in DTYPES:
                raise BenchmarkError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
        for op in self.ops:
            if op not in OPS:
                raise BenchmarkError(f"unknown op {op!r}; allowed: {', '.join(OPS)}")
        known = sorted(set(CPU_BACKENDS) | set(GPU_BACKENDS))
        for b in self.backends or ():
            if b not in known:
                raise BenchmarkError(f"unknown backend {b!r}; allowed: {', '.join(known)} "
                                     f"(the references {', '.join(REFERENCES)} are always timed)")
        return self

    def dtype_list(self) -> list[torch.dtype]:
        names = self.dtypes or (("float32",) if self.quick else ("float32", "bfloat16"))
        return [getattr(torch, n) for n in names]


@dataclass
class KernelRow:
    op: str
    backend: str
    grid: str
    shape: str
    dtype: str
    device: str
    threads: int
    status: str  # "ok", "refused" (wrong output or an error: not timed), "unavailable"
    bytes: int  # what this row's callable moves (the copy's, the fill's, else the op's)
    op_bytes: int  # what the op of this case must move (the same in every row of the case)
    ms_p20: Optional[float] = None
    ms_p50: Optional[float] = None
    ms_p80: Optional[float] = None
    samples: Optional[int] = None
    timer: Optional[str] = None
    gbps: Optional[float] = None  # bytes / ms_p50
    copy_limit_ms: Optional[float] = None  # the same-run copy (median)
    copy_limit_gbps: Optional[float] = None
    copy_limit_fraction: Optional[float] = None  # copy_limit_ms / ms_p50 (above 1: faster than the copy)
    write_floor_ms: Optional[float] = None  # the same-run fill of the output (median); None: not measured
    write_floor_gbps: Optional[float] = None
    write_floor_fraction: Optional[float] = None  # write_floor_ms / ms_p50 (at most 1 up to noise)
    peak_gbps: Optional[float] = None  # GPU
    peak_fraction: Optional[float] = None  # gbps / peak_gbps
    limit: str = ""  # the limit fraction_of_limit is against: "device peak", "write-only floor", "copy limit"
    fraction_of_limit: Optional[float] = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KernelResults:
    rows: list[KernelRow] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    peak: Optional[limits.Peak] = None

    @property
    def refused(self) -> list[KernelRow]:
        return [r for r in self.rows if r.status == "refused"]


def _row(case: Case, backend: str, device: torch.device, threads: int, status: str, nbytes: int,
         **fields: Any) -> KernelRow:
    return KernelRow(case.op, backend, case.grid, case.shape, case.dtype_name, str(device), threads, status, nbytes,
                     case.bytes_moved(), **fields)


def _timed_row(case: Case, backend: str, nbytes: int, t: Timing, copy: limits.Reference,
               fill: Optional[limits.Reference],
               device: torch.device, threads: int, peak: limits.Peak) -> KernelRow:
    gbps = limits.gbps(nbytes, t.p50_ms)
    copy_fraction = copy.ms / t.p50_ms
    fill_fraction = fill.ms / t.p50_ms if fill else None
    peak_fraction = gbps / peak.gbps if peak.gbps else None
    limit, fraction = limits.headline(peak_fraction, fill_fraction, copy_fraction)
    return _row(case, backend, device, threads, "ok", nbytes, ms_p20=t.p20_ms, ms_p50=t.p50_ms, ms_p80=t.p80_ms,
                samples=t.samples, timer=t.method, gbps=gbps, copy_limit_ms=copy.ms, copy_limit_gbps=copy.gbps,
                copy_limit_fraction=copy_fraction, write_floor_ms=fill.ms if fill else None,
                write_floor_gbps=fill.gbps if fill else None, write_floor_fraction=fill_fraction,
                peak_gbps=peak.gbps, peak_fraction=peak_fraction, limit=limit, fraction_of_limit=fraction)


def run_case(case: Case, device: torch.device, budget: Budget, threads: int, peak: limits.Peak,
             impls: Mapping[str, Impl], missing: Mapping[str, str]) -> list[KernelRow]:
    """Check each backend against the reference, then time the ones that agree, interleaved with the
    same-run references (the copy limit, the write-only floor)."""
    args = case.inputs(device)
    rows: list[KernelRow] = []
    nbytes = case.bytes_moved()
    fns: dict[str, Callable[[], Any]] = {}
    for name, impl in impls.items():
        out = torch.empty(case.out_shape(), dtype=case.dtype, device=device) if impl.needs_out else None
        try:
            result = impl.call(args, out)
            synchronize(device)
            verify(case, name, result, args)
        except Exception as exc:  # a wrong output, or a backend that fails: refused, never timed
            note = str(exc) if isinstance(exc, OutputMismatchError) else f"{type(exc).__name__}: {exc}"
            rows.append(_row(case, name, device, threads, "refused", nbytes, note=" ".join(note.split())[:500]))
            continue
        del result
        fns[name] = lambda impl=impl, out=out: impl.call(args, out)
    for name, why in missing.items():
        rows.append(_row(case, name, device, threads, "unavailable", nbytes, note=why))
    refs = limits.reference_fns(case.copy_numel(), case.fill_numel(), case.dtype, device)
    times = time_many({**{name: fn for name, (fn, _) in refs.items()}, **fns}, device, budget, threads)
    copy, fill = limits.measured(refs, {name: times[name].p50_ms for name in refs})
    timed = [_timed_row(case, name, moved, times[name], copy, fill, device, threads, peak)
             for name, (_, moved) in refs.items()]
    timed += [_timed_row(case, name, nbytes, times[name], copy, fill, device, threads, peak) for name in fns]
    return timed + rows


def run(config: KernelConfig, progress: bool = False,
        impls: Optional[Callable[..., tuple[dict[str, Impl], dict[str, str]]]] = None) -> KernelResults:
    """Every case of the grid. `impls(case, device, backends)` gives the backends of a case
    (default: `implementations`, looked up at call time)."""
    impls = impls or implementations
    config.checked()
    device = resolve_device(config.device)
    require_backends_on(device, config.backends)
    threads = set_threads(config.threads)
    budget = config.budget or (Budget.quick() if config.quick else Budget.full())
    peak = limits.peak_bandwidth(device, config.peak_gbps)
    cases = grid(config.dtype_list(), config.quick, config.ops)
    results = KernelResults(env=report.environment(device, threads, peak_gbps=peak.gbps, peak_source=peak.source,
                                                   quick=config.quick), peak=peak)
    for case in report.progress_bar(cases, show=progress, desc="kernels", unit="case"):
        available, missing = impls(case, device, config.backends)
        results.rows += run_case(case, device, budget, threads, peak, available, missing)
    return results


# -- reporting -----------------------------------------------------------------------------------


def _fraction_columns(rows: Sequence[KernelRow]) -> list[tuple[str, str]]:
    """(limit name, KernelRow field) of each limit measured in the run, in the order cells show them."""
    pairs = [(limits.DEVICE_PEAK, "peak_fraction"), (limits.COPY_LIMIT, "copy_limit_fraction"),
             (limits.WRITE_FLOOR, "write_floor_fraction")]
    return [(name, f) for name, f in pairs if any(getattr(r, f) is not None for r in rows)]


def _reference_cell(rows: Mapping[str, KernelRow], names: Sequence[str]) -> str:
    """The fastest of the named reference rows: ms (GB/s, which one)."""
    timed = [rows[n] for n in names if n in rows and rows[n].ms_p50]
    if not timed:
        return "-"
    best = min(timed, key=lambda r: r.ms_p50)
    return f"{best.ms_p50:.4f} ({best.gbps:.1f}" + (f", {best.backend})" if len(names) > 1 else ")")


def summary_markdown(results: KernelResults) -> str:
    """Per case: the bytes the op moves, the same-run references, and each backend's median ms with
    its fraction of each limit, every limit named."""
    rows = results.rows
    shown = _fraction_columns(rows)
    backends = [b for b in dict.fromkeys(r.backend for r in rows) if b not in REFERENCES]
    headers = ["op", "dtype", "grid", "shape", "MB the op moves", f"{limits.COPY_LIMIT} ms (GB/s)",
               f"{limits.WRITE_FLOOR} ms (GB/s)"] + [f"{b} ms" for b in backends]
    table = []
    keys = list(dict.fromkeys((r.op, r.dtype, r.grid, r.shape) for r in rows))
    for key in keys:
        mine = {r.backend: r for r in rows if (r.op, r.dtype, r.grid, r.shape) == key}
        some = next(iter(mine.values()))
        cells = [*key, f"{some.op_bytes / 1e6:.2f}", _reference_cell(mine, (COPY,)), _reference_cell(mine, FILLS)]
        for b in backends:
            r = mine.get(b)
            if r is None:
                cells.append("-")
            elif r.status != "ok":
                cells.append(r.status)
            else:
                fractions = " / ".join(report.fmt(getattr(r, f), 2) for _, f in shown)
                cells.append(f"{r.ms_p50:.4f} ({fractions})")
        table.append(cells)
    text = (f"Median ms of each backend and, in brackets, its fraction of each limit measured in this run: "
            f"{' / '.join(name for name, _ in shown)}. A fraction is the limit's time / the op's time (device "
            f"peak: op GB/s / peak GB/s); 1.0 = at that limit, higher is better. The {limits.WRITE_FLOOR} (the "
            f"fastest same-run fill of the output: zero_, and memset on CPU) bounds every implementation: at "
            f"most 1 up to noise. The {limits.COPY_LIMIT} (a same-run copy of the output's size; for "
            f"adapter_attention of k_t and v) can be beaten by an op that reads less than it writes (above 1). "
            f"'-': not measured for this op.\n\n")
    text += report.markdown_table(headers, table)
    refused = results.refused
    if refused:
        text += "\n\nRefused (output differs from the reference, or the backend failed; not timed):\n"
        text += "\n".join(f"* {r.op} [{r.shape}, {r.dtype}] {r.backend}: {r.note}" for r in refused)
    return text


def write(results: KernelResults, out: Path) -> list[Path]:
    """kernels.csv / .json, one PNG per dtype, summary.md."""
    out = Path(out)
    dicts = [r.to_dict() for r in results.rows]
    files = report.write_table(out, "kernels", dicts, results.env)
    device_type = results.env.get("device", "cpu").split(":")[0]
    peak = results.peak.gbps if results.peak else None
    for dtype in dict.fromkeys(r.dtype for r in results.rows):
        ok = [d for d in dicts if d["dtype"] == dtype and d["status"] == "ok"]
        if ok:
            title = (f"{results.env['device_name']}, {dtype}, {results.env['threads']} threads, "
                     f"torch {results.env['torch']}, {results.env['timestamp']}")
            plot = report.plot_bandwidth(ok, out / f"kernels_{device_type}_{dtype}.png", title, peak,
                                         references=REFERENCES)
            files += [plot] if plot else []
    peak_line = ""
    if results.peak and results.peak.gbps:
        peak_line = f"\n\nPeak memory bandwidth: {results.peak.gbps:.0f} GB/s ({results.peak.source})."
    files.append(report.write_summary(out, "Fused kernels against their limits",
                                      [("Kernels", summary_markdown(results) + peak_line)], results.env, files))
    return files


def main(config: KernelConfig, out: Path, progress: bool = True) -> tuple[KernelResults, list[Path]]:
    results = run(config, progress=progress)
    files = write(results, out)
    return results, files
