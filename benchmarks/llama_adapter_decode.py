"""Decode-step cost of LLaMA-Adapter V2: this project's path against upstream's and the no-adapter floor.

    python benchmarks/llama_adapter_decode.py [--quick] [--threads N] [--dtypes ...] [--out DIR]

`surgery bench e2e` (plugins/llama_adapter/bench_e2e.py) on this script's historical grid: query_len in {10, 64}
x batch in {1, 4} (`--quick`: the two target points, fp32), fp32 and bf16. Greedy
tokens of the two adapter paths are checked identical before anything is timed. Any option of
`surgery bench e2e` may be given (e.g. `--query-lens 1,10,64,256` for the issue's full grid);
`--prompt N` is the old name of `--prompt-len N`.
"""

import sys

from surgery.cli import main


def argv(args: list[str]) -> list[str]:
    args = ["--prompt-len" if a == "--prompt" else a for a in args]
    given = {a.split("=", 1)[0] for a in args}
    extra = []
    if "--quick" not in given:
        if "--query-lens" not in given:
            extra += ["--query-lens", "10,64"]
        if "--batches" not in given:
            extra += ["--batches", "1,4"]
    return ["bench", "e2e", *extra, *args]


if __name__ == "__main__":
    sys.exit(main(argv(sys.argv[1:])))
