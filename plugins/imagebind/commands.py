"""ImageBind's commands: `surgery embed` (embeddings of files of any modality, written to one file;
embed.py) and `surgery bench imagebind` (embedding throughput per modality, ours beside upstream's
when a checkout of it is given).

This is the plugin's command module (entry point `surgery.commands`, the same name as its backbone
entry, `imagebind`). Every `surgery` call imports it, `--help` included, so at module level it
imports only the standard library and the CLI's light helpers; `run` imports torch and the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import surgery
from surgery.cli.arguments import int_list, name_list
from surgery.cli.bench import add_common_options, finish, output_folder

EMBED_DESCRIPTION = (
    "ImageBind embedding throughput (items/s) per modality, dtype, execution mode and batch:\n"
    "ours, and with --upstream a checkout of facebookresearch/ImageBind's own model given the same\n"
    "weights (outputs compared before anything is timed). --quick: the small config, float32,\n"
    "eager, ours only (about a minute on a 2-core CPU). Details: docs/performance.md")


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p)
    p.add_argument("--config", help="named ImageBind config (default huge; small with --quick)")
    p.add_argument("--modalities", type=name_list, help="e.g. vision,text (default: every modality)")
    p.add_argument("--batches", type=int_list, default=(1, 8), help="e.g. 1,8 (default)")
    p.add_argument("--modes", type=name_list, default=("eager", "compile"), help="eager,compile (default: both)")
    p.add_argument("--upstream", type=Path, metavar="DIR", help="a checkout of facebookresearch/ImageBind")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per Timer measurement (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurements per implementation (default 3)")


def run_embed(args: argparse.Namespace) -> int:
    from surgery.bench.timing import resolve_device

    from .bench_embed import EmbedConfig, main, summary_markdown
    from .config import MODALITIES

    resolve_device(args.device)  # a clear error before any model is built
    config = EmbedConfig(quick=args.quick, config=args.config, modalities=args.modalities or MODALITIES,
                         dtypes=args.dtypes, batches=args.batches, modes=args.modes, upstream=args.upstream,
                         min_run_time=args.min_run_time, rounds=args.rounds, device=args.device,
                         threads=args.threads)
    out = output_folder(args)
    rows, files = main(config, out, not args.no_progress)
    return finish(summary_markdown(rows), out, files)


def add_embed_command_arguments(p: argparse.ArgumentParser) -> None:
    from .embed_options import add_arguments

    add_arguments(p)


def run_embed_command(args: argparse.Namespace) -> int:
    from .embed import run

    return run(args)


@surgery.hookimpl
def surgery_register_commands(register):
    register("embed", run_embed_command, add_arguments=add_embed_command_arguments,
             help="ImageBind embeddings of image, video, audio, depth, thermal, IMU, point-cloud and text inputs "
                  "(.safetensors, .npz, .npy)")
    register("imagebind", run_embed, group="bench", description=EMBED_DESCRIPTION, add_arguments=add_embed_arguments,
             help="ImageBind embedding throughput per modality (ours; upstream's beside it with --upstream)")
