"""The fused ops against their limits (copy limit, write-only floor; device peak on GPU), upstream's
eager form and torch.compile.

    python benchmarks/kernels.py [--quick] [--device cpu|cuda] [--threads N] [--dtypes float32,bfloat16]
                                 [--ops ...] [--backends ...] [--peak-gbps X] [--out DIR]

The same as `surgery bench kernels ...` (surgery/bench/kernels.py, where the backends, shapes,
bytes and limits are described): every backend's output is checked against the reference before
it is timed; results go to --out (default out/bench/kernels) as kernels.csv / .json, one PNG of
GB/s against size per dtype (the limits drawn), and summary.md.
"""

import sys

from surgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
