"""Checkpoints in a layout other than token-surgery's own: an upstream release, a Hugging Face folder.

    state_dict, metadata, layout = read_any("7B.pth")     # layout: None for a file of surgery.save
    layout.name, layout.model, layout.model_kwargs         # what the plugin recognised, what fits it

A file `surgery.save` wrote says what it is in its metadata. Files released with a model say it
only through their key names and shapes (LLaMA-Adapter's adapter checkpoint, ImageBind's
`imagebind_huge.pth`), and a Hugging Face model is a folder (`config.json`, `model.safetensors`).
The plugin that knows such a layout recognises it (`surgery_checkpoint_layout`) and returns a
`Layout`: the tensors renamed to its model's state-dict keys, and the registered model they fit.
The core names no layout: `surgery.load`, `surgery inspect` and `surgery resize` ask the plugins.

What the core hands a plugin was read safely (`read_checkpoint`: safetensors, or torch.load with
weights_only); a plugin that reads more files (a folder's) uses the same public readers
(`surgery.checkpoint_io`). A layout's model keyword arguments are the plugin's reading of the
tensors (counts from shapes), so a file still chooses no code: the plugin's code does, and only
among the models it registered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .checkpoint_io import META_KEY, as_path, read_checkpoint
from .errors import PLUGIN_FAILURES, CheckpointError, PluginConflictError, PluginError, SurgeryError, describe_error
from .plugins import get_host

HOOK = "surgery_checkpoint_layout"


@dataclass
class Layout:
    """A checkpoint a plugin recognised: its tensors keyed as the model's state dict, and what fits it.

    `model` is a registered model name the tensors load into (with `model_kwargs`, the counts
    the plugin read from the shapes); `partial` says the file holds only part of that model's
    weights (an adapter without its language model), so loading it leaves the other tensors as
    they are; `options` are model options (`surgery.options`) the layout implies. `save(model,
    path)`, when given, writes a model back in this layout (a partial one: only the file's keys),
    which `surgery resize` does for a partial file and for a folder; it raises a `CheckpointError`
    for a path it cannot write (say, a suffix of another format) before writing anything, and
    writes atomically (`surgery.checkpoint_io.write_atomically`, `write_folder_atomically`).

    `build()`, when given and `model` is None, builds the model itself with random weights: the
    plugin's own code, for a layout whose architecture no registered model has (a Hugging Face
    folder: the class the plugin chooses, among those it supports, from config.json's
    model_type, at config.json's sizes). It must build on the current default device: the core
    runs it on the meta device first and refuses a model larger than the tensors justify
    (`surgery.model_source.build_on_meta`), then runs it for real and loads the tensors.
    """

    name: str
    state_dict: dict[str, torch.Tensor]
    model: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    partial: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    save: Callable[[Any, Path], None] | None = None
    build: Callable[[], Any] | None = None
    plugin: str = ""  # filled in by the core: which plugin recognised it


def recognise(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None) -> Layout | None:
    """The layout some plugin recognises `path` (a file whose tensors are `state_dict`, or a
    folder: None) as, or None. Two plugins claiming the same file is an error naming both; a
    plugin that raises or returns something else is named in a `PluginError`."""
    path = as_path(path)
    claims: list[Layout] = []
    for plugin, function in get_host().implementations(HOOK):
        try:
            layout = function(path=path, state_dict=state_dict)
        except SurgeryError:
            raise  # the plugin recognised the layout and says what is wrong with this file
        except PLUGIN_FAILURES as exc:
            get_host().record_problem(plugin, f"{HOOK} raised {describe_error(exc)}")
            raise PluginError(f"plugin {plugin!r}: {HOOK} raised {describe_error(exc)} reading {path}") from exc
        if layout is None:
            continue
        if not isinstance(layout, Layout) or not isinstance(layout.state_dict, dict):
            raise PluginError(f"plugin {plugin!r}: {HOOK} returned {type(layout).__name__} for {path}; "
                              f"it must return a surgery.layouts.Layout (or None)")
        layout.plugin = plugin
        claims.append(layout)
    if len(claims) > 1:
        names = ", ".join(f"{c.name!r} (plugin {c.plugin!r})" for c in claims)
        raise PluginConflictError(f"{path} is recognised as several layouts: {names}")
    return claims[0] if claims else None


def read_any(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Layout | None]:
    """(state dict, metadata, layout) of a checkpoint file or folder.

    A file `surgery.save` wrote (it has "surgery" metadata) is read as it is (layout None).
    Any other file is offered to the plugins; the state dict of a recognised one is the
    layout's (keys renamed to the model's), else the file's own. A folder must be recognised.
    """
    path = as_path(path)
    if path.is_dir():
        layout = recognise(path, None)
        if layout is None:
            raise CheckpointError(f"checkpoint {path} is a folder, not a file, and no plugin recognises its layout "
                                  f"(a Hugging Face model folder needs a plugin that supports its config.json's "
                                  f"model_type, such as the transformers plugin: docs/transformers.md lists them; "
                                  f"see `surgery plugins`)")
        return layout.state_dict, {}, layout
    state_dict, metadata = read_checkpoint(path)
    if metadata.get(META_KEY):
        return state_dict, metadata, None
    layout = recognise(path, state_dict)
    return (layout.state_dict if layout else state_dict), metadata, layout

