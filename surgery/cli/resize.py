"""`surgery resize CKPT --set SITE=N -o OUT`: resize a checkpoint file into a new file.

Every check that needs no model runs first (a mistyped command fails at once); CKPT is never
written, and `surgery.save` writes OUT atomically, so a failure leaves no file half-written.
A partial file of a released layout (a LLaMA-Adapter adapter, ImageBind-LLM's 7B.pth) is written
back in its own layout by its plugin (`Layout.save`, atomic too), holding the file's keys only,
at the new counts: what upstream's loader reads. Sites whose tensors it does not hold are refused.
A folder a plugin recognises (a Hugging Face model folder) is written back as a folder by its
plugin (`Layout.save`: transformers' save_pretrained, so from_pretrained opens it at the new
counts), into a temporary folder renamed to OUT at the end; OUT inside CKPT or around it is refused.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from surgery.commands import UsageError

from .arguments import add_allow_large_flag, add_pretrained_flag, add_set_option, requested_counts
from .format import counts_text, format_shape_changes, print_lines, state_shapes
from .inspect import CHECKPOINT_SUFFIXES, add_model_option, layout_text, open_file

# Kept in words here so that `--help` needs no torch; `check_strategies` validates against
# `surgery.strategies` itself, so a name listed here that no longer exists is still refused.
GROWTH_HELP = "restore (default: tokens a shrink dropped come back first), zeros, mean, normal, copy, interpolate"
SHRINK_HELP = "truncate (default), pool"

DESCRIPTION = (
    "Build the checkpoint's model, load CKPT (resized to its counts), set new counts and\n"
    "save the result to OUT with surgery.save. CKPT is never written. Instead of CKPT,\n"
    "--model NAME --pretrained starts from the model's released weights on this machine\n"
    "(timm models: the Hugging Face cache; nothing is downloaded). CKPT may be a folder a\n"
    "plugin recognises (a Hugging Face model folder): OUT is then a folder of the same layout.\n\n"
    "example: surgery resize vit.safetensors --set reg_tokens=4 --init normal -o vit_reg4.safetensors\n"
    "         surgery resize dinov2-folder --set num_register_tokens=8 -o dinov2-reg8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", nargs="?",
                   help="input checkpoint (.safetensors or .pth, or a Hugging Face model folder); none with "
                        "--model NAME --pretrained")
    add_set_option(p, required=True)
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output .safetensors file (never CKPT); for a partial released file (an adapter "
                        "checkpoint, 7B.pth), a file of the same layout; for a folder, a folder")
    p.add_argument("--init", default="restore", metavar="STRATEGY", help=f"how new tokens are made: {GROWTH_HELP}")
    p.add_argument("--shrink", default="truncate", metavar="STRATEGY", help=f"how tokens are removed: {SHRINK_HELP}")
    p.add_argument("--seed", type=int, default=0, help="seed of the 'normal' init (default 0; recorded in the recipe)")
    add_model_option(p)
    add_allow_large_flag(p)
    add_pretrained_flag(p)
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists (a regular file only; for a folder, a folder of files)")


def check_strategies(init: str, shrink: str) -> None:
    """Unknown strategy names are a usage error, found before any file is read."""
    from surgery import strategies
    from surgery.errors import StrategyError

    try:
        strategies.check_growth(init)
        strategies.check_shrink(shrink)
    except StrategyError as exc:
        raise UsageError(str(exc)) from None


def existing_file(path: str) -> str:
    from surgery.errors import CheckpointError

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} is not a file")
    return path


def existing_checkpoint(path: str) -> str:
    """`path` is a file or a folder (a folder's layout is for a plugin to recognise)."""
    return path if os.path.isdir(path) else existing_file(path)


def check_folder_output(src: str, out: str, force: bool) -> None:
    """OUT of a folder CKPT is a new folder beside it: never CKPT, inside it or around it, and an
    existing one only with --force (and only a folder of files: `check_output_folder`)."""
    from surgery.checkpoint_io import check_output_folder

    suffix = os.path.splitext(out)[1]
    if suffix in CHECKPOINT_SUFFIXES:
        raise UsageError(f"-o {out!r}: CKPT is a folder, written back as a folder of its layout; give OUT a folder "
                         f"name, not a {suffix} file name")
    src_real, out_real = os.path.realpath(src), os.path.realpath(out)
    if os.path.commonpath([src_real, out_real]) in (src_real, out_real):
        where = "is the input folder" if src_real == out_real else (
            "is inside the input folder" if out_real.startswith(src_real + os.sep) else "holds the input folder")
        raise UsageError(f"-o {out!r} {where}; resize never writes its input, choose a folder beside it")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out!r} already exists; pass --force to replace it")
    check_output_folder(out)


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: same real path (symlinks), or same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_partial(model: Any, layout: Any, requested: dict[str, int], src: str) -> None:
    """A partial file (an adapter without its LLaMA) is resized only at sites whose tensors it holds,
    and only when its plugin can write its layout back: anything else is refused before any change."""
    import surgery
    from surgery.errors import CheckpointError
    from surgery.site import module_paths

    if layout.save is None:
        raise CheckpointError(f"{src} is a partial {layout.name} and plugin {layout.plugin!r} cannot write that "
                              f"layout back, so it cannot be resized into a file")
    paths, sites = module_paths(model), surgery.sites(model)
    held = [n for n, s in sites.items() if s.tensors and all(t.key(paths) in layout.state_dict for t in s.tensors)]
    for name in requested:
        keys = [t.key(paths) for t in getattr(sites.get(name), "tensors", ())]
        outside = [k for k in keys if k not in layout.state_dict]
        if outside:
            raise CheckpointError(f"site {name}: its tensors ({', '.join(outside)}) are not in {src}, a partial "
                                  f"{layout.name}; resize the file that holds them (sites of this file: "
                                  f"{', '.join(held) or 'none'})")


def cmd_resize(args: argparse.Namespace) -> int:
    """Load CKPT, resize, write OUT (an existing OUT, with --force, untouched on failure)."""
    import surgery
    from surgery.checkpoint import check_output_path
    from surgery.model_source import pretrained_model

    requested = requested_counts(args.set)
    check_strategies(args.init, args.shrink)
    src, out = args.ckpt, args.out
    if args.pretrained and (src is not None or not args.model):
        raise UsageError("--pretrained starts from a model's released weights: give --model NAME and no CKPT")
    if src is None and not args.pretrained:
        raise UsageError("give CKPT, or --model NAME --pretrained to start from the model's released weights")
    if src is not None:
        existing_checkpoint(src)
    to_folder = src is not None and os.path.isdir(src)  # written back as a folder by its layout's plugin
    if to_folder:
        check_folder_output(src, out, args.force)
    else:
        if src is not None and same_file(src, out):
            raise UsageError(f"-o {out!r} is the input checkpoint; resize never writes its input, choose another OUT")
        if os.path.isdir(out):
            raise UsageError(f"-o {out!r} is a directory; give a file name")
        if os.path.lexists(out) and not args.force:
            raise UsageError(f"{out!r} already exists; pass --force to replace it")
        check_output_path(out)  # even with --force, only a regular file is replaced (no symlink, FIFO, device)

    if args.pretrained:
        model, src = pretrained_model(args.model)  # a CheckpointError saying where it looked, if not there
        if same_file(src, out):
            raise UsageError(f"-o {out!r} is the released weights' file; resize never writes its input")
        metadata, name, origin, layout = {}, args.model, "--model, released weights", None
    else:
        opened = open_file(src, args.model, args.allow_large)
        model, metadata, name, origin, layout = (opened.model, opened.metadata, opened.name, opened.origin,
                                                 opened.layout)
    print(f"loaded {src}: {name} (named by {origin}), {counts_text(surgery.counts(model))}")
    if layout is not None:
        print(f"layout: {layout_text(layout)}")
    if layout is not None and layout.partial:
        check_partial(model, layout, requested, src)
    if to_folder and (layout is None or layout.save is None):
        from surgery.errors import CheckpointError

        raise CheckpointError(f"{src} is a {layout.name if layout else 'folder'} and its plugin cannot write that "
                              f"layout back, so it cannot be resized into a folder")
    before = state_shapes(model)
    changes = surgery.resize(model, init=args.init, shrink=args.shrink, seed=args.seed, **requested)
    for site, (old, new) in changes.items():
        how = f"init {args.init}" if new > old else f"shrink {args.shrink}"
        print(f"resized {site}: {old} -> {new}  ({how}, seed {args.seed})")
    if not changes:
        print("no count changed (the checkpoint already has these counts)")
    print_lines(format_shape_changes(before, state_shapes(model)))
    # The file's own metadata entries travel along; "surgery" is rewritten by save (new counts, recipe).
    kept = {k: v for k, v in metadata.items() if k != "surgery" and isinstance(v, str)}
    if layout is not None and (layout.partial or to_folder):  # the file's own layout (the plugin's writer)
        layout.save(model, Path(out))  # atomic too; a partial file: its keys only
    else:
        surgery.save(model, out, metadata=kept)  # atomic: a temporary file renamed over OUT
    print(f"wrote {out}: {counts_text(surgery.counts(model))}")
    return 0
