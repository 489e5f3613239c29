"""LLaMA-Adapter V2 generation end to end (prefill ms, decode tokens/s): ours, upstream's path,
the no-adapter floor (ImageBind's embedding throughput: `surgery bench imagebind`).

    python benchmarks/e2e.py [--quick] [--device cpu|cuda] [--threads N] [--dtypes ...]
                             [--query-lens 1,10,64,256] [--batches 1,4] [--out DIR]

The same as `surgery bench e2e ...` (plugins/llama_adapter/bench_e2e.py).
"""

import sys

from surgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "e2e", *sys.argv[1:]]))
