"""Checking what plugins hand the engine: the sites they declare, and the changes they apply.

The engine trusts a site's declaration to resize a model, and a plugin's `surgery_apply_count`
to have applied a change when it says so. Both are plugin code, so both are checked here before
anything depends on them:

* `declared_sites` takes what a plugin's `surgery_token_sites` returned and refuses anything but
  a list of well-formed `TokenSite`s (fields of the right types), with a `PluginError` naming
  the plugin (instead of an AttributeError deep in the engine).
* `Expectation` is taken before a site's change is applied: what every declared tensor's shape
  and every counter's value must be afterwards. `check` compares, and a change that did not
  reach them (a plugin returning True without applying it, say) becomes a `ResizeError` naming
  the plugin; raised inside the engine's transaction, it rolls the model back.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import PluginError, ResizeError, SurgeryError
from .site import Counter, TokenSite, TokenTensor


def declared_sites(plugin: str, backbone: str, declared: Any) -> list[TokenSite]:
    """`declared` (what `plugin`'s surgery_token_sites returned for a `backbone` model) as a list of
    sites; a PluginError naming the plugin and what is wrong when it is anything else."""
    if declared is None:
        return []
    if not isinstance(declared, (list, tuple)):
        _refuse(plugin, backbone, f"returned {_kind(declared)}; return a list of surgery.TokenSite, or None")
    for i, site in enumerate(declared):
        problem = site_problem(site)
        if problem:
            _refuse(plugin, backbone, f"returned an item {i} that {problem}")
    return list(declared)


def site_problem(site: Any) -> str | None:
    """Why `site` is not a well-formed TokenSite, or None."""
    if not isinstance(site, TokenSite):
        return f"is {_kind(site)}, not a surgery.TokenSite"
    if not isinstance(site.name, str) or not site.name:
        return f"is a TokenSite named {site.name!r}; a site's name is a non-empty string"
    if isinstance(site.count, bool) or not isinstance(site.count, int) or site.count < 0:
        return f"is site {site.name!r} with count {site.count!r}; a count is an integer, at least 0"
    for field, kind, items in (("tensors", TokenTensor, site.tensors), ("counters", Counter, site.counters)):
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, kind) for x in items):
            return f"is site {site.name!r} whose {field} are not a list of surgery.site.{kind.__name__}"
    for t in site.tensors:
        problem = _tensor_problem(t)
        if problem:
            return f"is site {site.name!r} whose tensor {t.name!r} {problem}"
    return None


def _tensor_problem(t: TokenTensor) -> str | None:
    """Why `t`'s fields are not of the types a declaration has, or None. (Whether the declaration fits
    the model, the tensor's extent and the block, is checked before the site is applied:
    `engine.check_declaration`.)"""
    if not isinstance(t.module, nn.Module) or not isinstance(t.name, str):
        return f"names {t.name!r} on {_kind(t.module)}; declare an attribute of an nn.Module"
    for field in ("axis", "start"):
        value = getattr(t, field)
        if isinstance(value, bool) or not isinstance(value, int):
            return f"has {field} {value!r}; it is an integer"
    if t.view is not None and not (isinstance(t.view, tuple) and all(isinstance(n, int) for n in t.view)):
        return f"has view {t.view!r}; a view is a tuple of integers"
    if t.template is not None and not isinstance(t.template, torch.Tensor):
        return f"has template {_kind(t.template)}; a template is a tensor"
    return None


class Expectation:
    """What a site's declared tensors and counters must be once `change` (a `SiteChange`) is applied.

    Taken before the change: each tensor's extent along its axis (through its view) moves by
    `new - old` and nothing else of its shape changes; a tensor with a template may instead be
    absent at a count of zero; every counter reads its declared value for the new count; and the
    site, declared again afterwards, counts `new`.
    """

    def __init__(self, change: Any) -> None:
        self.site, self.old, self.new = change.site.name, change.old, change.new
        self.tensors: list[tuple[TokenTensor, str, tuple[int, ...]]] = []
        for t in change.site.tensors:
            viewed = t.viewed()
            shape = list(viewed.shape)
            shape[t.axis % viewed.dim()] += change.new - change.old
            self.tensors.append((t, change.key(t), t.stored_shape(tuple(shape))))
        self.counters = [(c, c.value_for(change.new)) for c in change.site.counters]

    def problems(self, redeclare: Callable[[], TokenSite | None]) -> list[str]:
        """What differs from the expectation. `redeclare()` gives the site as its plugin declares it
        now; it is asked last, once the tensors are right (before, the declaration may not fit them)."""
        found = []
        for t, key, shape in self.tensors:
            value = t.current()
            if value is None:
                if not (self.new == 0 and t.template is not None):
                    found.append(f"tensor {key} is absent, expected shape {list(shape)}")
            elif not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                now = list(value.shape) if isinstance(value, torch.Tensor) else _kind(value)
                found.append(f"tensor {key} is {now}, expected shape {list(shape)}")
        for counter, value in self.counters:
            try:
                now = counter.current()
            except Exception as exc:  # noqa: BLE001 - an attribute the change removed, say
                now = f"<unreadable: {type(exc).__name__}>"
            if not _same(now, value):
                found.append(f"counter {type(counter.target).__name__}.{counter.attr} is {now!r}, expected {value!r}")
        if found:
            return found
        try:
            redeclared = redeclare()
        except SurgeryError as exc:
            return [f"the model's sites can no longer be declared: {exc}"]
        if redeclared is None:
            found.append("the site is no longer declared")
        elif redeclared.count != self.new:
            found.append(f"the site now counts {redeclared.count}")
        return found

    def check(self, applied_by: str | None, redeclare: Callable[[], TokenSite | None]) -> None:
        """Raise a ResizeError naming who applied the change (a plugin, or None: the engine) when
        the model did not reach the new count."""
        found = self.problems(redeclare)
        if not found:
            return
        who = f"plugin {applied_by!r}" if applied_by else "the engine"
        raise ResizeError(f"{who} applied site {self.site!r} ({self.old} -> {self.new}), but {'; '.join(found)}; "
                          f"the model was left as it was")


def _refuse(plugin: str, backbone: str, problem: str) -> None:
    raise PluginError(f"plugin {plugin!r}: surgery_token_sites for a {backbone!r} model {problem}")


def _kind(value: Any) -> str:
    """A short description of an unexpected value: its type, and the value when it is short."""
    text = repr(value)
    return f"a {type(value).__name__}" + (f" ({text})" if len(text) <= 40 else "")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain truth value (tensors)
        return a is b
