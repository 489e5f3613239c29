"""`surgery inspect TARGET`: a model's or a checkpoint's backbone, counts, sites and their tensors.

Also `open_file` (and `open_checkpoint`), which `resize` shares: build the model a checkpoint
belongs to (named by its untrusted metadata, the layout a plugin recognised it as, or --model)
and load the file into it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from surgery.commands import UsageError

from .arguments import add_allow_large_flag, add_json_flag, add_pretrained_flag
from .format import counts_text, format_sites, print_lines, recipe_lines, site_dicts

DESCRIPTION = (
    "Show the backbone, token sites, counts, constraints and the tensors each site owns.\n"
    "TARGET is a registered model name (see 'surgery models'), a name a plugin resolves\n"
    "(any timm ViT: timm/<name> or its plain timm name), a checkpoint file\n"
    "(.safetensors saved by surgery.save, or a plain state-dict .pth with --model),\n"
    "or a folder a plugin recognises (a Hugging Face model folder: config.json + model.safetensors).\n"
    "A model name is built with random weights, or with --pretrained its released weights.")


def add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", help="model to build for a checkpoint without surgery metadata")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="TARGET", help="checkpoint file or folder, or model name")
    add_model_option(p)
    add_allow_large_flag(p)
    add_pretrained_flag(p)
    add_json_flag(p)


def open_checkpoint(path: str, model_name: str | None,
                    allow_large: bool = False) -> tuple[Any, dict[str, Any], str, str]:
    """(model, the file's metadata, the model's name, where that name came from): `open_file`'s,
    for callers that need no layout."""
    opened = open_file(path, model_name, allow_large)
    return opened.model, opened.metadata, opened.name, opened.origin


@dataclass
class Opened:
    """A checkpoint file opened for a command: the model holding its weights, and how it was told."""

    model: Any
    metadata: dict[str, Any]  # {"surgery": {...}, other string entries} or {}
    name: str  # the model's registered name
    origin: str  # where that name came from
    layout: Any = None  # the `surgery.layouts.Layout` a plugin recognised the file as, or None


def open_file(path: str, model_name: str | None, allow_large: bool = False) -> Opened:
    """Build the model a checkpoint belongs to and load the file into it.

    The model is named by the file's "surgery" metadata, by the layout a plugin recognised the
    file as (a released checkpoint: `surgery.layouts`, which also gives the file's counts), or by
    `--model` (which wins, for a file saved without either, such as a plain timm `.pth`). The
    metadata is untrusted: it may name only a registered model and the keyword arguments its
    plugin declares safe, and a model larger than the file justifies needs `--allow-large`
    (`surgery.model_source`). `surgery.load` resizes the fresh model to the file's counts before
    loading, so any count the file has is fine. A partial layout (an adapter without its LLaMA)
    gets its model on the meta device, only the file's tensors real (`model_for_partial_layout`).
    A layout whose plugin builds the model itself (`Layout.build`: a Hugging Face folder) gets that
    model, sized against the file's tensors first (`model_for_built_layout`). `allow_large` covers
    every size check made while opening, the plugin's own included (`allowing_large`).
    """
    from surgery.model_source import allowing_large

    with allowing_large(allow_large):
        return _open_file(path, model_name, allow_large)


def _open_file(path: str, model_name: str | None, allow_large: bool) -> Opened:
    import surgery
    from surgery.layouts import read_any
    from surgery.model_source import (
        layout_model,
        model_for_built_layout,
        model_for_checkpoint,
        model_for_partial_layout,
    )

    where = f"checkpoint {path!r}"
    state_dict, metadata, layout = read_any(path)  # refuses a missing, unsafe, corrupt or broken file
    if layout is not None and layout.partial:
        model, name, source = model_for_partial_layout(layout, model_name=model_name, where=where)
        return Opened(model, metadata, name, source, layout)
    if layout is not None and layout.build is not None and not layout.model and not model_name:
        model = model_for_built_layout(layout, allow_large=allow_large, where=where)
        layout.state_dict = {}  # only its sizes were needed; `load` reads the folder again
        del state_dict
        surgery.load(path, model)
        return Opened(model, metadata, type(model).__name__, "the file's layout", layout)
    entry = metadata.get("surgery") or {}
    if layout is not None and not entry and not model_name:  # the layout names the model, as metadata would
        layout_model(layout, None, where)  # no registered model fits: the error asks for --model
        entry = {"model": layout.model, "model_kwargs": dict(layout.model_kwargs)}
    model, name, source = model_for_checkpoint(entry, state_dict, model_name=model_name,
                                               allow_large=allow_large, where=where)
    if layout is not None and source == "checkpoint metadata" and not metadata.get("surgery"):
        source = "the file's layout"
    del state_dict  # only its sizes were needed; `load` reads the file again
    if layout is not None:
        layout.state_dict = {}
    surgery.load(path, model)
    return Opened(model, metadata, name, source, layout)


def layout_text(layout: Any) -> str:
    """What `inspect` and `resize` say about a file's layout."""
    text = f"{layout.name} (recognised by plugin {layout.plugin!r})"
    if layout.partial:
        text += (f"; partial: the file holds {len(layout.state_dict)} of the model's tensors, the others are "
                 f"shapes only (meta device)")
    return text


CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def looks_like_path(target: str) -> bool:
    return os.sep in target or "/" in target or os.path.splitext(target)[1] in CHECKPOINT_SUFFIXES


def model_by_name(target: str, pretrained: bool, model_option: str | None = None) -> tuple[Any, str, str | None]:
    """(model, where it came from, the weights file or None) for TARGET that is not a file: a model
    name, registered or resolved by a plugin (`timm/<name>`). A name that is a checkpoint's file name
    (`x.pth`, `runs/x.safetensors`) is a missing file, whatever a plugin makes of it."""
    import surgery
    from surgery.errors import CheckpointError, SurgeryError
    from surgery.model_source import build_model, pretrained_model

    host = surgery.get_host()
    try:
        spec = host.resolve_model(target)
    except SurgeryError:
        if os.path.splitext(target)[1] in CHECKPOINT_SUFFIXES:
            raise CheckpointError(f"checkpoint file {target!r} does not exist") from None
        raise  # a plugin knows the name and says why it cannot build it
    if spec is None:
        if looks_like_path(target):
            raise CheckpointError(f"checkpoint file {target!r} does not exist")
        host.model_spec(target)  # the BackboneError listing the known models
    if model_option:
        raise UsageError("--model is for checkpoint files; TARGET already names a model")
    kind = "registered model" if target in host.models else f"model resolved by plugin {spec.plugin!r}"
    if not pretrained:
        return build_model(target, {}), f"{target} ({kind}, random weights)", None
    model, path = pretrained_model(target)
    return model, f"{target} ({kind}, released weights {path})", str(path)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a model's (or a checkpoint's) backbone, counts, sites and the tensors they own."""
    import surgery
    from surgery.errors import CheckpointError
    from surgery.options import model_options, option_lines

    target = args.target
    info: dict[str, Any] = {"target": target}
    if os.path.isfile(target) or os.path.isdir(target):  # a folder: a layout a plugin must recognise
        if args.pretrained:
            raise UsageError("--pretrained is for a model name; TARGET is a checkpoint, whose weights are loaded")
        opened = open_file(target, args.model, args.allow_large)
        model, source = opened.model, f"{opened.name} (named by {opened.origin})"
        info.update(kind="checkpoint", model=opened.name, metadata=opened.metadata)
        if opened.layout is not None:
            info["layout"] = {"name": opened.layout.name, "plugin": opened.layout.plugin,
                              "partial": opened.layout.partial, "text": layout_text(opened.layout)}
    elif os.path.exists(target):
        raise CheckpointError(f"{target!r} is not a file")
    else:
        model, source, weights = model_by_name(target, args.pretrained, args.model)
        info.update(kind="model", model=target, weights=weights)
    sites = site_dicts(model)
    info.update(backbone=surgery.backbone_of(model), counts={s["name"]: s["count"] for s in sites},
                sites=sites, recipe=list(surgery.recipe(model).steps), options=model_options(model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['kind']}: {target}")
    print(f"model:    {source}")
    if info.get("layout"):
        print(f"layout:   {info['layout']['text']}")
    print(f"backbone: {info['backbone']}")
    print(f"counts:   {counts_text(info['counts'])}")
    if info["options"]:  # plugin-owned state outside the weights (surgery.options)
        print("options:")
        print_lines([f"  {line}" for line in option_lines(info["options"])])
    print("sites:")
    print_lines(format_sites(sites))
    if info["recipe"]:
        print("recipe (how these counts were reached):")
        print_lines(recipe_lines(info["recipe"]))
    return 0
