"""The hooks a backbone plugin implements: the token-count contract between plugins and the engine.

A plugin is a module with functions named after these hooks, marked `@surgery.hookimpl` and listed
under the `surgery.backbones` entry-point group (command modules: `surgery.commands`). A backbone
needs `surgery_register_backbones`, `surgery_register_models` and `surgery_token_sites`; the others
are for structure, caches, options, layouts, metrics and commands (when to implement which:
docs/plugins.md). Registration hooks receive a `register` callback, so the host owns names and
collisions and knows which plugin registered what.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "surgery"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def surgery_register_backbones(register: Callable[..., None]) -> None:
    """Register the backbones this plugin recognises.

    Call `register(name, detect, description="")` once per backbone. `detect(model) -> bool` says
    whether a built model is of this backbone; it must be cheap and must not change the model.
    Two plugins registering the same name is an error naming both.
    """


@hookspec
def surgery_register_models(register: Callable[..., None]) -> None:
    """Register models this plugin can build by name.

    Call `register(name, factory, backbone, description="", example_inputs=None, forward=None,
    safe_kwargs=())`:
    `factory(**kwargs) -> nn.Module` builds the model (random weights; no downloads; with no
    `device=` asked for, on the current default device, so that `with torch.device("meta")`
    builds it without allocating: that is how a model's size is counted);
    `example_inputs(model) -> tuple` gives inputs for a forward pass (batch of 2 is customary);
    `forward(model, *inputs)` returns a tensor or a tuple of tensors to compare (default:
    `model(*inputs)`). Give tests a tiny config: the conformance kit builds it many times.

    `safe_kwargs` names the factory's keyword arguments a checkpoint's metadata may set when the
    CLI rebuilds the model a file was saved from (`surgery.model_source`): arguments whose values
    only size the model's token sites, such as the counts. Metadata is untrusted data: never list
    an argument that selects code, names a file or a path, or sizes anything but the tokens.
    Every other argument recorded in a file is refused.

    `released_weights() -> path` (optional) says where the model's released weights are on this
    machine (a cache the plugin knows, such as the Hugging Face hub's), for `--pretrained`: it
    never downloads, and raises a `CheckpointError` naming what is missing and where it looked.
    The core reads the file with its safe readers and loads it with `surgery.load`.
    """


@hookspec
def surgery_resolve_model(name: str, register: Callable[..., None]) -> None:
    """Build a model by a name no plugin registered, when this plugin knows the name.

    Asked, plugin by plugin, for a name that is not a registered model (`surgery.build`, `surgery
    inspect NAME`, `--model NAME`, the model a checkpoint's metadata names): for families too
    large to register one by one (every timm ViT: `timm/vit_small_patch14_dinov2`). Call
    `register(...)` with `name` itself and the arguments of `surgery_register_models`, or do
    nothing for a name this plugin does not know. For a name it knows but cannot build (a timm
    model of a family it has no sites for), raise a `SurgeryError` saying why and what is
    allowed: it is shown when no other plugin resolves the name. Two plugins resolving one name
    is an error naming both; the host keeps the answer, so a name is resolved once per process.

    The name may come from a checkpoint's metadata, so it is untrusted: resolve it only by
    looking it up among what the plugin knows (a library's registry), never by importing, opening
    or downloading what it names. The factory builds with random weights on the default device,
    as a registered model's does, so the core counts its size on the meta device first.
    """


@hookspec
def surgery_token_sites(model: Any, backbone: str) -> list | None:
    """Return the `TokenSite`s this plugin knows on `model` (of backbone `backbone`), or None.

    Build the descriptors from the model's current state every time: the engine asks again after
    each site it changes, so offsets and counters derived from other sites stay right.
    """


@hookspec
def surgery_submodels(model: Any, backbone: str) -> list | None:
    """Return the sub-models of `model` (of backbone `backbone`) that are models of another
    backbone, as `[(attribute path, backbone name)]`, or None.

    The engine then calls every per-model hook (`surgery_token_sites`, `surgery_apply_count`, the
    resize events, the model options) for each sub-model as well, with `model=` the sub-model and
    `backbone=` its backbone, so the sub-model's plugin declares its sites once for both uses. The
    path is relative to `model` (`"image_bind"`); the backbone's detector must recognise the
    submodule there. Sites of all parts share one namespace, tensors keep their paths from the top.
    """


@hookspec(firstresult=True)
def surgery_apply_count(model: Any, backbone: str, change: Any) -> bool | None:
    """Apply a count change the engine cannot apply from the site's declaration alone.

    `change` is a `surgery.engine.SiteChange`: `change.site`, `change.old`, `change.new`,
    `change.edit` (the journal every mutation must go through, so the change can be undone),
    `change.resize_tensor(t)` and `change.apply_default()`. Return True when this plugin applied
    the change, None to leave it to the engine (or to another plugin). The engine then checks
    that every declared tensor and counter reached the new count (`surgery.verify`), and rolls
    back with a `ResizeError` naming this plugin when not.
    """


@hookspec
def surgery_before_resize(model: Any, backbone: str, changes: dict) -> None:
    """Called before counts change; `changes` maps site name -> (old count, new count). Also called
    before model options change (`surgery.set_options`), with the counts that change with them
    (`{}` for options alone).

    Must only drop derived state (caches): the change may still fail and be rolled back.
    """


@hookspec
def surgery_after_resize(model: Any, backbone: str, changes: dict) -> None:
    """Called after counts changed (also after `tokens(...)` restored them); `changes` as above."""


@hookspec
def surgery_model_options(model: Any, backbone: str) -> dict | None:
    """Return the options of `model` this plugin owns, or None: {option name: JSON value}.

    An option is a setting that is part of the model's state but not of its weights (how a head
    reads its tokens, say), so that `surgery.save` records it and `surgery.load` restores it.
    Values are plain JSON (dicts with string keys, lists, strings, numbers, booleans, None).
    Read them from the model's current state every time; two plugins owning the same option
    name is an error.
    """


@hookspec
def surgery_apply_options(model: Any, backbone: str, options: dict, edit: Any) -> None:
    """Set options of `model` this plugin owns: `options` maps some of the names its
    `surgery_model_options` returns to new values, read from a checkpoint's metadata. A dict value
    may name only some of its keys: set those, keep the others. Afterwards `surgery_model_options`
    must report what was asked (the core checks).

    The values are untrusted data: check every one first and raise a `SurgeryError` (such as
    `ModelConfigError`) naming what is wrong and what is allowed, having changed nothing. They may
    only ever select among values the plugin knows, never code, a module to import or a file.
    Make every change through `edit` (a `surgery.edit.Edit`: `edit.set_attr`, `edit.on_undo`), so
    a load that fails later puts the old options back.
    """


@hookspec
def surgery_register_metrics(register: Callable[..., None]) -> None:
    """Register metrics a sweep can measure on this plugin's backbones (`surgery.sweep`).

    Call `register(name, compute, *, values, backbones=None, needs="", accepts=None, loss=None,
    higher_is_better=True, description="")` once per metric:
    `compute(evaluation) -> {value name: float}` measures the cell's model on the evaluation
    records (`evaluation` is a `surgery.sweep.metrics.Evaluation`); `values` names what it
    returns (one row each in the results); `backbones` the backbones it applies to (None: any);
    `needs` says in words what data it needs, and `accepts(data, model) -> str | None` returns why
    a data set cannot be used (None when it can), so a sweep refuses it before any cell runs;
    `loss(evaluation, records) -> scalar tensor` makes the metric's task a training objective
    for the new tokens. A name registered twice (by any two plugins, or the core's) is an error.
    """


@hookspec
def surgery_checkpoint_layout(path: Any, state_dict: Any) -> Any | None:
    """Recognise a checkpoint of a layout this plugin knows; return a `surgery.layouts.Layout` or None.

    Asked for every checkpoint without token-surgery metadata that `surgery.load`, `surgery
    inspect` or `surgery resize` reads. `path` is a `pathlib.Path` to a file, whose tensors the
    core has read safely (`state_dict`, keys as in the file, never to be changed in place), or to
    a folder (`state_dict` None: read what the layout needs with `surgery.checkpoint_io.read_checkpoint`).
    Recognise by what is there (key names, shapes, file names), cheaply; return None for anything
    else. A file of this layout that is broken (a missing key) raises a `CheckpointError` naming
    what is missing. Never import, open or download anything a file names.

    The Layout names the registered model that fits (`model`, `model_kwargs`), or builds its
    model itself (`build`, for an architecture no registered model has: a Hugging Face folder's
    class, chosen by the plugin's code from config.json's model_type); `save` writes a model back
    in the layout (`surgery resize` of a partial file or a folder). A model built to read the
    layout (key names) is built with `surgery.model_source.build_on_meta(..., justified_by=tensors)`,
    so a hostile file's sizes allocate nothing.
    """


@hookspec
def surgery_register_commands(register: Callable[..., None]) -> None:
    """Register commands of the `surgery` command line (`surgery.commands`).

    Implemented by a *command module*, listed under the `surgery.commands` entry-point group (not
    by the backbone plugin: the command line imports command modules for every call, `--help`
    included, so they import only the standard library at module level).

    Call `register(name, run, *, help, description="", add_arguments=None, group=None)`:
    `run(args) -> int` runs the command with its parsed `argparse.Namespace` and returns the exit
    status, importing what it needs when it runs; `add_arguments(parser)` adds its options;
    `group="bench"` makes it a kind of a group command (`surgery bench NAME`); `run=None`
    registers a group command. A name already taken (by the core or a plugin) is an error.
    """
