"""The `surgery sweep` command (registered by the core's command module, `surgery/cli/builtin.py`).

Nothing here imports torch until the command runs, so `surgery --help` stays instant. Errors are one
line; the exit status is 1 when any cell failed (its error is in the results; the others ran).
Options and examples: docs/sweeps.md.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "measure metrics across token counts (grid, training, plots; local or Ray)"
DESCRIPTION = """\
Measure what token counts do: a grid of model x site counts x init strategies x seeds (x head
mode), each cell applied to the same loaded model, its new tokens optionally trained
(--train-steps), its metrics measured on the data; written to --out as results.csv/json, PNG
plots (metric against count, baseline marked) and summary.md. A rerun skips the cells already
finished (--force redoes them); a failing cell is recorded with its error and the others go on.

MODEL is a registered model name ('surgery models') or a checkpoint file. --quick runs the
embedded default: a tiny ViT trained on scikit-learn's digits, its register tokens 0..8 grown,
trained and measured (top-1/top-5, drift), in about a minute on a CPU.

  surgery sweep --quick [--executor ray]
  surgery sweep vit_tiny_test --sites reg_tokens=0..8 --inits normal,zeros --metrics drift
  surgery sweep vit.safetensors --sites reg_tokens=0,4,8 --data photos/ --train-steps 100

Data (--data): an image folder (<class>/<image>, optional train/ and val/ above them), or a
.jsonl / .csv manifest with fields image, audio, text, label, split. Default: the digits.
Details: docs/sweeps.md."""


def _names(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `surgery sweep`."""
    p.add_argument("models", nargs="*", metavar="MODEL", help="registered model names or checkpoint files")
    p.add_argument("--quick", action="store_true", help="the embedded default (tiny ViT on digits); the options "
                                                        "below override its choices")
    grid = p.add_argument_group("grid")
    grid.add_argument("--sites", action="append", metavar="SITE=COUNTS",
                      help="a site and its counts, e.g. reg_tokens=0,1,2,4,8 or reg_tokens=0..8 (repeat for more)")
    grid.add_argument("--joint", action="store_true", help="every combination of the sites' counts (default: one "
                                                           "site at a time, the others at their baseline)")
    grid.add_argument("--inits", type=_names, help="growth strategies, e.g. normal,zeros,copy (default normal)")
    grid.add_argument("--seeds", type=_ints, help="seeds, e.g. 0,1,2 (default 0)")
    grid.add_argument("--head-modes", type=_names,
                      help="head modes where the model has them (ImageBind: first,mean,all)")
    what = p.add_argument_group("data and metrics")
    what.add_argument("--data", metavar="PATH", help="image folder or .jsonl/.csv manifest (default: the digits)")
    what.add_argument("--eval-fraction", type=float, default=0.2, help="share of records without a split that "
                                                                        "are evaluated (default 0.2)")
    what.add_argument("--metrics", type=_names, help="metric names (default: every metric of the model that can "
                                                     "use the data; see docs/sweeps.md)")
    what.add_argument("--tokenizer", metavar="PATH", help="tokenizer file for text metrics (ImageBind: the BPE "
                                                          "vocabulary; LLaMA-Adapter: tokenizer.model)")
    what.add_argument("--prompt", help="text prompt template of a metric (zero-shot: 'a photo of a {}.')")
    what.add_argument("--generations", type=int, help="captions to generate and save per cell (caption metric)")
    train = p.add_argument_group("training the new tokens")
    train.add_argument("--train-steps", type=int, help="steps per cell before it is measured (default 0)")
    train.add_argument("--lr", type=float, help="learning rate (AdamW; default 0.01)")
    train.add_argument("--batch-size", type=int, help="training batch size (default 64)")
    train.add_argument("--rows", choices=("new", "all"), help="train the rows a site gained (default) or all of them")
    train.add_argument("--objective", help="the metric whose loss is trained (default: the first with one)")
    run = p.add_argument_group("running")
    run.add_argument("--executor", choices=("local", "ray"), default="local", help="in this process (default) or "
                                                                                   "as Ray tasks")
    run.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); default: a local Ray")
    run.add_argument("--workers", type=int, default=2, help="Ray workers (actors), each loading the model once "
                                                            "(default 2)")
    run.add_argument("--cpus-per-cell", type=int, default=1, help="CPUs each Ray worker requests (default 1)")
    run.add_argument("--gpus-per-cell", type=float, default=0, help="GPUs each Ray worker requests (default 0)")
    run.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    run.add_argument("--threads", type=int, help="torch threads per cell (default: torch's; Ray: --cpus-per-cell)")
    run.add_argument("--out", metavar="DIR", help="results folder (default out/sweep, or out/sweep/quick)")
    run.add_argument("--force", action="store_true", help="rerun cells the results folder already has")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, as `surgery.sweep(...)` keywords."""
    from .grid import site_counts

    given = {
        "sites": site_counts(args.sites) if args.sites else None, "joint": args.joint or None,
        "inits": args.inits, "seeds": args.seeds, "head_modes": args.head_modes, "data": args.data,
        "metrics": args.metrics, "train_steps": args.train_steps, "lr": args.lr, "batch_size": args.batch_size,
        "rows": args.rows, "objective": args.objective,
    }
    options = {k: v for k, v in (("tokenizer", args.tokenizer), ("prompt", args.prompt),
                                 ("generations", args.generations)) if v is not None}
    if options:
        given["options"] = options
    return {k: v for k, v in given.items() if v is not None}


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from .api import sweep
    from .quick import quick_sweep

    if args.address and args.executor != "ray":
        raise UsageError("--address is for --executor ray")
    running = dict(executor=args.executor, address=args.address, workers=args.workers,
                   cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell, device=args.device,
                   threads_per_cell=args.threads, force=args.force, progress=not args.no_progress,
                   eval_fraction=args.eval_fraction)
    if args.quick:
        if args.models:
            raise UsageError("--quick sweeps its own model; drop MODEL or drop --quick")
        result = quick_sweep(args.out or "out/sweep/quick", **_overrides(args), **running)
    else:
        if not args.models:
            raise UsageError("name a MODEL (registered name or checkpoint file), or use --quick")
        if not args.sites:
            raise UsageError("give the counts to sweep with --sites SITE=COUNTS, e.g. --sites reg_tokens=0..8")
        result = sweep(args.models, **_overrides(args), **running, out=args.out or "out/sweep")
    print((result.out / "summary.md").read_text(encoding="utf-8"))
    print(f"results in {result.out}: " + ", ".join(f.name for f in result.files))
    if result.skipped:
        print(f"{result.skipped} of {len(result.cells)} cells were already finished (--force reruns them)")
    if result.failed:
        from ..errors import SweepError

        raise SweepError(f"{len(result.failed)} of {len(result.cells)} cells failed (their errors are in "
                         f"{result.out / 'summary.md'}); the other cells' results were written")
    return 0


__all__ = ["DESCRIPTION", "HELP", "add_arguments", "cmd_sweep"]
