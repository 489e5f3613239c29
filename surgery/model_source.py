"""Where the CLI's models come from: a model name, or the metadata of a checkpoint file.

    model = build_model("vit_tiny_test", {})                        # plugin errors become typed ones
    model, name, origin = model_for_checkpoint(entry, state_dict)   # entry: the file's "surgery" metadata
    model, name, origin = model_for_partial_layout(layout)          # an adapter file: the rest on meta
    model, path = pretrained_model("timm/vit_small_patch16_224")    # released weights already on this machine

A model name is one a plugin registered, or one a plugin resolves (`surgery_resolve_model`: any
timm ViT by its timm name), which the user may give anywhere a name goes (`--model`, `inspect`).

A file written by `surgery.save` records the registered model it was built from ("model") and
the keyword arguments of that build ("model_kwargs"), so `surgery inspect FILE` and
`surgery resize FILE` can rebuild it without being told. That metadata is data from whoever
wrote the file, so it chooses no code and opens nothing:

* "model" must name a model a loaded plugin registered or resolves; the factory is the plugin's
  code and is never imported from a name the file gives. A resolved name is allowed in a file:
  the plugin only looks it up in what it knows (timm's registry of architectures, never a hub
  repository or a path), so the name picks among code the plugin chose, as a registered one does;
* each keyword argument must be one the model's plugin declared safe when registering it
  (`safe_kwargs`: the token counts) and plain JSON data, nested at most `MAX_DEPTH` levels;
  anything else (`checkpoint_path=`, a device, a config) is refused with the list of what is
  allowed, so no file the user did not name is ever opened;
* the model is first built on the meta device, which allocates nothing, to count its elements
  (parameters and buffers). It is built for real only when it holds at most the elements of the
  file's own tensors plus `SIZE_MARGIN`: what the file justifies, since loading fills the model
  from those tensors. A larger one needs `allow_large=True` (the CLI's `--allow-large`).

A model named by the user (`--model NAME` different from the file's) is built with no keyword
arguments from the file and without the size limit: the user chose it. Released weights are only
ever loaded when the user asks (`--pretrained`), never because a file names a model.

A layout a plugin recognised may build its model itself (`Layout.build`: a Hugging Face folder's
class, chosen by the plugin from config.json's model_type). config.json's numbers then size the
model, so `build_on_meta` counts it while it is built on the meta device and stops the build as
soon as it holds more than the file's elements plus `SIZE_MARGIN`, or more modules (or tensors)
than `MODULES_PER_TENSOR` per file tensor plus `MODULE_MARGIN`: a config claiming a million layers
costs what the first few cost. `allowing_large()` lifts both limits for everything opened inside
it (the CLI's `--allow-large`), the plugin's own sizing of the folder included.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .checkpoint import load
from .engine import build
from .errors import CheckpointError, ModelConfigError, SurgeryError, short_repr
from .plugins import PLUGIN_FAILURES, ModelSpec, describe_error, get_host

# Elements a model built from metadata may hold beyond the file's own tensors: token rows of
# another count, non-persistent buffers (RoPE tables), a registered model's small extras.
# 2**24 elements is 64 MiB in float32.
SIZE_MARGIN = 1 << 24
# Modules a model built from a file's metadata may have: the supported models have about one per
# tensor (containers, activations and dropouts have none); a margin for heads and extras.
MODULES_PER_TENSOR = 4
MODULE_MARGIN = 1024
# While a model is being built it may hold more than it will: a weight tied after it is built (an
# lm_head tied to the embedding, written once in the file) exists twice for a moment. A build is
# stopped once past this many times the limit; the built model is held to the limit itself.
BUILDING_SLACK = 2
MAX_DEPTH = 4  # nesting of a metadata keyword argument's value (ImageBind's counts: one mapping)


def build_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """`surgery.build(name, **kwargs)`, with an error in the plugin's factory (an unknown keyword,
    a value it cannot take, its own bug) raised as a `ModelConfigError` naming the model, the
    plugin and the arguments, instead of whatever the factory raised."""
    spec = get_host().model_spec(name)  # a BackboneError listing the known models
    try:
        return build(name, **kwargs)
    except SurgeryError:
        raise
    except PLUGIN_FAILURES as exc:
        raise ModelConfigError(_factory_failed(spec, kwargs, exc)) from exc


def pretrained_model(name: str) -> tuple[nn.Module, Path]:
    """Build model `name` and load its released weights from where its plugin finds them on this
    machine (`released_weights`, e.g. the Hugging Face cache): (model, the file loaded).

    Nothing is downloaded: weights that are not there are a `CheckpointError` saying what was
    looked for and where. The file is read by the core's safe readers (`surgery.load`).
    """
    spec = get_host().model_spec(name)
    if spec.released_weights is None:
        raise CheckpointError(f"model {name!r} (plugin {spec.plugin!r}) has no released weights its plugin can "
                              f"find; pass a checkpoint file instead")
    try:
        found = spec.released_weights()
    except SurgeryError:
        raise
    except PLUGIN_FAILURES as exc:
        raise CheckpointError(f"the released weights of model {name!r} (plugin {spec.plugin!r}) cannot be "
                              f"located: {describe_error(exc).splitlines()[0]}") from exc
    if not isinstance(found, (str, os.PathLike)) or not os.path.isfile(found):
        raise CheckpointError(f"plugin {spec.plugin!r} gave {short_repr(found)} as the released weights of model "
                              f"{name!r}, which is not a file")
    model = build_model(name, {})
    load(found, model)
    return model, Path(found)


def model_for_checkpoint(entry: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                         model_name: str | None = None, allow_large: bool = False,
                         where: str = "the checkpoint") -> tuple[nn.Module, str, str]:
    """Build the model a checkpoint belongs to: (model, its name, where the name came from).

    `entry` is the file's "surgery" metadata ({} for a file without it) and `state_dict` its
    tensors (only their sizes are read). `model_name` (the CLI's `--model`) wins over the
    metadata's name; the metadata's keyword arguments apply only to the model it names.
    """
    recorded = entry.get("model")
    if recorded is not None and not isinstance(recorded, str):
        raise CheckpointError(f"{where}: its metadata names the model {recorded!r}, which is not a model name")
    name, origin = (model_name, "--model") if model_name else (recorded, "checkpoint metadata")
    if not name:
        known = ", ".join(sorted(get_host().models)) or "none"
        what = (f"was saved from a {entry['backbone']!r} model not built by surgery.build"
                if entry.get("backbone") else "has no token-surgery metadata")
        raise CheckpointError(f"{where} {what}, so it does not say which model to build; "
                              f"pass --model NAME (known models: {known})")
    spec = get_host().model_spec(name)
    kwargs = checked_kwargs(spec, entry.get("model_kwargs"), where) if name == recorded else {}
    if (origin == "checkpoint metadata" or kwargs) and not (allow_large or large_allowed()):
        justified = sum(t.numel() for t in state_dict.values())
        size = size_on_meta(spec, kwargs)
        if size > justified + SIZE_MARGIN:
            built = f"{name!r}" + (f" with {_arguments(kwargs)}" if kwargs else "")
            raise CheckpointError(
                f"{where} asks for model {built}, which holds {size:,} elements, more than the file's "
                f"tensors ({justified:,}) plus a margin of {SIZE_MARGIN:,}; it was not built. If you trust "
                f"the file, pass --allow-large (allow_large=True)")
    return build_model(name, kwargs), name, origin


def layout_model(layout: Any, model_name: str | None, where: str) -> str:
    """The model to build for a file of a recognised layout: `model_name` (--model), else the
    registered model the plugin found fits; a `CheckpointError` when neither is there."""
    if model_name or layout.model:
        return model_name or layout.model
    known = ", ".join(sorted(get_host().models)) or "none"
    raise CheckpointError(f"{where} is a {layout.name} (recognised by plugin {layout.plugin!r}) of an "
                          f"architecture no registered model has; pass --model NAME (known models: {known})")


def model_for_partial_layout(layout: Any, *, model_name: str | None = None,
                             where: str = "the checkpoint") -> tuple[nn.Module, str, str]:
    """The model a partial checkpoint layout's tensors belong to, holding them: (model, name, origin).

    A partial file (`surgery.layouts.Layout.partial`: a LLaMA-Adapter adapter without its 7B
    LLaMA) must not make the rest of the model real: the model (`layout.model` with the plugin's
    `model_kwargs`, or `model_name`) is built on the meta device, which allocates nothing, and the
    file's tensors become its own (`load_state_dict(assign=True)`). Every other tensor stays on the
    meta device: shapes without values, enough to list and resize the sites whose tensors the file
    holds and to write them back (`layout.save`), and nothing that runs the model.
    """
    from .checkpoint_io import listing

    name = layout_model(layout, model_name, where)
    spec = get_host().model_spec(name)
    kwargs = {k: v for k, v in layout.model_kwargs.items() if k in spec.safe_kwargs} \
        if spec.plugin == layout.plugin else {}
    with torch.device("meta"):
        model = build_model(name, kwargs)
    expected = model.state_dict()
    unexpected = [k for k in layout.state_dict if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
                  for k, v in layout.state_dict.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{label} ({len(keys)}): {listing(keys)}"
                for label, keys in (("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"{where} ({layout.name}) does not fit model {name!r}: " + "; ".join(problems))
    model.load_state_dict(layout.state_dict, strict=False, assign=True)
    origin = "--model" if model_name else "the file's layout"
    return model, name, origin


def model_for_built_layout(layout: Any, *, allow_large: bool = False, where: str = "the checkpoint") -> nn.Module:
    """The model a layout's plugin builds itself (`Layout.build`: a Hugging Face folder's class, from
    its config.json), random weights, for the layout's tensors to be loaded into.

    The plugin's build is first run on the meta device, sized against the layout's tensors
    (`build_on_meta`: stopped once larger than they justify, unless `allow_large`), then for real.
    """
    what = f"the model plugin {layout.plugin!r} builds for this {layout.name}"

    def failed(exc: BaseException) -> SurgeryError:
        return ModelConfigError(f"{where}: plugin {layout.plugin!r} cannot build its model: "
                                f"{describe_error(exc).splitlines()[0]}")

    with allowing_large(allow_large or large_allowed()):
        build_on_meta(layout.build, what, justified_by=layout.state_dict, where=where, failed=failed)
    try:
        model = layout.build()
    except SurgeryError:
        raise
    except PLUGIN_FAILURES as exc:
        raise failed(exc) from exc
    if not isinstance(model, nn.Module):
        raise ModelConfigError(f"{what} is a {type(model).__name__}, not a torch module")
    return model


def checked_kwargs(spec: ModelSpec, kwargs: Any, where: str) -> dict[str, Any]:
    """The metadata's keyword arguments for `spec`, refused unless each is declared safe and plain data."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{where}: its model_kwargs metadata is a {type(kwargs).__name__}, not an object")
    allowed = ", ".join(sorted(spec.safe_kwargs)) or "none"
    refused = sorted(str(k) for k in kwargs if k not in spec.safe_kwargs)
    if refused:
        raise CheckpointError(f"{where}: its metadata asks to build model {spec.name!r} with keyword argument(s) "
                              f"{', '.join(refused)}, which plugin {spec.plugin!r} does not declare safe to take "
                              f"from a file; allowed: {allowed}. Nothing was built; pass --model NAME to build a "
                              f"model of your choosing instead")
    for key, value in kwargs.items():
        problem = _not_plain(value, MAX_DEPTH)
        if problem:
            raise CheckpointError(f"{where}: its model_kwargs {key}={short_repr(value)} is {problem}; "
                                  f"allowed: numbers, strings, booleans, lists and objects, {MAX_DEPTH} levels deep")
    return dict(kwargs)


def size_on_meta(spec: ModelSpec, kwargs: Mapping[str, Any]) -> int:
    """Elements (parameters and buffers, each tensor once) of the model `spec` builds with
    `kwargs`, counted on the meta device: nothing is allocated. A factory that ignores the
    default device (builds on the CPU regardless) is refused, as its size cannot be counted
    without building it."""
    def failed(exc: BaseException) -> SurgeryError:
        return ModelConfigError(_factory_failed(spec, kwargs, exc) + " (while counting its size on the meta "
                                "device; --allow-large builds it without counting)")

    model = build_on_meta(lambda: spec.factory(**kwargs), f"the factory of model {spec.name!r} (plugin "
                          f"{spec.plugin!r})", failed=failed)
    return sum(t.numel() for t in _tensors(model))


# -- building on the meta device, within what a file justifies ---------------------------------------

_LARGE_ALLOWED: ContextVar[bool] = ContextVar("surgery_large_allowed", default=False)


@contextlib.contextmanager
def allowing_large(allow: bool = True) -> Iterator[None]:
    """Within this block (this thread or task), models built from a file's metadata are not limited
    to what its tensors justify: what `--allow-large` (allow_large=True) means for a file the user
    trusts, for every size check made while opening it, a plugin's included."""
    token = _LARGE_ALLOWED.set(allow)
    try:
        yield
    finally:
        _LARGE_ALLOWED.reset(token)


def large_allowed() -> bool:
    """Whether the current block allows models larger than their file justifies (`allowing_large`)."""
    return _LARGE_ALLOWED.get()


@dataclass(frozen=True)
class SizeLimit:
    """What a file's tensors justify building: `elements` (parameters and buffers), and `modules`
    (as many modules, and as many tensors)."""

    tensors: int  # how many tensors the file holds
    justified: int  # their elements

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> SizeLimit:
        return cls(len(state_dict), sum(t.numel() for t in state_dict.values()))

    @property
    def elements(self) -> int:
        return self.justified + SIZE_MARGIN

    @property
    def modules(self) -> int:
        return MODULES_PER_TENSOR * self.tensors + MODULE_MARGIN


def build_on_meta(factory: Callable[[], Any], what: str, *, justified_by: Mapping[str, torch.Tensor] | None = None,
                  where: str = "the checkpoint",
                  failed: Callable[[BaseException], SurgeryError] | None = None) -> nn.Module:
    """`factory()` built on the meta device, which allocates no tensor: shapes without values.

    With `justified_by` (a file's tensors) and outside `allowing_large()`, the build is watched
    as it goes (torch's module registration hooks) and stopped as soon as the model holds more
    elements or modules than the file justifies (`SizeLimit`): a `CheckpointError` naming `what`
    and `where`, with nothing allocated and the rest never built. A factory that builds anywhere
    but the meta device is refused (its size cannot be counted without allocating it). An error
    of the factory's own is raised as it is, or as `failed(exc)` when given.
    """
    limit = SizeLimit.of(justified_by) if justified_by is not None and not large_allowed() else None
    tally = _Tally(limit) if limit is not None else None
    try:
        with torch.device("meta"), (tally if tally is not None else contextlib.nullcontext()):
            model = factory()
    except PLUGIN_FAILURES as exc:
        if tally is not None and tally.exceeded:
            raise CheckpointError(_too_large(what, where, tally.exceeded, limit)) from None
        if failed is None:
            raise
        raise failed(exc) from exc
    if tally is not None and tally.exceeded:  # the factory caught the refusal and went on
        raise CheckpointError(_too_large(what, where, tally.exceeded, limit))
    if not isinstance(model, nn.Module):
        raise ModelConfigError(f"{what} returned a {type(model).__name__}, not a torch module")
    tensors = _tensors(model)
    if any(t.device.type != "meta" for t in tensors):
        raise CheckpointError(f"{what} does not build on the default device, so its size cannot be counted "
                              f"without allocating it; pass --allow-large (allow_large=True) to build it anyway")
    if limit is not None:  # the built model itself, exactly (the tally counted registrations)
        if sum(t.numel() for t in tensors) > limit.elements:
            raise CheckpointError(_too_large(what, where, "elements", limit))
        if sum(1 for _ in model.modules()) > limit.modules:
            raise CheckpointError(_too_large(what, where, "modules", limit))
        if len(tensors) > limit.modules:
            raise CheckpointError(_too_large(what, where, "tensors", limit))
    return model


class _Tally:
    """Counts the tensors and modules registered on this thread while a model is built, and stops the
    build (raises from the registration) once their elements, their number or the modules' pass the
    limit. A tensor registered twice (a tied weight) counts once; one replaced and freed stops
    counting (weak references). A module counts once attached to its parent (a layer built inside a
    layer list counts as it is built, by its own parts)."""

    class Exceeded(Exception):
        pass

    def __init__(self, limit: SizeLimit) -> None:
        self.limit, self.thread = limit, threading.get_ident()
        self.tensors: dict[int, tuple[weakref.ref, int]] = {}
        self.elements = self.modules = 0
        self.exceeded = ""  # "elements" or "modules" once a limit was passed

    def __enter__(self) -> _Tally:
        from torch.nn.modules import module as hooks

        self.handles = [hooks.register_module_parameter_registration_hook(self._tensor),
                        hooks.register_module_buffer_registration_hook(self._tensor),
                        hooks.register_module_module_registration_hook(self._module)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _tensor(self, module: nn.Module, name: str, tensor: Any) -> None:
        if threading.get_ident() != self.thread or not isinstance(tensor, torch.Tensor):
            return
        seen = self.tensors.get(id(tensor))
        if seen is None or seen[0]() is not tensor:
            self.tensors[id(tensor)] = (weakref.ref(tensor), tensor.numel())
            self.elements += tensor.numel()
        elements, tensors = self.limit.elements * BUILDING_SLACK, self.limit.modules * BUILDING_SLACK
        if self.elements > elements or len(self.tensors) > tensors:
            # recount the live ones: replaced tensors were freed
            self.tensors = {k: v for k, v in self.tensors.items() if v[0]() is not None}
            self.elements = sum(n for _, n in self.tensors.values())
            self._check(self.elements > elements, "elements")
            self._check(len(self.tensors) > tensors, "tensors")
        self._check(bool(self.exceeded), self.exceeded)

    def _module(self, parent: nn.Module, name: str, module: Any) -> None:
        if threading.get_ident() == self.thread and isinstance(module, nn.Module):
            self.modules += 1
            over = self.modules > self.limit.modules * BUILDING_SLACK
            self._check(over or bool(self.exceeded), self.exceeded or "modules")

    def _check(self, over: bool, what: str) -> None:
        if over:
            self.exceeded = what
            raise self.Exceeded(what)


def _too_large(what: str, where: str, exceeded: str, limit: SizeLimit) -> str:
    if exceeded in ("modules", "tensors"):
        size = (f"more than {limit.modules:,} {exceeded}: {MODULES_PER_TENSOR} per tensor of the file "
                f"({limit.tensors:,}) plus {MODULE_MARGIN:,}")
    else:
        size = (f"more than {limit.elements:,} elements: the file's tensors ({limit.justified:,}) plus a margin "
                f"of {SIZE_MARGIN:,}")
    return (f"{where} asks for {what}, which holds {size}; it was not built (counted on the meta device, nothing "
            f"allocated). If you trust the file, pass --allow-large (allow_large=True)")


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and buffers, each tensor once."""
    return list({id(t): t for t in (*model.parameters(), *model.buffers())}.values())


def _factory_failed(spec: ModelSpec, kwargs: Mapping[str, Any], exc: BaseException) -> str:
    arguments = f" with {_arguments(kwargs)}" if kwargs else ""
    return (f"model {spec.name!r} (plugin {spec.plugin!r}) cannot be built{arguments}: "
            f"{describe_error(exc).splitlines()[0]}")


def _not_plain(value: Any, depth: int) -> str | None:
    """Why `value` is not plain JSON data at most `depth` levels deep, or None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if not isinstance(value, (list, Mapping)):
        return f"a {type(value).__name__}"
    if depth <= 1:
        return "nested too deeply"
    if isinstance(value, Mapping) and not all(isinstance(k, str) for k in value):
        return "an object with keys that are not strings"
    items = value.values() if isinstance(value, Mapping) else value
    return next((p for p in (_not_plain(v, depth - 1) for v in items) if p), None)


def _arguments(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={short_repr(v)}" for k, v in kwargs.items())
