"""`surgery embed`: ImageBind embeddings of files of any modality, written to one file.

Registered by this plugin's command module; its options are in `embed_options.py`, the readers of
each kind of file in `embed_inputs.py`. Order of work: the command line's own checks (inputs
given, OUT's format and whether it may be replaced), the model (built or loaded), its changes
(`--set`, `--head-mode`), every input read, then the model runs and OUT is written atomically.
Anything refused on the way is one error and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

import surgery
from surgery.cli.arguments import requested_counts
from surgery.commands import UsageError
from surgery.errors import ModelConfigError, ModelInputError

from .config import HEAD_MODALITIES
from .embed_inputs import READERS, read_text
from .embed_options import COSINE_ROWS, FORMATS, INPUTS, HeadMode
from .plugin import BACKBONE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LABEL_WIDTH = 32  # a longer file name or text is cut at its start in the cosine matrix


def run(args: argparse.Namespace) -> int:
    inputs = given_inputs(args)
    out = check_output(args, inputs)
    counts = requested_counts(args.set)
    from surgery.bench.timing import resolve_device

    device = resolve_device(args.device)
    model, source = open_model(args)
    check_modalities(model, inputs, source)
    changes = apply_changes(model, counts, head_modes(args.head_mode, model))
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()

    batches = {option: (read_text(model, files, args.bpe_vocab) if option == "text" else READERS[option](model, files))
               for option, files in inputs.items()}  # every file read before the model runs
    like = next(model.parameters())
    embeddings = {}
    with torch.inference_mode():
        for option, x in batches.items():
            x = x.to(device) if option == "text" else x.to(device=device, dtype=like.dtype)
            try:  # [B, D] or [B, k, D], --batch-size inputs at a time
                embeddings[option] = torch.cat([model.encode(INPUTS[option], chunk).float().cpu()
                                                for chunk in x.split(args.batch_size)])
            except ModelInputError as exc:  # a size the encoder cannot take: say which files
                raise ModelInputError(f"--{option} {' '.join(inputs[option])}: {exc}") from None
    write_embeddings(out, embeddings, metadata(source, model, inputs))

    for line in changes:
        print(line)
    print(f"wrote {out} ({source}):")
    for line in summary_lines(model, inputs, embeddings):
        print(f"  {line}")
    if sum(len(files) for files in inputs.values()) <= COSINE_ROWS:
        for line in cosine_lines(model, inputs, embeddings):
            print(line)
    return 0


# -- checks before any work ----------------------------------------------------------------------


def given_inputs(args: argparse.Namespace) -> dict[str, list[str]]:
    """{option: files (texts for --text)} of the input options given, in the options' order."""
    inputs = {option: list(getattr(args, option)) for option in INPUTS if getattr(args, option)}
    if not inputs:
        raise UsageError("give at least one input: " + ", ".join(f"--{o} {'TEXT' if o == 'text' else 'FILE'}"
                                                                  for o in INPUTS))
    if args.bpe_vocab and "text" not in inputs:
        raise UsageError("--bpe-vocab is the tokenizer of --text, and no --text was given")
    return inputs


def check_output(args: argparse.Namespace, inputs: dict[str, list[str]]) -> str:
    """OUT, checked: a known format, a single input option for .npy, replaced only with --force."""
    from surgery.checkpoint_io import check_output_path
    from surgery.cli.resize import same_file

    out = args.out
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"-o {out!r}: unknown format {suffix or '(no suffix)'!r}; allowed: {', '.join(FORMATS)}")
    if suffix == ".npy" and len(inputs) > 1:
        raise UsageError(f"-o {out!r}: a .npy file holds one array and {len(inputs)} inputs were given "
                         f"({', '.join('--' + o for o in inputs)}); write .safetensors or .npz (one array each)")
    if os.path.isdir(out):
        raise UsageError(f"-o {out!r} is a directory; give a file name")
    if args.weights and os.path.exists(args.weights) and same_file(args.weights, out):
        raise UsageError(f"-o {out!r} is the weights file; embed never writes its input, choose another OUT")
    if os.path.lexists(out) and not args.force:
        raise UsageError(f"{out!r} already exists; pass --force to replace it")
    check_output_path(out)  # even with --force, only a regular file is replaced (no symlink, FIFO, device)
    return out


# -- the model -----------------------------------------------------------------------------------


def open_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """(model, what it is, for the summary): --weights loaded (into --model for a plain state
    dict), or a registered --model with random weights from --seed."""
    host = surgery.get_host()
    usable = ", ".join(sorted(n for n, s in host.models.items() if s.backbone == BACKBONE))
    if args.weights:
        from surgery.cli.inspect import open_file
        from surgery.cli.resize import existing_file

        opened = open_file(existing_file(args.weights), args.model, args.allow_large)
        model, source = opened.model, f"{opened.name}, weights {args.weights}"
    elif args.model:
        spec = host.model_spec(args.model)  # an unknown name: the error lists the registered ones
        if spec.backbone != BACKBONE:
            raise UsageError(f"surgery embed runs ImageBind models; {args.model!r} is of backbone {spec.backbone!r}. "
                             f"--model takes one of: {usable}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = surgery.build(args.model)
        source = f"{args.model}, random weights from seed {args.seed}"
    else:
        raise UsageError(f"give --model NAME (one of: {usable}) or --weights FILE (imagebind_huge.pth, "
                         f"imagebind_w3D.pth, a file surgery.save wrote)")
    if surgery.backbone_of(model) != BACKBONE:
        raise UsageError(f"surgery embed runs ImageBind models; {args.weights} holds a "
                         f"{surgery.backbone_of(model)!r} model")
    if any(p.is_meta for p in model.parameters()):
        raise ModelConfigError(f"{args.model} is built on the meta device (shapes only, no weights): give its "
                               f"weights with --weights FILE")
    return model, source


def check_modalities(model: nn.Module, inputs: dict[str, list[str]], source: str) -> None:
    for option in inputs:
        if INPUTS[option] not in model.modalities:
            others = ", ".join(sorted(n for n, s in surgery.get_host().models.items()
                                      if s.backbone == BACKBONE and "w3d" in n)) if option == "points" else ""
            raise ModelInputError(f"--{option}: the model ({source}) has no {INPUTS[option]} encoder; it has "
                                  f"{', '.join(model.modalities)}" + (f" (point clouds: {others})" if others else ""))


def head_modes(given: list[HeadMode], model: nn.Module) -> dict[str, str]:
    """{modality: mode} from the --head-mode options: a bare MODE is every CLS head's, a
    MODALITY=MODE overrides it; one modality given two modes is a usage error."""
    modes: dict[str, str] = {}
    for mode in (m for m in given if m.modality is None):
        modes.update({m: mode.mode for m in model.modalities if m in HEAD_MODALITIES})
    named: dict[str, str] = {}
    for mode in (m for m in given if m.modality is not None):
        if named.get(mode.modality, mode.mode) != mode.mode:
            raise UsageError(f"--head-mode {mode.modality} given twice ({named[mode.modality]} and {mode.mode})")
        named[mode.modality] = mode.mode
    if len({m.mode for m in given if m.modality is None}) > 1:
        raise UsageError("--head-mode MODE (for every head) given twice with two modes")
    return {**modes, **named}


def apply_changes(model: nn.Module, counts: dict[str, int], modes: dict[str, str]) -> list[str]:
    """--set and --head-mode on the model, as lines saying what changed. Heads going back to 'first'
    change before the counts (a head reading the CLS tokens keeps its count >= 1), the others after
    (a head cannot read tokens the model does not have yet)."""
    before_modes = {m: model.head_mode(m) for m in modes if m in model.modalities}
    first = {m: v for m, v in modes.items() if v == "first"}
    if first:
        model.set_head_mode(first)
    before = surgery.counts(model)
    if counts:
        surgery.resize(model, **counts)
    rest = {m: v for m, v in modes.items() if v != "first"}
    if rest:
        model.set_head_mode(rest)
    after = surgery.counts(model)
    lines = [f"{site} {before[site]} -> {after[site]}" for site in counts if before[site] != after[site]]
    lines += [f"{m} head: {before_modes[m]} -> {v}" for m, v in modes.items() if before_modes.get(m) != v]
    return ["changed: " + ", ".join(lines)] if lines else []


# -- output --------------------------------------------------------------------------------------


def metadata(source: str, model: nn.Module, inputs: dict[str, list[str]]) -> dict[str, str]:
    """What a .safetensors OUT records besides its tensors (strings, as safetensors requires)."""
    return {"model": source, "inputs": json.dumps(inputs), "counts": json.dumps(surgery.counts(model)),
            "head_mode": json.dumps({m: model.head_mode(m) for m in model.modalities if m in HEAD_MODALITIES})}


def write_embeddings(out: str, embeddings: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """OUT in its format, whole or not at all (the core's atomic writer)."""
    from surgery.checkpoint_io import write_atomically

    suffix = Path(out).suffix.lower()
    arrays = {k: v.contiguous().numpy() for k, v in embeddings.items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in embeddings.items()}, str(tmp), metadata=meta)
    elif suffix == ".npz":
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                np.savez(f, **arrays)
    else:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, next(iter(arrays.values())))
    write_atomically(out, write)


def summary_lines(model: nn.Module, inputs: dict[str, list[str]], embeddings: dict[str, torch.Tensor]) -> list[str]:
    """One line per input option: its files, the array's shape, how its head read the tokens."""
    width = max(len(o) for o in inputs)
    lines = []
    for option, files in inputs.items():
        modality = INPUTS[option]
        noun = ("text" if option == "text" else "file") + ("" if len(files) == 1 else "s")
        how = ""
        if modality in HEAD_MODALITIES:
            how = (f"  {modality} head: {model.head_mode(modality)}, {model.num_cls_tokens(modality)} CLS "
                   f"token{'s' if model.num_cls_tokens(modality) != 1 else ''}")
        lines.append(f"{option:<{width}}  {len(files)} {noun:<5}  {tuple(embeddings[option].shape)}{how}")
    return lines


def _label(option: str, item: str) -> str:
    text = json.dumps(item, ensure_ascii=False) if option == "text" else item
    return text if len(text) <= LABEL_WIDTH else "..." + text[-(LABEL_WIDTH - 3):]


def cosine_lines(model: nn.Module, inputs: dict[str, list[str]], embeddings: dict[str, torch.Tensor]) -> list[str]:
    """The cosine-similarity matrix of every input (for an input with k embeddings, their mean),
    rows labelled by file name (or text), columns by number."""
    vectors, labels, means = [], [], []
    for option, items in inputs.items():
        e = embeddings[option]
        if e.ndim == 3:
            means.append(f"{option} k={e.shape[1]}")
            e = e.mean(dim=1)
        vectors.append(e)
        labels += [f"[{len(labels) + i + 1}] {_label(option, item)}" for i, item in enumerate(items)]
    v = torch.nn.functional.normalize(torch.cat(vectors).double(), dim=-1)
    matrix = (v @ v.T).tolist()
    width = max(len(label) for label in labels)
    how = f"head mode 'all': the mean of each input's k embeddings, {', '.join(means)}" if means else "embeddings"
    lines = [f"cosine similarity ({how}):",
             " " * width + "".join(f"{f'[{j + 1}]':>8}" for j in range(len(labels)))]
    lines += [f"{label:<{width}}" + "".join(f"{value:8.3f}" for value in row) for label, row in zip(labels, matrix)]
    return lines


__all__ = ["run", "given_inputs", "check_output", "open_model", "head_modes", "apply_changes", "write_embeddings",
           "cosine_lines"]
