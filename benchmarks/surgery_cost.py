"""Time and extra memory of `resize` and `tokens(...)` on a 7B-shaped LLaMA-Adapter V2 whose base
weights stay on the meta device: the changes docs/performance.md reports.

    python benchmarks/surgery_cost.py [--quick] [--device cpu|cuda] [--dtypes bfloat16] [--repeats N] [--out DIR]

The same as `surgery bench surgery --model llama_adapter_v2_7b --change query_len=64 ...`
(surgery/bench/surgery_cost.py); `--quick` measures two of the changes. Any option of
`surgery bench surgery` may be given (`--model` and `--change` replace these defaults).
"""

import sys

from surgery.cli import main

FULL = ("query_len=64", "query_len=256", "query_len=1", "query_layer=8", "query_layer=32")
QUICK = ("query_len=64", "query_layer=8")


def argv(args: list[str]) -> list[str]:
    given = {a.split("=", 1)[0] for a in args}
    extra = [] if "--model" in given else ["--model", "llama_adapter_v2_7b"]
    if "--change" not in given:
        for change in QUICK if "--quick" in given else FULL:
            extra += ["--change", change]
    return ["bench", "surgery", *extra, *args]


if __name__ == "__main__":
    sys.exit(main(argv(sys.argv[1:])))
