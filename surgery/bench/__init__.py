"""Benchmarks and profiling: the fused kernels against their limits, LLaMA-Adapter V2
generation end to end, the cost of surgery itself, and traces of where the time goes.

    surgery bench kernels [--quick] [--device cpu|cuda] [--out DIR]   kernels.py
    surgery bench e2e     [--quick] [--device cpu|cuda] [--out DIR]   e2e.py
    surgery bench surgery [--quick] [--device cpu|cuda] [--out DIR]   surgery_cost.py
    surgery profile       [--device cpu|cuda] [--out DIR]             profile.py

One concept per module:
    timing.py        clocks: the device to run on, CPU timers at a fixed thread count, CUDA events /
                     triton.testing.do_bench on GPU, percentiles
    limits.py        the limits, each named: the copy limit (a same-run copy), the write-only floor
                     (a same-run fill of the output), the device peak (GPU memory bandwidth)
    kernels.py       each fused op x backend x shape x dtype against those limits
    e2e.py           prefill and decode of LLaMA-Adapter V2: ours, upstream's path, no adapter;
                     noisy points flagged
    surgery_cost.py  time and memory of `resize` and `tokens(...)` on the 7B shape
    report.py        rows to CSV / JSON, Markdown tables, matplotlib plots, the run's environment
    profile.py       a generation under torch.profiler with labelled stages, a Chrome trace

Nothing here is imported by `import surgery`; matplotlib is imported only when plotting.
"""

from __future__ import annotations

# The errors live with the others (surgery/errors.py); re-exported here for `from . import ...`.
from ..errors import BenchmarkError, DeviceUnavailableError, OutputMismatchError

__all__ = ["BenchmarkError", "DeviceUnavailableError", "OutputMismatchError"]
