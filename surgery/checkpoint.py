"""Checkpoints: save a model with its token counts, load one whose counts differ from the model's.

    surgery.save(model, "edited.safetensors")              # weights + {"surgery": counts, recipe, options, ...}
    surgery.load("edited.safetensors", fresh_model)        # replays the recipe, then loads the weights
    surgery.load("timm_reg4.pth", reg0_model)              # the model grows to 4 registers, then loads
    surgery.load_state_dict(model, sd, mismatch="checkpoint")  # the model keeps its counts instead

Why loading is more than `model.load_state_dict`: a checkpoint of another token count does not
fit the model's tensors. We read each site's count out of the state dict, resize the model to it
(or, with `mismatch="checkpoint"`, resize there, load, and resize back), and only then copy the
weights. Everything - options, resizes, the copy, clearing the stash - is one transaction
(`surgery.transaction`), so any failure (a missing key, a shape that does not fit, a plugin's
error, Ctrl-C half-way through the copy) leaves the model bit-exactly as it was. Keys and shapes
are checked before any weight is copied, because torch's `load_state_dict` copies some tensors
before it raises.

Reading is safe by construction (`surgery.checkpoint_io`): safetensors files through safetensors,
pickles only through `torch.load(..., weights_only=True)`; a pickle that wants to build objects or
call functions is refused (`UnsafeCheckpointError`) and nothing in it runs. A file's recipe is not run step by
step: the model is resized once to the counts its tensors have, and a recipe that leads there
is kept as the model's history, so no allocation is larger than the file's tensors justify.
Files are never written by a load, and `save` writes to a temporary file in the same folder
that replaces the target (a regular file, or a new name) in one step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import strategies
from .checkpoint_io import (META_KEY, as_path, check_output_path, listing, read_checkpoint, tensors_only,
                            write_atomically)
from .declarations import backbone_of, check_request, counts, sites
from .edit import Edit
from .errors import CheckpointError, SurgeryError
from .options import OPTIONS_KEY, canonical, model_options, saved_options
from .recipes import Recipe, is_option_step
from .site import TokenSite, module_paths
from .state import model_state, set_state
from .transaction import Transaction

FORMAT = 1  # version of the "surgery" metadata entry


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What a load did: the model's counts now, how they changed, what the checkpoint had.

    `converted` names the sites whose checkpoint tensors were fitted to the model's counts
    (`mismatch="checkpoint"`): {site: (checkpoint count, model count)}. `missing_keys` and
    `unexpected_keys` are those a `strict=False` load left alone.
    """

    counts: dict[str, int]
    changes: dict[str, tuple[int, int]]
    checkpoint_counts: dict[str, int]
    converted: dict[str, tuple[int, int]]
    replayed: bool
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- saving ----------------------------------------------------------------------------------------


def surgery_metadata(model: nn.Module) -> dict[str, Any]:
    """The "surgery" entry `save` writes: enough to rebuild the model and replay its counts."""
    state = model_state(model)
    recipe = Recipe(backbone=backbone_of(model), steps=state.recipe)
    return {
        "format": FORMAT,
        "backbone": recipe.backbone,
        "model": state.model_name,
        "model_kwargs": dict(state.model_kwargs),
        "counts": counts(model, recipe.backbone),
        "recipe": json.loads(recipe.to_json()),
        OPTIONS_KEY: model_options(model, recipe.backbone),  # plugin-owned state outside the weights
    }


def save(model: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `model`'s weights as safetensors, with its counts, recipe and plugin options
    (`surgery.options`) under the "surgery" key.

    Tied tensors (one tensor under several keys) are written once by `safetensors.torch.save_model`;
    `load` fills the other keys back in from the model's own tying. `metadata` adds string
    entries of your own. Atomic: the file appears complete or not at all.
    """
    from safetensors.torch import save_model

    extra = dict(metadata or {})
    if META_KEY in extra:
        raise CheckpointError(f"metadata key {META_KEY!r} is reserved for token-surgery's own entry")
    bad = [k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise CheckpointError(f"safetensors metadata must map strings to strings; not so for: {listing(bad)}")
    extra[META_KEY] = json.dumps(surgery_metadata(model), default=repr)
    return write_atomically(as_path(path), lambda tmp: save_model(model, str(tmp), metadata=extra,
                                                                  force_contiguous=True))


# -- counts in a state dict ------------------------------------------------------------------------


def state_dict_counts(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                      backbone: str | None = None, partial: bool = False,
                      declared: Mapping[str, TokenSite] | None = None) -> dict[str, int]:
    """Each site's count in `state_dict` (a state dict of `model`'s backbone, at any counts).

    A site's own `count_in_state_dict(state_dict, paths)` decides when the plugin gives one
    (`paths` maps id(module) to its key prefix; returning None means "cannot tell"). Otherwise
    the site's first tensor is read: present, its extent along `axis`, less whatever the model's
    tensor holds besides this site's tokens; absent and declared with a `template`, 0. Sites that
    cannot be told are left out (they keep the model's count). In a `partial` state dict (a file
    holding only some of the model's weights) an absent tensor tells nothing. `declared`: the
    model's sites, when already read.
    """
    paths = module_paths(model)
    found: dict[str, int] = {}
    for name, site in (declared if declared is not None else sites(model, backbone)).items():
        if site.count_in_state_dict is not None:
            try:
                count = site.count_in_state_dict(state_dict, paths)
            except Exception as exc:  # noqa: BLE001 - a plugin's reader may raise anything
                raise CheckpointError(f"site {name!r}: plugin {site.plugin!r} failed to read its count from "
                                      f"the state dict: {type(exc).__name__}: {exc}") from exc
        elif site.tensors:
            count = _default_count(site, state_dict, paths, partial)
        else:
            count = None
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int):
                raise CheckpointError(f"site {name!r}: plugin {site.plugin!r} read a count of {count!r}, "
                                      f"not an integer")
            found[name] = count
    return found


def _default_count(site: TokenSite, state_dict: Mapping[str, torch.Tensor], paths: Mapping[int, str],
                   partial: bool = False) -> int | None:
    t = site.tensors[0]
    key = t.key(paths)
    if t.view is not None:
        raise CheckpointError(f"site {site.name!r}: its tensor {key} is declared with a view, so its count "
                              f"cannot be read from a state dict by default; plugin {site.plugin!r} should "
                              f"give the site a count_in_state_dict(state_dict, paths)")
    stored = state_dict.get(key)
    if stored is None:
        return 0 if t.template is not None and not partial else None
    mine = t.tensor()
    if not isinstance(stored, torch.Tensor) or stored.dim() != mine.dim():
        return None  # the key check reports the shape
    axis = t.axis % mine.dim()
    count = stored.shape[axis] - (mine.shape[axis] - site.count)
    return count if count >= 0 else None


# -- loading ---------------------------------------------------------------------------------------


def load(path: str | os.PathLike, model: nn.Module, *, strict: bool = True, mismatch: str = "model",
         init: str | Mapping[str, str] = strategies.RESTORE, shrink: str | Mapping[str, str] = "truncate",
         seed: int = 0) -> LoadResult:
    """Load a checkpoint file into `model`, fitting token counts first. Atomic; the file is only read.

    The model is resized to the counts the file's tensors have. A file written by `save` whose
    recipe leads from the model's counts (a freshly built model) to those counts has it kept as
    the model's recipe (checked step by step, never run: a hostile recipe allocates nothing), so
    the recipe stays complete for the next `save`. A file of another backbone is refused.
    """
    from .layouts import read_any  # layouts builds on this module's readers

    path = as_path(path)
    state_dict, metadata, layout = read_any(path)  # a released or Hugging Face layout: a plugin renamed its keys
    info = metadata.get(META_KEY) or {}
    recipe, options = None, dict(layout.options) if layout else {}
    if info:
        if not isinstance(info.get("format"), int) or info["format"] > FORMAT:
            raise CheckpointError(f"checkpoint {path}: {META_KEY!r} metadata format {info.get('format')!r} is not "
                                  f"one this version reads (up to {FORMAT}); upgrade token-surgery")
        backbone = backbone_of(model)
        if info.get("backbone") is not None and info["backbone"] != backbone:
            raise CheckpointError(f"checkpoint {path} is of backbone {info['backbone']!r}, the model is of "
                                  f"backbone {backbone!r}")
        if info.get("recipe"):
            try:
                recipe = Recipe.from_json(info["recipe"])
            except SurgeryError as exc:  # a RecipeError naming the step and field
                raise CheckpointError(f"checkpoint {path}: {exc}") from exc
        options = saved_options(info, f"checkpoint {path}")
    where = f"checkpoint {path}" + (f" ({layout.name}, recognised by plugin {layout.plugin!r})" if layout else "")
    return _load(model, state_dict, strict=strict, mismatch=mismatch, init=init, shrink=shrink, seed=seed,
                 recipe=recipe, where=where, options=options, partial=bool(layout and layout.partial))


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                    mismatch: str = "model", init: str | Mapping[str, str] = strategies.RESTORE,
                    shrink: str | Mapping[str, str] = "truncate", seed: int = 0) -> LoadResult:
    """`model.load_state_dict` for a state dict of any token counts. Atomic; `state_dict` is not changed.

    mismatch="model" (default): the model is resized to the checkpoint's counts, then loaded.
    mismatch="checkpoint": the model keeps its counts; the checkpoint's tensors are fitted to them
    with the engine's own strategies: resize to the checkpoint's counts, load, then resize back,
    new tokens made by `init` (default: the site's default growth) and extra ones dropped by
    `shrink`. `strict` as in torch: missing and unexpected keys are errors; wrong shapes always are.
    Stashed tokens (from an earlier truncate) are dropped: they belong to the weights replaced.
    """
    return _load(model, state_dict, strict=strict, mismatch=mismatch, init=init, shrink=shrink, seed=seed,
                 recipe=None, where="state dict")


def _load(model: nn.Module, state_dict: Mapping, *, strict: bool, mismatch: str, init, shrink, seed: int,
          recipe: Recipe | None, where: str, options: Mapping[str, Any] | None = None,
          partial: bool = False) -> LoadResult:
    if mismatch not in ("model", "checkpoint"):
        raise CheckpointError(f"mismatch must be 'model' (resize the model to the checkpoint's counts) or "
                              f"'checkpoint' (fit the checkpoint's tensors to the model's counts), got {mismatch!r}")
    if isinstance(init, str):
        strategies.check_growth(init)
    if isinstance(shrink, str):
        strategies.check_shrink(shrink)
    backbone = backbone_of(model)
    sd = tensors_only(state_dict, where)
    txn = Transaction(model, backbone, failure=lambda exc: CheckpointError(
        f"loading {where} failed: {type(exc).__name__}: {exc}; the model was left as it was"))
    with txn:  # one journal: a failure anywhere (a module's load hook, OOM, Ctrl-C) leaves the model as it was
        start, options_before = txn.start, model_options(model, backbone) if recipe is not None else {}
        # the file's options first where the model takes them as it is (they may allow its counts:
        # ImageBind's `first` lets a count go to 0); the others once the counts are the file's
        pending = txn.set_options(options or {}, where=where, only_valid=True)
        found = state_dict_counts(model, sd, backbone, partial, declared=txn.declared)
        try:
            check_request(txn.declared, found, txn.paths)
        except SurgeryError as exc:  # counts this model cannot take: often not a checkpoint of it at all
            problems = _check_keys(model, dict(sd), strict, partial)[0]
            raise CheckpointError(f"{where} does not fit the model: its token counts {found} cannot be applied "
                                  f"({exc})" + "".join(f"; {p}" for p in problems)) from exc
        history = (_history(txn.declared, recipe if recipe and recipe.backbone == backbone else None, start,
                            options_before, found, options or {}, where) if mismatch == "model" else None)
        # one resize, to the file's counts (and where a tensor cannot tell, to the recipe's)
        txn.resize({**(recipe.counts if history else {}), **found}, init, shrink, seed)
        problems, missing, unexpected = _check_keys(model, sd, strict, partial)
        if problems:
            raise CheckpointError(f"{where} does not fit the model (token counts {found}): " + "; ".join(problems)
                                  + "; the model was left as it was")
        _copy_weights(model, sd, txn.edit)
        set_state(model, txn.edit, stash={})  # the stashed rows belong to the weights just replaced
        txn.set_options(pending, where=where)
        if mismatch == "checkpoint":
            txn.resize(start, init, shrink, seed)
        if history:
            txn.steps = list(history)  # the file's own steps instead of this load's
    converted = {n: (c, start[n]) for n, c in found.items() if c != start[n]}
    return LoadResult(counts=txn.now, changes=txn.net(), checkpoint_counts=found,
                      converted=converted if mismatch == "checkpoint" else {}, replayed=bool(history),
                      missing_keys=tuple(missing), unexpected_keys=tuple(unexpected))


def _history(declared: Mapping[str, TokenSite], recipe: Recipe | None, start: Mapping[str, int],
             options_before: Mapping[str, Any], found: Mapping[str, int], options: Mapping[str, Any],
             where: str) -> tuple[dict, ...] | None:
    """The file's recipe steps, to keep as the model's recipe, when they lead from the model's
    counts `start` and options `options_before` to the counts `found` in the file's tensors and
    the `options` the file records; None when they do not (the load then records its own changes
    instead). Checked, never run: every step must take its site (or option) from where the step
    before left it, a count to one the site allows, so the kept history is one the model could have
    walked; the weights and options come from the file either way. (An option's intermediate
    values are checked by its plugin when the recipe is replayed.)"""
    if recipe is None or not recipe.steps:
        return None
    for i, step in enumerate(recipe.steps, 1):
        if not is_option_step(step) and step["site"] not in declared:
            raise CheckpointError(f"{where}: step {i} of its recipe names site {step['site']!r}, which the model "
                                  f"does not have; its sites: {', '.join(declared) or 'none'}")
        if is_option_step(step) and step["option"] not in options_before:
            raise CheckpointError(f"{where}: step {i} of its recipe names option {step['option']!r}, which the "
                                  f"model does not have; its options: {', '.join(options_before) or 'none'}")
    if any(start[n] != c for n, c in recipe.initial.items()):
        return None  # made from other counts than this model's: not its history
    if any(canonical(options_before[n]) != canonical(v) for n, v in recipe.initial_options.items()):
        return None  # made from other options
    counts_now, options_now = dict(start), dict(options_before)
    for i, step in enumerate(recipe.steps, 1):
        if is_option_step(step):
            name, now = step["option"], options_now
            consistent = canonical(step["from"]) == canonical(now[name])
        else:
            name, now = step["site"], counts_now
            consistent = step["from"] == now[name]
        if not consistent:
            raise CheckpointError(f"{where}: step {i} of its recipe takes {name} from {step['from']!r:.80}, but the "
                                  f"steps before leave it at {now[name]!r:.80}; the recipe is inconsistent")
        problem = None if is_option_step(step) else declared[name].violation(step["to"])
        if problem:
            raise CheckpointError(f"{where}: step {i} of its recipe asks {name}={step['to']}: {problem}; "
                                  f"allowed: {declared[name].allowed()}")
        now[name] = step["to"]
    if any(found.get(n, c) != c for n, c in counts_now.items()):
        return None  # the tensors say otherwise: they decide
    if any(n not in options or canonical(options[n]) != canonical(v) for n, v in recipe.options.items()):
        return None  # the file's options say otherwise
    return recipe.steps


def _check_keys(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool,
                partial: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(problems, missing, unexpected) of loading `sd` into `model` as it is now, checked before
    anything is copied; `partial`: a file that holds only some of the model's weights (missing
    keys are expected, unexpected ones still refused). Keys of tensors the model ties to a key `sd` has (written once by
    safetensors' save_model) are filled into `sd` from that key."""
    expected = model.state_dict(keep_vars=True)
    tied: dict[tuple, list[str]] = {}
    for key, t in expected.items():
        if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
            ident = (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            tied.setdefault(ident, []).append(key)
    for keys in tied.values():
        source = next((k for k in keys if k in sd), None)
        for key in keys if source is not None else ():
            sd.setdefault(key, sd[source])
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})" for k, v in sd.items()
                  if isinstance(v, torch.Tensor) and isinstance(expected.get(k), torch.Tensor)
                  and v.shape != expected[k].shape]
    problems = []
    if strict and missing and not partial:
        problems.append(f"missing keys ({len(missing)}): {listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {listing(unexpected)}")
        if all(k.startswith("module.") for k in unexpected):
            problems.append("the keys start with 'module.' (a DataParallel/DDP checkpoint): strip that prefix")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {listing(mismatched)}")
    return problems, missing, unexpected


def _copy_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], edit: Edit) -> None:
    """Copy `sd` into the model's tensors in place (as torch does), journaling a CPU copy of each
    tensor first, so a failure part-way (even Ctrl-C) can put every value back. The price: host
    memory for one copy of the weights, for the duration of the load."""
    targets = model.state_dict(keep_vars=True)
    saved: set[int] = set()
    for key in sd:
        t = targets.get(key)
        if isinstance(t, torch.Tensor) and id(t) not in saved:
            saved.add(id(t))
            backup = t.detach().to("cpu", copy=True)
            edit.on_undo(lambda t=t, backup=backup: _put_back(t, backup))
    model.load_state_dict(sd, strict=False)  # keys and shapes were checked: nothing is left to refuse


def _put_back(tensor: torch.Tensor, backup: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.copy_(backup)


__all__ = ["FORMAT", "LoadResult", "surgery_metadata", "save", "load", "load_state_dict", "state_dict_counts",
           # reading and writing files (`surgery.checkpoint_io`), here too for the callers that import them from here
           "META_KEY", "as_path", "check_output_path", "read_checkpoint"]
