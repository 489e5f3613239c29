"""The surgery engine: list a model's token sites, change their counts, undo, record, replay.

    surgery.sites(model)                          -> {name: TokenSite}
    surgery.resize(model, reg_tokens=4)           -> {name: (old, new)}  (atomic)
    with surgery.tokens(model, reg_tokens=0): ... (temporary; bit-exact restore on exit)
    surgery.recipe(model)                         -> Recipe (replayable on a fresh model)

Every change goes through one `Edit` journal (`surgery.edit`), so a failure anywhere (a bad
count, a strategy that cannot work, a plugin's error, out of memory) rolls the model back to
exactly what it was, and `tokens(...)` restores the original tensor objects themselves.

Sites are applied one at a time in the order the plugins declare them, and re-read from the
plugins after each one, so offsets that depend on another site (register rows after the class
row in a positional embedding) are always current.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import zlib
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from . import optim, rows, strategies, verify
from .edit import Edit
from .errors import (BackboneError, CountError, PluginConflictError, PluginError, RecipeError,
                     ResizeError, SiteError, StrategyError, SurgeryError, short_repr)
from .guard import Block, guard_of
from .plugins import PLUGIN_FAILURES, describe_error, get_host
from .compose import calls as part_calls, part_at
from .site import TokenSite, TokenTensor, module_paths

STATE_ATTR = "_surgery_state"


# -- per-model state -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelState:
    """What the engine keeps on a model (never in its state dict). Replaced, never mutated,
    so the journal can put the previous one back."""

    recipe: tuple[dict, ...] = ()
    stash: Mapping[str, tuple[rows.Piece, ...]] = dataclasses.field(default_factory=dict)  # per tensor: rows a truncate dropped
    parked: Mapping[str, nn.Parameter] = dataclasses.field(default_factory=dict)  # per tensor: a parameter absent at count 0
    model_name: str | None = None  # registered name, when built by `surgery.build`
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def model_state(model: nn.Module) -> ModelState:
    return model.__dict__.get(STATE_ATTR) or ModelState()


def _set_state(model: nn.Module, edit: Edit, **changes: Any) -> None:
    edit.set_attr(model, STATE_ATTR, dataclasses.replace(model_state(model), **changes))


# -- listing sites -------------------------------------------------------------------------------


def backbone_of(model: nn.Module, backbone: str | None = None) -> str:
    """The backbone name of a built model (from the plugins' detectors). A `backbone` given (to
    choose among several that claim the model) must be a registered one whose detect claims it."""
    host = get_host()
    if backbone is None:
        return host.identify(model)
    if not isinstance(backbone, str) or backbone not in host.backbones:
        raise BackboneError(f"backbone={short_repr(backbone)} is not a registered backbone; known: "
                            f"{', '.join(sorted(host.backbones)) or 'none'}")
    claimed, failure = host._detect(host.backbones[backbone], model)
    if not claimed:
        raise BackboneError(f"backbone={backbone!r} does not recognise a model of type {type(model).__name__}"
                            f"{f' ({failure})' if failure else ''}; leave backbone= out to identify the model")
    return backbone


def sites(model: nn.Module, backbone: str | None = None) -> dict[str, TokenSite]:
    """All token sites of `model`, in application order, from every plugin that declares some."""
    host = get_host()
    backbone = backbone_of(model, backbone)
    found: dict[str, TokenSite] = {}
    for plugin, function, part in part_calls(model, backbone, "surgery_token_sites"):  # sub-models too (compose)
        try:
            declared = function(model=part.model, backbone=part.backbone)
        except SurgeryError:
            raise
        except PLUGIN_FAILURES as exc:
            raise PluginError(f"plugin {plugin!r}: surgery_token_sites raised {describe_error(exc)} "
                              f"for a {part.backbone!r} model") from exc
        for site in verify.declared_sites(plugin, part.backbone, declared):  # a PluginError for garbage
            if site.name in found:
                raise PluginConflictError(f"site {site.name!r} of backbone {backbone!r} is declared by both "
                                          f"plugin {found[site.name].plugin!r} and plugin {plugin!r}")
            site.plugin, site.part = plugin, part.path
            found[site.name] = site
    return found


def counts(model: nn.Module, backbone: str | None = None) -> dict[str, int]:
    """{site name: current count}."""
    return {name: site.count for name, site in sites(model, backbone).items()}


# -- applying one site ---------------------------------------------------------------------------


class SiteChange:
    """One site going from `old` to `new` tokens: what a `surgery_apply_count` hook receives.

    `sites` are all the model's sites as declared for this change (another site may carry one of
    this site's tensors on another axis: its stashed rows span that axis), `optimizers` those whose
    state follows the rows (`surgery.optim`).
    """

    def __init__(self, model: nn.Module, backbone: str, site: TokenSite, new: int, edit: Edit,
                 init: str, shrink: str, seed: int, sites: Mapping[str, TokenSite] | None = None,
                 optimizers: tuple[torch.optim.Optimizer, ...] = ()) -> None:
        self.model, self.backbone, self.site, self.edit = model, backbone, site, edit
        self.old, self.new = site.count, new
        self.init, self.shrink = init, shrink
        self.generator = torch.Generator().manual_seed(seed + zlib.crc32(site.name.encode()))
        self.sites = dict(sites) if sites is not None else {site.name: site}
        self.optimizers = tuple(optimizers)
        self._paths = module_paths(model)
        self.tensor_key = "?"  # the tensor being resized, for error messages

    def key(self, t: TokenTensor) -> str:
        prefix = self._paths.get(id(t.module), "?")
        return f"{prefix}.{t.name}" if prefix else t.name

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
            _set_state(self.model, self.edit, stash=updated)
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
                _set_state(self.model, self.edit, parked=parked)
            self.edit.set_tensor(t.module, t.name, None)
        elif param is not None and t.current() is None:
            self.edit.set_tensor(t.module, t.name, stored, parameter=param)
            del parked[key]
            _set_state(self.model, self.edit, parked=parked)
            optim.join(self.optimizers, param, self._siblings(t), self.edit)
        else:
            absent = t.current() is None
            self.edit.set_tensor(t.module, t.name, stored, t.requires_grad)
            if absent and isinstance(t.current(), nn.Parameter):
                optim.join(self.optimizers, t.current(), self._siblings(t), self.edit)

    def _siblings(self, t: TokenTensor) -> list[nn.Parameter]:
        return [u.current() for u in self.site.tensors if u is not t and isinstance(u.current(), nn.Parameter)]


# -- resize / tokens -----------------------------------------------------------------------------


def _pick(choice: str | Mapping[str, str], name: str, check) -> str:
    value = choice.get(name, None) if isinstance(choice, Mapping) else choice
    return check(value) if value is not None else None


def validate(model: nn.Module, requested: Mapping[str, Any], backbone: str | None = None, *,
             init: str | Mapping[str, str] | None = None,
             shrink: str | Mapping[str, str] | None = None) -> dict[str, TokenSite]:
    """Check names, counts, strategies (`init`/`shrink`, names or {site: name} mappings) and the
    requested sites' declarations before anything changes."""
    current = sites(model, backbone)
    allowed = ", ".join(current) or "none"
    for name, count in requested.items():
        if name not in current:
            raise SiteError(f"model has no token site {name!r}; its sites: {allowed}")
        site = current[name]
        problem = site.violation(count)
        if problem:
            raise CountError(f"site {name!r}: {problem}; allowed: {site.allowed()}")
    for option, choice, check in (("init", init, strategies.check_growth), ("shrink", shrink, strategies.check_shrink)):
        for name, strategy in (choice.items() if isinstance(choice, Mapping) else ()):
            if name not in current:
                raise SiteError(f"{option}= names {name!r}, which is not a token site of the model; "
                                f"its sites: {allowed}")
            check(strategy)
    paths = module_paths(model)
    for name in requested:
        check_declaration(current[name], current, paths)
    return current


def check_declaration(site: TokenSite, declared: Mapping[str, TokenSite], paths: Mapping[int, str]) -> None:
    """Refuse, with a SiteError naming the site and the tensor, a declaration the engine would apply
    wrongly: an attribute the module does not have, an axis outside the tensor, a block outside it,
    or a tensor of the site's own whose extent along the axis is not its sites' blocks (for one
    site, `start + count`: declared on the wrong axis, the wrong dimension would grow)."""
    for t in site.tensors:
        prefix = paths.get(id(t.module), "?")
        key = f"{prefix}.{t.name}" if prefix else t.name

        def refuse(problem: str) -> None:
            raise SiteError(f"site {site.name!r} (plugin {site.plugin!r}) declares tensor {key}, {problem}; "
                            f"the model was left as it was")

        if not hasattr(t.module, t.name):
            refuse(f"which its {type(t.module).__name__} does not have")
        value = t.current()
        if value is None and t.template is None:
            refuse("which is None, and the site gives no template for it")
        if not isinstance(t.tensor(), torch.Tensor):
            refuse(f"which is a {type(t.tensor()).__name__}, not a tensor")
        try:
            viewed = t.viewed()
            t.stored_shape(tuple(viewed.shape))
        except (RuntimeError, ValueError) as exc:
            refuse(f"whose view {t.view} does not fit its shape {list(t.tensor().shape)}: {exc}")
        if isinstance(t.axis, bool) or not isinstance(t.axis, int) or not -viewed.dim() <= t.axis < viewed.dim():
            refuse(f"with axis {t.axis!r}, outside its {viewed.dim()} dimensions {list(viewed.shape)}")
        extent = viewed.shape[t.axis]
        if not t.coupled:  # the sites' blocks must tile the axis: [0, a), [a, b), ... up to the extent
            blocks = sorted((u.start, s.count) for s in declared.values() for u in s.tensors
                            if u.module is t.module and u.name == t.name and not u.coupled
                            and u.view == t.view and u.axis % viewed.dim() == t.axis % viewed.dim())
            ends = [0] + [start + count for start, count in blocks]
            if [start for start, _ in blocks] != ends[:-1] or ends[-1] != extent:
                others = f" (with the other sites' blocks there: {ends[-1]})" if len(blocks) > 1 else ""
                refuse(f"along axis {t.axis} its extent is {extent}, not start + count = {t.start} + {site.count}"
                       f"{others}; a tensor of the site's own holds its tokens only (mark rows of a table that "
                       f"holds others too coupled=True)")
        elif t.start < 0 or t.start + site.count > extent:
            refuse(f"with the block [{t.start}, {t.start + site.count}) along axis {t.axis}, "
                   f"outside its extent {extent}")


def _apply(model: nn.Module, backbone: str, requested: Mapping[str, int], edit: Edit,
           init: str | Mapping[str, str], shrink: str | Mapping[str, str], seed: int,
           optimizers: tuple[torch.optim.Optimizer, ...] = ()) -> dict[str, tuple[int, int]]:
    """Apply the requested counts into `edit` (no events, no rollback: the callers do those), under
    the model's lock (other threads' surgery on it waits)."""
    with _guard(model).lock:
        return _apply_locked(model, backbone, requested, edit, init, shrink, seed, optimizers)


def _apply_locked(model: nn.Module, backbone: str, requested: Mapping[str, int], edit: Edit,
                  init: str | Mapping[str, str], shrink: str | Mapping[str, str], seed: int,
                  optimizers: tuple[torch.optim.Optimizer, ...]) -> dict[str, tuple[int, int]]:
    host = get_host()
    current = validate(model, requested, backbone, init=init, shrink=shrink)
    # Shrinks first, in declaration order; then growths in reverse declaration order (stashed rows
    # come back in any order, `surgery.rows`; this one undoes a shrink of two sites mirror-wise).
    asked = [name for name in current if name in requested]
    order = ([n for n in asked if requested[n] < current[n].count]
             + [n for n in reversed(asked) if requested[n] >= current[n].count])
    changes: dict[str, tuple[int, int]] = {}
    steps: list[dict] = []
    for name in order:
        declared = sites(model, backbone)  # re-read: an earlier site may have moved this one's rows
        site = declared[name]
        check_declaration(site, declared, module_paths(model))
        new = requested[name]
        problem = site.violation(new)
        if problem:
            raise CountError(f"site {name!r}: {problem}; allowed: {site.allowed()}")
        if new == site.count:
            continue
        grow = _pick(init, name, strategies.check_growth) or strategies.RESTORE
        cut = _pick(shrink, name, strategies.check_shrink) or "truncate"
        change = SiteChange(model, backbone, site, new, edit, grow, cut, seed, sites=declared, optimizers=optimizers)
        applied_by = None  # the plugin whose surgery_apply_count is running or applied the change
        try:
            expected = verify.Expectation(change)
            owner = part_at(model, backbone, site.part)  # the (sub-)model whose plugins declared the site
            for plugin, function in reversed(host.implementations("surgery_apply_count")):  # pluggy's order
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
            raise type(exc)(f"site {name!r} ({site.count} -> {new}), {by}tensor {change.tensor_key}: {exc}") from exc
        except PLUGIN_FAILURES as exc:  # a plugin's error, out of memory, ...
            by = f"plugin {applied_by!r}" if applied_by else f"declared by plugin {site.plugin!r}"
            raise ResizeError(f"resizing site {name!r} from {site.count} to {new} failed at tensor "
                              f"{change.tensor_key} ({by}): {describe_error(exc)}; "
                              f"the model was left as it was") from exc
        expected.check(applied_by, lambda: sites(model, backbone).get(name))  # the caller rolls back if not reached
        changes[name] = (site.count, new)
        steps.append({"site": name, "from": site.count, "to": new, "init": grow, "shrink": cut, "seed": seed})
    if steps:
        _set_state(model, edit, recipe=model_state(model).recipe + tuple(steps))
    return changes


def _notify(model: nn.Module, backbone: str, event: str, changes: dict) -> None:
    """Fire a before/after-resize event; a plugin's error becomes a ResizeError naming the plugin."""
    if not changes:
        return
    for plugin, function, part in part_calls(model, backbone, event):  # every part sees every change
        try:
            function(model=part.model, backbone=part.backbone, changes=dict(changes))
        except SurgeryError:
            raise
        except Exception as exc:
            raise ResizeError(f"plugin {plugin!r} failed in {event} for {dict(changes)}: "
                              f"{type(exc).__name__}: {exc}; the model was left as it was") from exc


# -- one model, one surgery at a time (`surgery.guard`) -------------------------------------------

_guard = guard_of


def adopt(model: nn.Module, edit: Edit) -> None:
    """A change committed while a `tokens(...)` block is open on the model joins the block's journal:
    leaving the block undoes it too, which keeps the model consistent (the block puts back rows
    and counters this change may have moved)."""
    guard = _guard(model)
    if guard.open:
        guard.open[-1].edit.absorb(edit)


def _undo_block(model: nn.Module) -> Callable[[Block], None]:
    def undo(block: Block) -> None:
        """Put the model back as it was when the block opened (changes made inside it included),
        with the resize events around it."""
        now = counts(model, block.backbone)
        changes = {n: (c, block.before[n]) for n, c in now.items() if n in block.before and block.before[n] != c}
        try:
            _notify(model, block.backbone, "surgery_before_resize", changes)
        finally:
            block.edit.rollback()  # the original tensor objects, counters and recipe come back
            _notify(model, block.backbone, "surgery_after_resize", changes)
    return undo


@contextlib.contextmanager
def _transaction(model: nn.Module, backbone: str, opens_block: bool = False) -> Iterator[Edit]:
    """Yield a journal under the model's lock; on any exception roll it back (the model is as
    before) and re-raise. Committed inside an open `tokens(...)` block, it joins the block's
    journal (`adopt`), unless it opens a nested block (that block undoes it)."""
    guard = _guard(model)
    with guard.lock:
        edit = Edit()
        try:
            yield edit
        except Exception as exc:
            edit.rollback()
            if isinstance(exc, SurgeryError):
                raise
            raise ResizeError(f"changing the counts of a {backbone!r} model failed: {type(exc).__name__}: {exc}; "
                              f"the model was left as it was") from exc
        except BaseException:
            edit.rollback()
            raise
        if not opens_block:
            adopt(model, edit)


def resize(model: nn.Module, *, init: str | Mapping[str, str] = strategies.RESTORE,
           shrink: str | Mapping[str, str] = "truncate", seed: int = 0, backbone: str | None = None,
           optimizer: Any = None, **requested: int) -> dict[str, tuple[int, int]]:
    """Set token counts, e.g. `resize(vit, reg_tokens=4, init="mean")`. Returns {site: (old, new)}.

    `init` (growth): restore (default: tokens a truncate dropped come back first, then the site's
    default), zeros, mean, normal, copy, interpolate. `shrink`: truncate (default), pool. Either
    may be a {site: strategy} mapping (of sites the model has: any other name is a SiteError).
    `seed` makes `normal` reproducible (recipes replay it). `optimizer` (one torch optimizer or a list): their per-parameter state follows the rows
    (`surgery.optim`). Atomic: on any error the model (and the optimizers) are exactly as they were.
    Serialised per model: a resize from another thread waits for this one (and for an open
    `tokens(...)` block); one inside a `tokens(...)` block is undone when the block is left.
    """
    backbone = backbone_of(model, backbone)
    optimizers = optim.optimizers_of(optimizer)
    if not isinstance(init, Mapping):
        strategies.check_growth(init)
    if not isinstance(shrink, Mapping):
        strategies.check_shrink(shrink)
    with _guard(model).lock:
        planned = {n: (c, requested[n]) for n, c in counts(model, backbone).items() if n in requested}
        validate(model, requested, backbone, init=init, shrink=shrink)
        _notify(model, backbone, "surgery_before_resize", {n: oc for n, oc in planned.items() if oc[0] != oc[1]})
        with _transaction(model, backbone) as edit:
            changes = _apply(model, backbone, requested, edit, init, shrink, seed, optimizers)
            _notify(model, backbone, "surgery_after_resize", changes)
    return changes


@contextlib.contextmanager
def tokens(model: nn.Module, *, init: str | Mapping[str, str] = strategies.RESTORE,
           shrink: str | Mapping[str, str] = "truncate", seed: int = 0, backbone: str | None = None,
           optimizer: Any = None, **requested: int) -> Iterator[nn.Module]:
    """Temporarily run `model` with other counts; on exit (also on an exception) it is bit-exactly
    what it was: the original tensor objects, counters and recipe are put back (and the original
    state tensors of `optimizer`, which follows inside the block as with `resize`).

    Only what surgery changed is put back: other attributes, parameters and submodules changed
    inside the block stay. The block holds the model's lock: surgery from other threads waits
    until it is left. Blocks nest; one left before a block opened inside it undoes both and
    raises a NestingError.
    """
    backbone = backbone_of(model, backbone)
    optimizers = optim.optimizers_of(optimizer)
    guard = _guard(model)
    with guard.lock:  # held until the block is left
        before = counts(model, backbone)
        with _transaction(model, backbone, opens_block=True) as edit:
            _notify(model, backbone, "surgery_before_resize",
                    {n: (before[n], c) for n, c in requested.items() if n in before and before[n] != c})
            changes = _apply(model, backbone, requested, edit, init, shrink, seed, optimizers)
            _notify(model, backbone, "surgery_after_resize", changes)
        block = Block(edit, backbone, before, _undo_block(model))
        guard.open.append(block)
        try:
            yield model
        finally:
            guard.leave(block)


# -- recipes -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What was changed on a model, step by step; replays bit-exactly on a fresh model."""

    backbone: str
    steps: tuple[dict, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Final count of every site the recipe touches."""
        return {step["site"]: step["to"] for step in self.steps}

    @property
    def initial(self) -> dict[str, int]:
        """Count each touched site must have before replaying."""
        first: dict[str, int] = {}
        for step in self.steps:
            first.setdefault(step["site"], step["from"])
        return first

    def to_json(self) -> str:
        return json.dumps({"backbone": self.backbone, "steps": list(self.steps)})

    @classmethod
    def from_json(cls, text: str | Mapping) -> "Recipe":
        """The recipe `to_json` wrote (its text, or that text decoded). Recipes come from files, so
        every field is checked: a malformed one is a RecipeError naming the step and the field."""
        try:
            data = json.loads(text) if isinstance(text, (str, bytes)) else text
        except (ValueError, RecursionError) as exc:
            raise RecipeError(f"recipe is not valid JSON: {type(exc).__name__}: {exc}") from None
        if not (isinstance(data, Mapping) and isinstance(data.get("backbone"), str)
                and isinstance(data.get("steps"), (list, tuple))):
            raise RecipeError(f'a recipe is an object {{"backbone": str, "steps": [...]}}, got '
                              f"{type(data).__name__} {short_repr(data)}")
        fields = {"site": str, "from": int, "to": int, "init": str, "shrink": str, "seed": int}
        for i, step in enumerate(data["steps"], 1):
            if not isinstance(step, Mapping) or set(step) != set(fields):
                got = sorted(map(str, step)) if isinstance(step, Mapping) else type(step).__name__
                raise RecipeError(f"recipe step {i}: expected the fields {', '.join(fields)}, got {short_repr(got)}")
            for key, kind in fields.items():
                value = step[key]
                if isinstance(value, bool) or not isinstance(value, kind) or (key in ("from", "to") and value < 0):
                    want = "a count (an integer >= 0)" if key in ("from", "to") else f"a {kind.__name__}"
                    raise RecipeError(f"recipe step {i}: {key} must be {want}, got {short_repr(value)}")
            checks = ((step["init"], strategies.GROWTH_NAMES), (step["shrink"], strategies.SHRINK_NAMES))
            for value, allowed in checks:
                if value not in allowed:
                    raise RecipeError(f"recipe step {i}: unknown strategy {short_repr(value)}; "
                                      f"allowed: {', '.join(allowed)}")
            if not -(1 << 63) <= step["seed"] < (1 << 64):
                raise RecipeError(f"recipe step {i}: seed {step['seed']} is outside what a torch generator takes")
        return cls(backbone=data["backbone"], steps=tuple(dict(s) for s in data["steps"]))

    def replay(self, model: nn.Module) -> None:
        """Apply the steps to `model`, which must have the recipe's starting counts. Atomic."""
        backbone = backbone_of(model)
        if backbone != self.backbone:
            raise SurgeryError(f"recipe is for backbone {self.backbone!r}, the model is {backbone!r}")
        now = counts(model, backbone)
        wrong = {n: now.get(n) for n, c in self.initial.items() if now.get(n) != c}
        if wrong:
            raise CountError(f"recipe starts from counts {self.initial}, the model has {wrong}; "
                             f"replay it on a freshly built model")
        planned = {n: (self.initial[n], c) for n, c in self.counts.items() if self.initial[n] != c}
        _notify(model, backbone, "surgery_before_resize", planned)
        with _transaction(model, backbone) as edit:
            for step in self.steps:
                _apply(model, backbone, {step["site"]: step["to"]}, edit,
                       step["init"], step["shrink"], step["seed"])
            _notify(model, backbone, "surgery_after_resize", planned)


def recipe(model: nn.Module) -> Recipe:
    """The recipe of every change made to `model` through the engine."""
    return Recipe(backbone=backbone_of(model), steps=model_state(model).recipe)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a model a plugin registered by name (random weights), e.g. `build("vit_tiny_test")`."""
    spec = get_host().model_spec(name)
    model = spec.factory(**kwargs)
    model.__dict__[STATE_ATTR] = dataclasses.replace(model_state(model), model_name=name, model_kwargs=dict(kwargs))
    return model
