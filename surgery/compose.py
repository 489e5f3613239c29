"""Composed models: a model of one backbone that contains a model of another as a sub-model.

A plugin declares its sub-models (`surgery_submodels`: ImageBind-LLM's ImageBind encoder at
`image_bind`) instead of declaring their sites again; the engine then calls the per-model hooks once
per part, with that part and its backbone. Sites share one namespace and tensors keep their paths from
the top model, so checkpoints, recipes and `tokens(...)` work as on any model. Each declaration is
checked before use (a `PluginError` naming the plugin). For plugin authors: docs/plugins.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torch import nn

from .errors import PluginError, SurgeryError
from .plugins import PLUGIN_FAILURES, describe_error, get_host

HOOK = "surgery_submodels"
MAX_DEPTH = 8  # sub-models of sub-models: a declaration loop stops here with an error


@dataclass(frozen=True)
class Part:
    """The model itself (`path` ""), or a sub-model of another backbone at `path` from the top."""

    path: str
    model: nn.Module
    backbone: str

    def key(self, name: str) -> str:
        """A name of this part as seen from the top model (a path prefix added)."""
        return f"{self.path}.{name}" if self.path else name


def _declared(plugin: str, function: Callable, part: Part) -> list[tuple[str, str]]:
    try:
        declared = function(model=part.model, backbone=part.backbone)
    except SurgeryError:
        raise
    except PLUGIN_FAILURES as exc:
        raise PluginError(f"plugin {plugin!r}: {HOOK} raised {describe_error(exc)} for a {part.backbone!r} "
                          f"model") from exc
    if declared is None:
        return []
    if not isinstance(declared, (list, tuple)) or not all(
            isinstance(d, (list, tuple)) and len(d) == 2 and all(isinstance(s, str) for s in d) for d in declared):
        raise PluginError(f"plugin {plugin!r}: {HOOK} returned {declared!r:.120}; it must return a list of "
                          f"(attribute path, backbone name) pairs, or None")
    return [tuple(d) for d in declared]


def parts(model: nn.Module, backbone: str) -> list[Part]:
    """The model itself, then every sub-model the plugins declare (depth first), each checked."""
    host = get_host()
    found = [Part("", model, backbone)]
    seen = {id(model): "the model itself"}
    implementations = host.implementations(HOOK)

    def visit(part: Part, depth: int) -> None:
        for plugin, function in implementations:
            for path, sub_backbone in _declared(plugin, function, part):
                where = f"plugin {plugin!r}: {HOOK} of a {part.backbone!r} model names {path!r}"
                try:
                    sub = part.model.get_submodule(path) if path else None
                except AttributeError:
                    sub = None
                if sub is None:
                    raise PluginError(f"{where}, which is not a submodule of it (a dotted attribute path)")
                if sub_backbone not in host.backbones:
                    raise PluginError(f"{where} as backbone {sub_backbone!r}, which no plugin registered; "
                                      f"known: {', '.join(sorted(host.backbones))}")
                if not _claims(host, sub_backbone, sub):
                    raise PluginError(f"{where} as a {sub_backbone!r} model, but that backbone's detector does not "
                                      f"recognise the {type(sub).__name__} there")
                full = part.key(path)
                if id(sub) in seen:
                    raise PluginError(f"{where}: {full!r} is already a part, as {seen[id(sub)]}")
                if depth >= MAX_DEPTH:
                    raise PluginError(f"{where}: sub-models nested deeper than {MAX_DEPTH} levels")
                seen[id(sub)] = repr(full)
                child = Part(full, sub, sub_backbone)
                found.append(child)
                visit(child, depth + 1)

    visit(found[0], 1)
    return found


def _claims(host: Any, backbone: str, module: nn.Module) -> bool:
    try:
        return bool(host.backbones[backbone].detect(module))
    except PLUGIN_FAILURES:
        return False


def calls(model: nn.Module, backbone: str, hook: str,
          known: list[Part] | None = None) -> Iterator[tuple[str, Callable, Part]]:
    """(plugin, function, part) for every implementation of a per-model `hook` and every part of
    `model` (the model's own calls first, in registration order), to be called as
    `function(model=part.model, backbone=part.backbone, ...)`. `known`: the parts, when already read."""
    implementations = get_host().implementations(hook)
    for part in known if known is not None else parts(model, backbone):
        for plugin, function in implementations:
            yield plugin, function, part


def part_at(model: nn.Module, backbone: str, path: str) -> Part:
    """The part at `path` ("" the model itself)."""
    for part in parts(model, backbone):
        if part.path == path:
            return part
    raise PluginError(f"the {backbone!r} model has no sub-model at {path!r} any more (its plugin stopped declaring it)")


__all__ = ["HOOK", "Part", "calls", "part_at", "parts"]
