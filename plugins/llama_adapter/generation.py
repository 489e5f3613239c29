"""`surgery generate`'s options, and the families of models it generates with (no torch here).

The LLaMA-Adapter V2 plugin registers the one `surgery generate`, since the loop, tokenizer and
template are its own. Plugins whose models generate through that loop join it without this plugin
naming them: their command module declares a `Family`,

    GENERATION_FAMILY = Family(name="ImageBind-LLM", backbone="imagebind_llm", modalities=("image", "audio",
                               "points"), mixes=True, encoder_option="--imagebind", functions="pkg.generate")

A registered model picks the family of its backbone; official files, the one whose encoder option
was given (`--clip`, `--imagebind`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from surgery.cli.arguments import add_set_option
from surgery.commands import ENTRY_POINT_GROUP, UsageError, selected_entry_points

MODALITIES = ("image", "audio", "points")  # the input options of `surgery generate`, in this order
FAMILY_ATTRIBUTE = "GENERATION_FAMILY"


@dataclass(frozen=True)
class Family:
    """A kind of model `surgery generate` runs. `functions` names a module, imported only when a
    generation runs, that defines `load_official(args, dtype) -> model` (from the official files:
    args.llama_dir, args.checkpoint, ...), optionally `prepare(model, args)` (the family's options on
    a built model), and `read_inputs(model, inputs, batch)`: {modality: ([InputFile], weight)} -> the
    first argument of the model's `generate_tokens(inputs, prompts, ..., on_token=)`."""

    name: str                       # for messages: "LLaMA-Adapter V2"
    backbone: str                   # the backbone of its registered models
    modalities: tuple[str, ...]     # which of MODALITIES it takes
    mixes: bool                     # several modalities per prompt, each FILE:WEIGHT
    encoder_option: str             # the official files' encoder-weights option, which selects this family
    functions: str                  # the module holding load_official and read_inputs (imported on use)
    add_arguments: Callable[[Any], None] | None = field(default=None, compare=False)

    @property
    def encoder_dest(self) -> str:
        return self.encoder_option.lstrip("-").replace("-", "_")

    def function(self, name: str, required: bool = True) -> Callable[..., Any] | None:
        """A function of the family's module (imported now: it may import torch)."""
        found = getattr(importlib.import_module(self.functions), name, None)
        if found is None and required:
            raise AttributeError(f"{self.functions} has no {name}(), which surgery generate needs")
        return found


class InputFile(NamedTuple):
    """One `--image/--audio/--points FILE[:WEIGHT]`."""

    path: str
    weight: float | None


def input_file(text: str) -> InputFile:
    """argparse type of FILE[:WEIGHT]: a trailing `:number` is the weight, anything else is the path."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return InputFile(path, float(weight))
        except ValueError:
            pass  # a colon in the file's name
    if not text:
        raise argparse.ArgumentTypeError("expected FILE or FILE:WEIGHT, got an empty string")
    return InputFile(text, None)


def families() -> list[Family]:
    """The families of the selected command modules: this plugin's first, then by entry-point name."""
    eps, _ = selected_entry_points(ENTRY_POINT_GROUP)
    found: list[Family] = []
    for ep in sorted(eps, key=lambda e: (e.value != __package__ + ".commands", e.name)):
        try:
            module = ep.load()
        except Exception:  # noqa: BLE001 - a broken command module is reported by `surgery plugins`, not here
            continue
        family = getattr(module, FAMILY_ATTRIBUTE, None)
        if isinstance(family, Family) and family not in found:
            found.append(family)
    return found


DESCRIPTION = """\
Generate text with LLaMA-Adapter V2 or ImageBind-LLM, streamed as it is decoded.

The model is a registered one (--model NAME, see 'surgery models'; the tiny and bench ones decode
with the package's small tokenizer) or the official files: --llama-dir (with <TYPE>/params.json,
<TYPE>/consolidated.NN.pth, tokenizer.model), --checkpoint (the adapter checkpoint: BIAS-7B.pth,
ImageBind-LLM's 7B.pth) and the encoder weights, whose option chooses the model:
{encoders}.
Inputs: {inputs}: each once (for every prompt) or once per prompt;
FILE:WEIGHT where the model mixes modalities (weights are divided by their sum). Every --prompt is wrapped in the
Alpaca template unless --raw. --set SITE=N resizes any site first (e.g. query_len=1,
num_cls_tokens.vision=4). One prompt: its text is printed as it is decoded; several: each is
printed when all are done. Timing goes to stderr: prefill (inputs encoded and prompt read, up to
the first token) in ms and decode in tokens/s.

example: surgery generate --model llama_adapter_v2_tiny --image cat.png --prompt "Describe this image."
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of `surgery generate`: the model, its inputs, sampling, and each family's own."""
    known = families()
    p.description = DESCRIPTION.format(
        encoders=", ".join(f"{f.encoder_option} FILE ({f.name})" for f in known) or "none installed",
        inputs=", ".join(f"--{m} FILE" for m in MODALITIES))
    model = p.add_argument_group("the model")
    model.add_argument("--model", metavar="NAME", help="a registered model (see 'surgery models')")
    model.add_argument("--llama-dir", metavar="DIR", help="official files: the LLaMA folder")
    model.add_argument("--llama-type", default="7B", metavar="TYPE", help="its sub-folder (default 7B)")
    model.add_argument("--checkpoint", metavar="FILE", help="official files: the adapter checkpoint")
    model.add_argument("--tokenizer", metavar="FILE",
                       help="a sentencepiece tokenizer.model to decode with instead of the model's own")
    model.add_argument("--max-seq-len", type=int, metavar="N",
                       help="positions the model reads (prompt + answer; default: the model's, 512 for 7B)")
    add_set_option(model, required=False)
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="default float32 on the CPU, float16 on a GPU")
    model.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    for family in known:
        group = p.add_argument_group(family.name)
        if family.add_arguments is not None:
            family.add_arguments(group)
    inputs = p.add_argument_group("inputs")
    for modality in MODALITIES:
        takes = [f.name for f in known if modality in f.modalities]
        inputs.add_argument(f"--{modality}", action="append", type=input_file, metavar="FILE[:WEIGHT]",
                            default=[], help=f"({', '.join(takes) or 'no model installed'}) repeat for one per prompt")
    text = p.add_argument_group("text")
    text.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="an instruction (repeatable: "
                      "a batch)")
    text.add_argument("--raw", action="store_true", help="use each prompt as it is, without the Alpaca template")
    text.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default 128")
    text.add_argument("--temperature", type=float, default=0.1, help="0 is greedy (default 0.1, as upstream)")
    text.add_argument("--top-p", type=float, default=0.75, help="nucleus sampling mass (default 0.75, as upstream)")
    text.add_argument("--seed", type=int, default=0, help="sampling seed, and that of a registered model's random "
                      "weights (default 0)")


def choose_family(args: argparse.Namespace, backbone: str | None, known: list[Family]) -> Family:
    """The family for a registered model's backbone, or for the encoder option given with official files."""
    if backbone is not None:
        for family in known:
            if family.backbone == backbone:
                return family
        raise UsageError(f"surgery generate runs {', '.join(f.name for f in known)} models; --model "
                         f"{args.model!r} is of backbone {backbone!r}")
    given = [f for f in known if getattr(args, f.encoder_dest, None)]
    if len(given) != 1:
        options = " or ".join(f"{f.encoder_option} FILE ({f.name})" for f in known)
        raise UsageError(("official files take one encoder: " if given else "official files need the encoder's "
                          "weights: ") + options)
    return given[0]


__all__ = ["Family", "InputFile", "MODALITIES", "FAMILY_ATTRIBUTE", "families", "input_file", "add_arguments",
           "choose_family"]
