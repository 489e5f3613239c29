"""Each fused op x backend x shape x dtype, against the hardware limit (`surgery bench kernels`).

Backends (those that run on the chosen device):
    upstream   upstream's eager form: `repeat` + `cat`; a per-layer `repeat` + add loop (a list of
               L tensors); the eager adapter branch (reference.py: seven small ops)
    compile    torch.compile of the broadcast form (reference.py), allocating, one compile per shape
    cpp        the C++ CPU kernel (torch.ops.surgery.<op>), allocating its output     [CPU]
    cpp.out    the same writing into a preallocated output (the .out overload)         [CPU]
    cuda, cuda.out       the CUDA kernels, as cpp / cpp.out                            [GPU]
    triton, triton.out   the Triton kernels (torch.ops.surgery.<op>_triton[_out])        [GPU]
    copy       the limit: `dst.copy_(src)` of the op's size, preallocated (limits.py)
The kernels are called through their torch ops, not the `surgery.ops` dispatcher, so the times are
the kernels' (the dispatcher's argument checks are a constant few microseconds per call).
Triton on CPU runs only under its interpreter, which is not a kernel worth timing: GPU only.

Shapes: the 7B shapes (L=31 adapted layers, D=4096, CLIP width C=768, N=257 CLIP tokens, H=32
heads of hd=128, one decoding position T=1) at Q in {10, 64, 256} x B in {1, 8}, and a size
sweep over the batch at Q=10 (B up to 64) for the GB/s-against-size plots.

Bytes the op must move (read every input once, write the output once):
    query_concat        Q*C + B*N*C + B*(Q+N)*C elements
    adapter_add         L*Q*D + B*Q*D + L*B*Q*D
    adapter_attention   2*B*H*T*hd (xq in, out) + 2*B*H*Q*hd (k_t, v) + H + 1 (gates)
The copy has the output's size for query_concat and adapter_add; for adapter_attention, whose
output is one row per head, it has the size of k_t and v (what it must read): a copy of its
output would measure nothing but call overhead.

Before any backend is timed its output is compared with the reference (exactly for query_concat
and adapter_add, which are a copy and one add in the dtype; for adapter_attention with the fp32
reference rounded to the dtype, within the tolerances of tests/ops). A backend that disagrees,
or fails, is refused: it gets a row with status "refused" and the reason, and no time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import BenchmarkError, OutputMismatchError
from . import limits, report
from .timing import Budget, Timing, resolve_device, set_threads, synchronize, time_many

OPS = ("query_concat", "adapter_add", "adapter_attention")
L7B, D7B, C7B, N7B, H7B, HD7B = 31, 4096, 768, 257, 32, 128
CPU_BACKENDS = ("upstream", "compile", "cpp", "cpp.out")
GPU_BACKENDS = ("upstream", "compile", "cuda", "cuda.out", "triton", "triton.out")
# adapter_attention against the fp32 reference rounded to the dtype (tests/ops/test_cpp.py: LOOSE)
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
        """Elements of the limit copy (see the module docstring)."""
        d = self.d
        if self.op == "adapter_attention":
            return 2 * d["B"] * d["H"] * d["Q"] * d["hd"]
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


# -- implementations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """A backend of one op: `call(args, out)` returns the result (a tensor, or upstream's list of
    per-layer tensors); `out` is a preallocated output when `needs_out`."""

    name: str
    call: Callable[[tuple, Optional[Tensor]], Any]
    needs_out: bool = False


def upstream_query_concat(queries: Tensor, feats: Tensor) -> Tensor:
    return torch.cat([queries.unsqueeze(0).repeat(feats.shape[0], 1, 1), feats], dim=1)


def upstream_adapter_add(adapter: Tensor, visual_query: Tensor) -> list[Tensor]:
    B = visual_query.shape[0]
    return [adapter[i].repeat(B, 1, 1) + visual_query for i in range(adapter.shape[0])]  # per layer, as upstream


def _upstream(op: str) -> Callable:
    from ..ops import reference

    return {"query_concat": upstream_query_concat, "adapter_add": upstream_adapter_add,
            "adapter_attention": reference.adapter_attention}[op]


def implementations(case: Case, device: torch.device,
                    backends: Optional[Sequence[str]] = None) -> tuple[dict[str, Impl], dict[str, str]]:
    """({name: Impl} that can run here, {name: why not}) for `case` on `device`."""
    from .. import ops
    from ..ops import reference

    wanted = CPU_BACKENDS if device.type == "cpu" else GPU_BACKENDS
    if backends is not None:
        wanted = tuple(b for b in wanted if b in backends)
    impls: dict[str, Impl] = {}
    missing: dict[str, str] = {}
    op = case.op
    for name in wanted:
        base = name.removesuffix(".out")
        if name.endswith(".out") and op == "adapter_attention":
            continue  # no out= form: its output is one row per head
        if base == "upstream":
            fn = _upstream(op)
            impls[name] = Impl(name, lambda args, out, fn=fn: fn(*args))
        elif base == "compile":
            torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no stale guards
            compiled = torch.compile(getattr(reference, op), dynamic=False)
            impls[name] = Impl(name, lambda args, out, fn=compiled: fn(*args))
        else:
            ok, why = ops.can_run(base, device)
            if not ok:
                missing[name] = why
                continue
            impls[name] = _kernel_impl(name, base, op)
    return impls, missing


def _kernel_impl(name: str, base: str, op: str) -> Impl:
    if base in ("cpp", "cuda"):
        from ..ops import _extension

        _extension.require_registration()
        fn = getattr(torch.ops.surgery, op)
        if name.endswith(".out"):
            return Impl(name, lambda args, out: fn.out(*args, out=out), needs_out=True)
        return Impl(name, lambda args, out: fn(*args))
    from ..ops import triton_ops  # noqa: F401  (registers the surgery::*_triton ops)

    if name.endswith(".out"):
        fn_out = getattr(torch.ops.surgery, f"{op}_triton_out")

        def call_out(args: tuple, out: Tensor) -> Tensor:
            fn_out(*args, out)
            return out

        return Impl(name, call_out, needs_out=True)
    fn = getattr(torch.ops.surgery, f"{op}_triton")
    return Impl(name, lambda args, out: fn(*args))


# -- checking ------------------------------------------------------------------------------------


def verify(case: Case, backend: str, result: Any, args: tuple) -> None:
    """Raise OutputMismatchError unless `result` agrees with the reference (see the docstring)."""
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
                raise BenchmarkError(f"unknown backend {b!r}; allowed: {', '.join(known)} (copy is always timed)")
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
    bytes: int
    ms_p20: Optional[float] = None
    ms_p50: Optional[float] = None
    ms_p80: Optional[float] = None
    samples: Optional[int] = None
    timer: Optional[str] = None
    gbps: Optional[float] = None  # bytes / ms_p50
    copy_ms: Optional[float] = None  # the same-run copy (median)
    copy_gbps: Optional[float] = None
    copy_fraction: Optional[float] = None  # copy_ms / ms_p50
    peak_gbps: Optional[float] = None  # GPU
    peak_fraction: Optional[float] = None  # gbps / peak_gbps
    limit: str = ""  # which limit fraction_of_limit is against: "cpu copy", "device peak", "device copy"
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


def _timed_row(case: Case, backend: str, nbytes: int, t: Timing, copy: Timing, copy_bytes: int,
               device: torch.device, threads: int, peak: limits.Peak) -> KernelRow:
    gbps = limits.gbps(nbytes, t.p50_ms)
    copy_fraction = copy.p50_ms / t.p50_ms
    peak_fraction = gbps / peak.gbps if peak.gbps else None
    if device.type == "cpu":
        limit, fraction = "cpu copy", copy_fraction
    elif peak_fraction is not None:
        limit, fraction = "device peak", peak_fraction
    else:
        limit, fraction = "device copy", copy_fraction
    return KernelRow(case.op, backend, case.grid, case.shape, case.dtype_name, str(device), threads, "ok", nbytes,
                     t.p20_ms, t.p50_ms, t.p80_ms, t.samples, t.method, gbps, copy.p50_ms,
                     limits.gbps(copy_bytes, copy.p50_ms), copy_fraction, peak.gbps, peak_fraction, limit, fraction)


def run_case(case: Case, device: torch.device, budget: Budget, threads: int, peak: limits.Peak,
             impls: Mapping[str, Impl], missing: Mapping[str, str]) -> list[KernelRow]:
    """Check each backend against the reference, then time the ones that agree with the copy."""
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
            rows.append(KernelRow(case.op, name, case.grid, case.shape, case.dtype_name, str(device), threads,
                                  "refused", nbytes, note=" ".join(note.split())[:500]))
            continue
        del result
        fns[name] = lambda impl=impl, out=out: impl.call(args, out)
    for name, why in missing.items():
        rows.append(KernelRow(case.op, name, case.grid, case.shape, case.dtype_name, str(device), threads,
                              "unavailable", nbytes, note=why))
    numel = case.copy_numel()
    src, dst = limits.copy_pair(numel, case.dtype, device)
    times = time_many({"copy": lambda: dst.copy_(src), **fns}, device, budget, threads)
    copy_bytes = limits.copy_bytes(numel, case.element_size)
    copy = times["copy"]
    timed = [_timed_row(case, "copy", copy_bytes, copy, copy, copy_bytes, device, threads, peak)]
    timed += [_timed_row(case, name, nbytes, times[name], copy, copy_bytes, device, threads, peak) for name in fns]
    return timed + rows


def run(config: KernelConfig, progress: bool = False,
        impls: Optional[Callable[..., tuple[dict[str, Impl], dict[str, str]]]] = None) -> KernelResults:
    """Every case of the grid. `impls(case, device, backends)` gives the backends of a case
    (default: `implementations`, looked up at call time)."""
    impls = impls or globals()["implementations"]
    config.checked()
    device = resolve_device(config.device)
    threads = set_threads(config.threads)
    budget = config.budget or (Budget.quick() if config.quick else Budget.full())
    peak = limits.peak_bandwidth(device, config.peak_gbps)
    cases = grid(config.dtype_list(), config.quick, config.ops)
    results = KernelResults(env=report.environment(device, threads, peak_gbps=peak.gbps, peak_source=peak.source,
                                                   quick=config.quick), peak=peak)
    for case in _progress(cases, progress, "kernels"):
        available, missing = impls(case, device, config.backends)
        results.rows += run_case(case, device, budget, threads, peak, available, missing)
    return results


def _progress(items: Sequence[Any], show: bool, desc: str) -> Iterable[Any]:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case", leave=False, dynamic_ncols=True)


# -- reporting -----------------------------------------------------------------------------------


def summary_markdown(results: KernelResults) -> str:
    """Per case: the copy (limit) and each backend's median ms with its fraction of the limit."""
    rows = results.rows
    backends = list(dict.fromkeys(r.backend for r in rows if r.backend != "copy"))
    limit = next((r.limit for r in rows if r.status == "ok"), "")
    headers = ["op", "dtype", "grid", "shape", "MB moved", "copy ms (GB/s)"] + [f"{b} ms (frac)" for b in backends]
    table = []
    keys = list(dict.fromkeys((r.op, r.dtype, r.grid, r.shape) for r in rows))
    for key in keys:
        mine = {r.backend: r for r in rows if (r.op, r.dtype, r.grid, r.shape) == key}
        copy = mine.get("copy")
        some = next(iter(mine.values()))
        cells = [*key, f"{some.bytes / 1e6:.2f}",
                 f"{copy.ms_p50:.4f} ({copy.gbps:.1f})" if copy and copy.ms_p50 else "-"]
        for b in backends:
            r = mine.get(b)
            if r is None:
                cells.append("-")
            elif r.status != "ok":
                cells.append(r.status)
            else:
                cells.append(f"{r.ms_p50:.4f} ({r.fraction_of_limit:.2f})")
        table.append(cells)
    text = (f"Median ms of each backend and, in brackets, its fraction of the limit ({limit}: "
            + ("copy time / op time" if limit in ("cpu copy", "device copy") else "GB/s / peak GB/s")
            + "; higher is better, 1.0 = at the limit).\n\n")
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
            files.append(report.plot_bandwidth(ok, out / f"kernels_{device_type}_{dtype}.png", title, peak))
    peak_line = ""
    if results.peak and results.peak.gbps:
        peak_line = f"\n\nPeak memory bandwidth: {results.peak.gbps:.0f} GB/s ({results.peak.source})."
    files.append(report.write_summary(out, "Fused kernels against the hardware limit",
                                      [("Kernels", summary_markdown(results) + peak_line)], results.env, files))
    return files


def main(config: KernelConfig, out: Path, progress: bool = True) -> tuple[KernelResults, list[Path]]:
    results = run(config, progress=progress)
    files = write(results, out)
    return results, files
