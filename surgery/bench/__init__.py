"""Benchmark mechanics every benchmark shares, model-free: clocks, limits, reports; and the core's
own benchmarks, of the fused ops and of surgery itself.

    surgery bench kernels [--quick] [--device cpu|cuda] [--out DIR]      kernels.py
    surgery bench surgery --model NAME --change SITE=N [--quick] ...     surgery_cost.py

One concept per module, each public for plugins' benchmarks (`surgery bench e2e` and `surgery
profile` are the llama_adapter plugin's, `surgery bench imagebind` the imagebind plugin's):
    timing.py        clocks: the device to run on, CPU timers at a fixed thread count, CUDA events /
                     triton.testing.do_bench on GPU, percentiles
    limits.py        the limits, each named: the copy limit (a same-run copy), the write-only floor
                     (a same-run fill of the output), the device peak (GPU memory bandwidth)
    report.py        rows to CSV / JSON, Markdown tables, plots, progress bars, the run's environment
    backends.py      the fused ops' backends as the kernel benchmark calls them
    kernels.py       each fused op x backend x shape x dtype against those limits
    surgery_cost.py  time and memory of `resize` and `tokens(...)` on a model built on the meta device

Nothing here is imported by `import surgery`; matplotlib and tqdm (the `plot` extra) only when
drawing or showing progress, and without them the results are written all the same.
"""

from __future__ import annotations

# The errors live with the others (surgery/errors.py); re-exported here for `from . import ...`.
from ..errors import BenchmarkError, DeviceUnavailableError, OutputMismatchError

__all__ = ["BenchmarkError", "DeviceUnavailableError", "OutputMismatchError"]
