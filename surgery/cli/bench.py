"""`surgery bench KIND`: a group command, each kind a benchmark with only its own options.

The core's kinds are model-free: `kernels` (the fused ops against their limits) and `surgery` (the
cost of `resize` and `tokens(...)`). Plugins add kinds from their command modules, with the shared
options and ending here (`add_common_options`, `output_folder`, `finish`; see docs/plugins.md,
"Adding commands"). No torch at module level: every `surgery` call, `--help` included, reads it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable

from surgery.commands import UsageError

from .arguments import int_list, name_list, site_count

GROUP_HELP = "benchmarks: kernels vs the hardware limit, surgery cost, and the kinds plugins add"
GROUP_DESCRIPTION = (
    "Run a benchmark and write its results (CSV, JSON, PNG plots, summary.md) to --out.\n"
    "Every kind takes --quick (a small grid, under a minute on a 2-core CPU), --device,\n"
    "--out DIR (default out/bench/KIND), --threads, --dtypes and --no-progress;\n"
    "'surgery bench KIND --help' shows its own options. Details: docs/performance.md")

KERNELS_DESCRIPTION = (
    "Each fused op x backend x shape x dtype: ms, GB/s, fraction of each limit (copy limit,\n"
    "write-only floor: a same-run copy / fill; GPU: device peak). Every backend's output is\n"
    "checked against the reference before it is timed. Details: docs/performance.md")
SURGERY_DESCRIPTION = (
    "Time and extra memory of resize and tokens(...) on a registered model built on the meta\n"
    "device (only the sites' tensors materialised, so a 7B model costs nothing), against the\n"
    "same-run floor of allocating and writing them.\n\n"
    "example: surgery bench surgery --model llama_adapter_v2_7b --change query_len=64 --change query_layer=8")


def add_common_options(p: argparse.ArgumentParser) -> None:
    """The options every `surgery bench KIND` takes."""
    p.add_argument("--quick", action="store_true", help="a small grid with short timings (CI)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--out", metavar="DIR", help="results folder (default out/bench/KIND)")
    p.add_argument("--threads", type=int, help="CPU threads, fixed for the run (default: torch's count)")
    p.add_argument("--dtypes", type=name_list, help="e.g. float32,bfloat16 (default: both; float32 with --quick)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_folder(args: argparse.Namespace) -> Path:
    """--out, or out/bench/KIND for the kind being run."""
    return Path(args.out or os.path.join("out", "bench", args.command_object.name))


def finish(summary: str, out: Path, files: Iterable[Path | str]) -> int:
    """Print a benchmark's summary and the files it wrote (and that plots were skipped, without
    matplotlib); the exit status (0)."""
    from surgery.bench import report

    print(summary)
    print(f"\nresults in {out}: " + ", ".join(Path(f).name for f in files))
    if not report.can_plot():
        print(report.PLOTS_SKIPPED)
    return 0


# -- kernels -------------------------------------------------------------------------------------


def add_kernels_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p)
    p.add_argument("--ops", type=name_list, help="some of query_concat,adapter_add,adapter_attention")
    p.add_argument("--backends", type=name_list, help="e.g. cpp,cpp.out (the copy and fills: always)")
    p.add_argument("--peak-gbps", type=float, help="on GPU: the peak memory bandwidth, GB/s "
                                                   "(default: device properties, else a table; SURGERY_PEAK_GBPS)")


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from surgery.bench import OutputMismatchError, kernels
    from surgery.bench.timing import resolve_device

    resolve_device(args.device)  # a clear error before anything is built
    out = output_folder(args)
    config = kernels.KernelConfig(device=args.device, quick=args.quick, dtypes=args.dtypes, threads=args.threads,
                                  ops=args.ops or kernels.OPS, backends=args.backends, peak_gbps=args.peak_gbps)
    results, files = kernels.main(config, out, not args.no_progress)
    finish(kernels.summary_markdown(results), out, files)
    if results.refused:
        raise OutputMismatchError(f"{len(results.refused)} backend measurement(s) refused because their output "
                                  f"differs from the reference or they failed (not timed): " + "; ".join(
                                      f"{r.op} [{r.shape}, {r.dtype}] {r.backend}" for r in results.refused))
    return 0


# -- surgery cost --------------------------------------------------------------------------------


def add_surgery_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p)
    p.add_argument("--model", required=True, metavar="NAME", help="a registered model (see 'surgery models')")
    p.add_argument("--change", action="append", type=site_count, required=True, metavar="SITE=N",
                   help="a site and the count to measure a change to, from the model's own (repeat for more)")
    p.add_argument("--repeats", type=int, help="timed calls per action (default 30; 5 with --quick)")


def cmd_bench_surgery(args: argparse.Namespace) -> int:
    from surgery.bench import surgery_cost
    from surgery.bench.timing import resolve_device

    if args.dtypes and len(args.dtypes) > 1:
        raise UsageError("'surgery bench surgery' takes one dtype (the sites' tensors), e.g. --dtypes bfloat16")
    resolve_device(args.device)
    out = output_folder(args)
    config = surgery_cost.CostConfig(model=args.model, changes=tuple(args.change), device=args.device,
                                     quick=args.quick, threads=args.threads, dtype=(args.dtypes or ("float32",))[0],
                                     repeats=args.repeats)
    results, files = surgery_cost.main(config, out, not args.no_progress)
    return finish(surgery_cost.summary_markdown(results), out, files)


__all__ = ["add_common_options", "finish", "int_list", "name_list", "output_folder"]
