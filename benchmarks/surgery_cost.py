"""Time and extra memory of `resize` and `tokens(...)` on a 7B-shaped LLaMA-Adapter V2 whose base
weights stay on the meta device.

    python benchmarks/surgery_cost.py [--quick] [--device cpu|cuda] [--dtypes bfloat16] [--repeats N] [--out DIR]

The same as `surgery bench surgery ...` (surgery/bench/surgery_cost.py).
"""

import sys

from surgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "surgery", *sys.argv[1:]]))
