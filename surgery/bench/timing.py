"""Clocks: which device a benchmark runs on, and how a callable is timed there.

    device = resolve_device("cuda")                  # DeviceUnavailableError without a GPU
    times = time_many({"copy": f, "op": g}, device, budget=Budget.quick(), threads=2)
    times["op"].p50_ms                               # Timing: p20 / p50 / p80 in ms, samples, method

Callables are timed interleaved, round by round, so that a drift in machine load hits all alike: on
CPU by `torch.utils.benchmark.Timer` at an explicit thread count, on GPU by `triton.testing.do_bench`
(or CUDA events). `wall_times` is for stateful work such as a resize, timed call by call.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from . import BenchmarkError, DeviceUnavailableError

QUANTILES = (20, 50, 80)


# -- devices -------------------------------------------------------------------------------------


def resolve_device(name: Optional[str]) -> torch.device:
    """The device `--device` names: "cpu" (default), "cuda" or "cuda:N" (only where it exists)."""
    text = (name or "cpu").strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceUnavailableError(f"--device {text!r} is not a device name; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceUnavailableError(f"--device {text!r}: the benchmarks run on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"--device {text!r}: no CUDA device is available here (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False); allowed here: cpu")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise DeviceUnavailableError(f"--device {text!r}: this machine has {count} CUDA device(s); "
                                     f"allowed: cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Percentiles of one callable's samples, in milliseconds."""

    p20_ms: float
    p50_ms: float
    p80_ms: float
    samples: int
    method: str  # "torch.utils.benchmark", "triton.testing.do_bench", "cuda events", "perf_counter"

    @classmethod
    def from_ms(cls, samples_ms: Sequence[float], method: str) -> "Timing":
        if len(samples_ms) == 0:
            raise ValueError("no timing samples")
        p20, p50, p80 = (float(v) for v in np.percentile(np.asarray(samples_ms, dtype=np.float64), QUANTILES))
        return cls(p20, p50, p80, len(samples_ms), method)

    @property
    def spread(self) -> float:
        """(p80 - p20) / p50: how far the middle 60% of the samples lie apart, relative to the median."""
        return (self.p80_ms - self.p20_ms) / self.p50_ms

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """How long to time each callable: `rounds` interleaved rounds of about `min_run_time` s
    (CPU) or `rep_ms` ms (GPU), after a warm-up."""

    rounds: int = 5
    min_run_time: float = 0.3  # s per round, CPU (blocked_autorange)
    warmup_runs: int = 2  # CPU: untimed calls first
    warmup_ms: float = 25.0  # GPU (do_bench)
    rep_ms: float = 100.0  # GPU (do_bench), per round

    @classmethod
    def quick(cls) -> "Budget":
        return cls(rounds=2, min_run_time=0.05, warmup_runs=1, warmup_ms=10.0, rep_ms=25.0)

    @classmethod
    def full(cls) -> "Budget":
        return cls()


# -- timing --------------------------------------------------------------------------------------


def time_many(fns: Mapping[str, Callable[[], Any]], device: torch.device, budget: Budget,
              threads: Optional[int] = None) -> dict[str, Timing]:
    """Time each zero-argument callable on `device`, interleaved; {name: Timing}."""
    if device.type == "cuda":
        return _time_cuda(fns, device, budget)
    return _time_cpu(fns, budget, threads or torch.get_num_threads())


def _time_cpu(fns: Mapping[str, Callable[[], Any]], budget: Budget, threads: int) -> dict[str, Timing]:
    import torch.utils.benchmark as benchmark

    timers = {name: benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads, label=name)
              for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for timer in timers.values():
        timer.timeit(budget.warmup_runs)  # warm-up: first-touch pages, lazy initialisation, compilation
    for _ in range(budget.rounds):
        for name, timer in timers.items():
            samples[name].extend(1e3 * t for t in timer.blocked_autorange(min_run_time=budget.min_run_time).times)
    return {name: Timing.from_ms(v, "torch.utils.benchmark") for name, v in samples.items()}


def _time_cuda(fns: Mapping[str, Callable[[], Any]], device: torch.device, budget: Budget) -> dict[str, Timing]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    bench, method = _cuda_bench()
    with torch.cuda.device(device):
        for _ in range(budget.rounds):
            for name, fn in fns.items():
                samples[name].extend(bench(fn, budget.warmup_ms, budget.rep_ms))
    return {name: Timing.from_ms(v, method) for name, v in samples.items()}


def _cuda_bench() -> tuple[Callable[[Callable[[], Any], float, float], list[float]], str]:
    """(fn, warmup_ms, rep_ms) -> per-run ms: triton's do_bench when triton imports, else ours."""
    try:
        from triton.testing import do_bench
    except Exception:  # no triton, or a broken install: time with CUDA events ourselves
        return cuda_event_times, "cuda events"

    def bench(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
        return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))

    return bench, "triton.testing.do_bench"


def cuda_event_times(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
    """What do_bench does, with torch's CUDA events: estimate, warm up, then time each run
    separately after flushing the L2 cache (so a run does not read what the last one left)."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")  # larger than any L2
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def wall_times(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """ms of each of `repeats` calls of `fn` (after `warmup` untimed ones), synchronised on GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def pairs(first: Callable[[], Any], second: Callable[[], Any], repeats: int, device: torch.device,
          warmup: int = 1) -> tuple[list[float], list[float]]:
    """ms of `first` and of `second`, called alternately (a change and its undo), `repeats` times each."""
    for _ in range(warmup):
        first()
        second()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, sink in ((first, a), (second, b)):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            sink.append(1e3 * (time.perf_counter() - start))
    return a, b


def set_threads(threads: Optional[int]) -> int:
    """Fix torch's intra-op thread count for the run (default: what torch uses now); returns it."""
    if threads is not None:
        if threads < 1:
            raise BenchmarkError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()

