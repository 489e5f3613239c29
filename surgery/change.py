"""One site going from `old` to `new` tokens: `SiteChange`, what a `surgery_apply_count` hook receives,
and `apply_change`, which lets the plugins (or the engine, from the declaration alone) make it.

Every mutation goes through the change's `Edit` journal, so the transaction around it can undo it;
new rows are computed before anything is replaced (`surgery.rows`), and the optimizers' state of
a resized parameter follows the same rows (`surgery.optim`). After the change, `surgery.verify`
checks that every declared tensor and counter reached the new count, whoever applied it.
"""

from __future__ import annotations

import zlib
from typing import Callable, Mapping

import torch
from torch import nn

from . import optim, rows, strategies, verify
from .compose import Part
from .edit import Edit
from .errors import ResizeError, SurgeryError
from .plugins import PLUGIN_FAILURES, describe_error, get_host
from .site import TokenSite, TokenTensor, module_paths
from .state import model_state, set_state


class SiteChange:
    """One site going from `old` to `new` tokens: what a `surgery_apply_count` hook receives.

    `sites` are all the model's sites as declared for this change (another site may carry one of
    this site's tensors on another axis: its stashed rows span that axis), `optimizers` those whose
    state follows the rows (`surgery.optim`).
    """

    def __init__(self, model: nn.Module, backbone: str, site: TokenSite, new: int, edit: Edit,
                 init: str, shrink: str, seed: int, sites: Mapping[str, TokenSite] | None = None,
                 optimizers: tuple[torch.optim.Optimizer, ...] = (), paths: Mapping[int, str] | None = None) -> None:
        self.model, self.backbone, self.site, self.edit = model, backbone, site, edit
        self.old, self.new = site.count, new
        self.init, self.shrink, self.seed = init, shrink, seed
        self.generator = torch.Generator().manual_seed(seed + zlib.crc32(site.name.encode()))
        self.sites = dict(sites) if sites is not None else {site.name: site}
        self.optimizers = tuple(optimizers)
        self._paths = paths if paths is not None else module_paths(model)
        self.tensor_key = "?"  # the tensor being resized, for error messages

    def key(self, t: TokenTensor) -> str:
        """`t`'s state-dict key in the model."""
        return t.key(self._paths)

    def apply_default(self) -> None:
        """Resize every declared tensor, then set every counter."""
        for t in self.site.tensors:
            self.resize_tensor(t)
        self.tensor_key = "?"
        for counter in self.site.counters:
            self.edit.set_attr(counter.target, counter.attr, counter.value_for(self.new))

    @torch.no_grad()  # the new values are data, not a graph: nothing here is differentiated
    def resize_tensor(self, t: TokenTensor) -> None:
        """Replace `t`'s block of `old` tokens with `new` ones (init/shrink strategy, stash); the
        optimizers' state of its parameter follows the same rows."""
        self.tensor_key = key = self.key(t)
        axes = self._axes(t)
        restore = self.new > self.old and self.init == strategies.RESTORE
        growth = strategies.GROWTH[self.site.default_init if restore else self.init] if self.new > self.old else None
        shrink = None if self.shrink == "truncate" else strategies.SHRINK[self.shrink]
        state = model_state(self.model)
        viewed, stash = rows.resize_block(
            t.viewed(), axes, self.new, state.stash.get(key, ()), restore=restore,
            shrink=None if shrink is None else (lambda old, out: out.copy_(shrink(old, self.new))),
            grow=lambda out, have: growth(out[:have], self.new, self.generator, out=out))
        stored = viewed.reshape(t.stored_shape(tuple(viewed.shape)))  # a view: it is contiguous
        param = self._parameter(t, key)
        if param is not None:
            optim.follow(self.optimizers, param, t, axes, self.new, key, self.edit, truncate=shrink is None,
                         restore=restore, rewrites_old=self.new > self.old and self.init == "interpolate")
        updated = {**{k: v for k, v in state.stash.items() if k != key}, **({key: stash} if stash else {})}
        if not rows.same_stash(updated, dict(state.stash)):
            set_state(self.model, self.edit, stash=updated)
        self._place(t, key, stored, param)

    def _axes(self, t: TokenTensor) -> tuple[rows.Axis, ...]:
        """This site's axis of `t`, then every other site's axis of the same tensor (one site per dim)."""
        ndim = t.viewed().dim()
        own = rows.Axis(self.site.name, t.axis % ndim, t.start, self.old, t.anchor == "end")
        by_dim: dict[int, list[rows.Axis]] = {}
        for other in self.sites.values():
            for u in other.tensors if other.name != self.site.name else ():
                if u.module is t.module and u.name == t.name and u.view == t.view and u.axis % ndim != own.dim:
                    by_dim.setdefault(u.axis % ndim, []).append(
                        rows.Axis(other.name, u.axis % ndim, u.start, other.count, u.anchor == "end"))
        return (own, *(found[0] for found in by_dim.values() if len(found) == 1))

    def _parameter(self, t: TokenTensor, key: str) -> nn.Parameter | None:
        """The parameter holding `t`'s rows: the module's, or the one parked while the count was 0."""
        current = t.current()
        if isinstance(current, nn.Parameter):
            return current
        parked = model_state(self.model).parked.get(key)
        if current is None and parked is not None and parked.shape == t.tensor().shape:
            return parked
        return None

    def _place(self, t: TokenTensor, key: str, stored: torch.Tensor, param: nn.Parameter | None) -> None:
        """Put the new rows in the module. At a count of 0 a tensor with a template becomes None;
        its parameter is parked (emptied) and comes back as the same object, frozen or not, still
        in the optimizers that held it."""
        parked = dict(model_state(self.model).parked)
        if self.new == 0 and t.template is not None:
            if param is not None and t.current() is param:
                self.edit.set_tensor(t.module, t.name, stored)
                parked[key] = param
                set_state(self.model, self.edit, parked=parked)
            self.edit.set_tensor(t.module, t.name, None)
        elif param is not None and t.current() is None:
            self.edit.set_tensor(t.module, t.name, stored, parameter=param)
            del parked[key]
            set_state(self.model, self.edit, parked=parked)
            optim.join(self.optimizers, param, self._siblings(t), self.edit)
        else:
            absent = t.current() is None
            self.edit.set_tensor(t.module, t.name, stored, t.requires_grad)
            if absent and isinstance(t.current(), nn.Parameter):
                optim.join(self.optimizers, t.current(), self._siblings(t), self.edit)

    def _siblings(self, t: TokenTensor) -> list[nn.Parameter]:
        return [u.current() for u in self.site.tensors if u is not t and isinstance(u.current(), nn.Parameter)]


def apply_change(change: SiteChange, owner: Part, redeclare: Callable[[], TokenSite | None]) -> None:
    """Make `change` on the model: the first plugin whose `surgery_apply_count` (called with `owner`,
    the part whose plugins declared the site) returns True applied it, else the engine applies it
    from the declaration. Then every declared tensor and counter must have reached the new count,
    and `redeclare()` (the site as declared afterwards) must count `new`; the caller's transaction
    rolls back when any of this raises. A plugin's failure becomes a SurgeryError naming the site,
    the tensor and the plugin."""
    name, old, new, site = change.site.name, change.old, change.new, change.site
    applied_by = None  # the plugin whose surgery_apply_count is running or applied the change
    try:
        expected = verify.Expectation(change)
        for plugin, function in reversed(get_host().implementations("surgery_apply_count")):  # pluggy's order
            applied_by = plugin
            handled = function(model=owner.model, backbone=owner.backbone, change=change)
            if handled is not None and not isinstance(handled, bool):
                raise ResizeError(f"surgery_apply_count returned {handled!r}; return True or None")
            if handled is not None:
                break
        else:
            handled = None
        if not handled:
            applied_by = None
            change.apply_default()
    except SurgeryError as exc:
        by = f"plugin {applied_by!r}, " if applied_by else ""
        raise type(exc)(f"site {name!r} ({old} -> {new}), {by}tensor {change.tensor_key}: {exc}") from exc
    except PLUGIN_FAILURES as exc:  # a plugin's error, out of memory, ...
        by = f"plugin {applied_by!r}" if applied_by else f"declared by plugin {site.plugin!r}"
        raise ResizeError(f"resizing site {name!r} from {old} to {new} failed at tensor "
                          f"{change.tensor_key} ({by}): {describe_error(exc)}; "
                          f"the model was left as it was") from exc
    expected.check(applied_by, redeclare)


__all__ = ["SiteChange", "apply_change"]
