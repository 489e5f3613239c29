"""Benchmark mechanics every benchmark shares, model-free (clocks, limits, reports), and the core's
own two: `surgery bench kernels` (kernels.py) and `surgery bench surgery` (surgery_cost.py).

The modules are public so that plugins' benchmarks (`bench e2e`, `bench imagebind`, `profile`) reuse
them. `import surgery` imports none of this; matplotlib and tqdm (the `plot` extra) are optional.
How things are timed and what each limit means: docs/performance.md.
"""

from __future__ import annotations

# The errors live with the others (surgery/errors.py); re-exported here for `from . import ...`.
from ..errors import BenchmarkError, DeviceUnavailableError, OutputMismatchError

__all__ = ["BenchmarkError", "DeviceUnavailableError", "OutputMismatchError"]
