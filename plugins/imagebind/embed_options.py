"""`surgery embed`'s options (no torch here: the command module imports this for `--help`).

One input option per kind of file, each naming the ImageBind modality that encodes it and the
key its embeddings are written under (`--image` and `--video` both go through `vision`, so
they are two keys). `--head-mode` takes one mode for every CLS head or `MODALITY=MODE`;
`--set SITE=N` is the CLI's shared option. What each file must be is in `embed_inputs.py`.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

from surgery.cli.arguments import add_allow_large_flag, add_set_option

from .config import HEAD_MODES

# option (also the output key) -> the model modality that encodes it
INPUTS = {"image": "vision", "video": "vision", "audio": "audio", "depth": "depth", "thermal": "thermal",
          "imu": "imu", "points": "point", "text": "text"}
FORMATS = (".safetensors", ".npz", ".npy")  # what -o writes (see DESCRIPTION)
COSINE_ROWS = 16  # the cosine-similarity matrix is printed up to this many inputs in all

# printed on one line: tests/plugins/imagebind/test_embed_cli.py runs it as written
EXAMPLE = ("surgery embed --model imagebind_tiny_test --image teal.png --set num_cls_tokens.vision=2 --head-mode all "
           "-o emb.safetensors")
DESCRIPTION = f"""\
ImageBind embeddings of files of any modality, written to one file.

The model is a registered one (--model NAME, random weights drawn from --seed; see 'surgery
models') or a weights file (--weights FILE: imagebind_huge.pth, imagebind_w3D.pth, or a file
surgery.save wrote; --model names the model for a plain state dict). --set SITE=N changes a count
first (num_cls_tokens.vision=4), --head-mode how the heads read the CLS tokens: first (token 0,
upstream's), mean (their mean) or all (one embedding per CLS token), for every head or
MODALITY=MODE.

Inputs (each option repeatable, several files per option; one batch per option):
  --image    images Pillow decodes (CLIP's preprocessing at the model's size)
  --video    videos, decoded with PyAV (pip install av): 5 clips of 2 s, 3 crops each
  --audio    audio files torchaudio decodes (.wav ...): 3 clips of 2 s as log-mel filterbanks
  --depth, --thermal, --imu   arrays (.npy, .pt) of one item's input: (1, H, W) or (H, W); (6, L)
  --points   point clouds (.npy, .pt, .ply, .xyz, .obj), resampled and normalised
  --text     strings, tokenized with CLIP's BPE (--bpe-vocab FILE, else an installed copy)
An image, video or audio input may also be a .npy/.pt array of one item already preprocessed.

OUT: {' or '.join(FORMATS)}. .safetensors and .npz hold one array per input option (image,
video, audio, depth, thermal, imu, points, text); .npy holds one array, so one input option
only. Arrays are float32: (files, D), or (files, k, D) for a head in mode 'all'. OUT is written
whole or not at all, and an existing OUT is replaced only with --force. With at most
{COSINE_ROWS} inputs in all, their cosine-similarity matrix is printed (for mode 'all': of the
mean of each input's k embeddings).

example: {EXAMPLE}
"""


class HeadMode(NamedTuple):
    """One `--head-mode`: a modality (None: every CLS head) and a mode."""

    modality: str | None
    mode: str


def head_mode(text: str) -> HeadMode:
    """argparse type of `--head-mode MODE` or `MODALITY=MODE`."""
    modality, sep, mode = text.rpartition("=")
    modality, mode = modality.strip(), mode.strip()
    if mode not in HEAD_MODES or (sep and not modality):
        raise argparse.ArgumentTypeError(f"expected MODE or MODALITY=MODE with MODE one of {', '.join(HEAD_MODES)} "
                                         f"(e.g. all, vision=all), got {text!r}")
    return HeadMode(modality or None, mode)


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    model = p.add_argument_group("the model")
    model.add_argument("--model", metavar="NAME", help="a registered ImageBind model (see 'surgery models')")
    model.add_argument("--weights", metavar="FILE", help="weights to load: imagebind_huge.pth, imagebind_w3D.pth, "
                       "or a file surgery.save wrote")
    add_allow_large_flag(model)
    add_set_option(model, required=False)
    model.add_argument("--head-mode", action="append", type=head_mode, default=[], metavar="[MODALITY=]MODE",
                       help=f"{' | '.join(HEAD_MODES)} for every CLS head, or one modality's (repeatable)")
    model.add_argument("--seed", type=int, default=0, help="a registered model's random weights (default 0)")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="the model's dtype (default float32); the file is float32 either way")
    model.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    model.add_argument("--batch-size", type=positive, default=32, metavar="N",
                       help="inputs the model encodes at once (default 32); files are read first, all of them")
    inputs = p.add_argument_group("inputs")
    for option, modality in INPUTS.items():
        metavar = "TEXT" if option == "text" else "FILE"
        inputs.add_argument(f"--{option}", action="extend", nargs="+", default=[], metavar=metavar,
                            help=f"({modality}) repeatable")
    inputs.add_argument("--bpe-vocab", metavar="FILE", help="CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz) for "
                        "--text; default: the copy of an installed imagebind or open_clip package")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--out", required=True, metavar="OUT", help=f"the file to write ({', '.join(FORMATS)})")
    out.add_argument("--force", action="store_true", help="replace OUT if it exists (a regular file only)")


__all__ = ["INPUTS", "FORMATS", "COSINE_ROWS", "DESCRIPTION", "HeadMode", "head_mode", "positive", "add_arguments"]
