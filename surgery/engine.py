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
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from . import strategies, verify
from .edit import Edit
from .errors import CountError, PluginConflictError, PluginError, ResizeError, SiteError, StrategyError, SurgeryError
from .plugins import PLUGIN_FAILURES, describe_error, get_host
from .site import TokenSite, TokenTensor, module_paths

STATE_ATTR = "_surgery_state"


# -- per-model state -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelState:
    """What the engine keeps on a model (never in its state dict). Replaced, never mutated,
    so the journal can put the previous one back."""

    recipe: tuple[dict, ...] = ()
    stash: Mapping[str, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)  # rows a truncate dropped
    model_name: str | None = None  # registered name, when built by `surgery.build`
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def model_state(model: nn.Module) -> ModelState:
    return model.__dict__.get(STATE_ATTR) or ModelState()


def _set_state(model: nn.Module, edit: Edit, **changes: Any) -> None:
    edit.set_attr(model, STATE_ATTR, dataclasses.replace(model_state(model), **changes))


# -- listing sites -------------------------------------------------------------------------------


def backbone_of(model: nn.Module) -> str:
    """The backbone name of a built model (from the plugins' detectors)."""
    return get_host().identify(model)


def sites(model: nn.Module, backbone: str | None = None) -> dict[str, TokenSite]:
    """All token sites of `model`, in application order, from every plugin that declares some."""
    host = get_host()
    backbone = backbone or host.identify(model)
    found: dict[str, TokenSite] = {}
    for plugin, function in host.implementations("surgery_token_sites"):
        try:
            declared = function(model=model, backbone=backbone)
        except SurgeryError:
            raise
        except PLUGIN_FAILURES as exc:
            raise PluginError(f"plugin {plugin!r}: surgery_token_sites raised {describe_error(exc)} "
                              f"for a {backbone!r} model") from exc
        for site in verify.declared_sites(plugin, backbone, declared):  # a PluginError for garbage
            if site.name in found:
                raise PluginConflictError(f"site {site.name!r} of backbone {backbone!r} is declared by both "
                                          f"plugin {found[site.name].plugin!r} and plugin {plugin!r}")
            site.plugin = plugin
            found[site.name] = site
    return found


def counts(model: nn.Module, backbone: str | None = None) -> dict[str, int]:
    """{site name: current count}."""
    return {name: site.count for name, site in sites(model, backbone).items()}


# -- applying one site ---------------------------------------------------------------------------


class SiteChange:
    """One site going from `old` to `new` tokens: what a `surgery_apply_count` hook receives."""

    def __init__(self, model: nn.Module, backbone: str, site: TokenSite, new: int, edit: Edit,
                 init: str, shrink: str, seed: int) -> None:
        self.model, self.backbone, self.site, self.edit = model, backbone, site, edit
        self.old, self.new = site.count, new
        self.init, self.shrink = init, shrink
        self.generator = torch.Generator().manual_seed(seed + zlib.crc32(site.name.encode()))
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
        """Replace `t`'s block of `old` tokens with `new` ones (init/shrink strategy, stash)."""
        self.tensor_key = self.key(t)
        viewed = t.viewed()
        axis = t.axis % viewed.dim()
        block = viewed.narrow(axis, t.start, self.old).movedim(axis, 0)  # (old, *rest)
        # The new tensor is allocated once, in its stored layout: the rows around the block are
        # copied over and the strategy writes the block's new rows straight into it, so a large
        # growth makes no intermediate tensors of the site's size. It never shares memory with the
        # old tensor, which is kept for an exact undo and must not change when the new one is
        # trained in place.
        shape = list(viewed.shape)
        shape[axis] += self.new - self.old
        new_viewed = viewed.new_empty(shape)
        n_after = viewed.shape[axis] - t.start - self.old
        new_viewed.narrow(axis, 0, t.start).copy_(viewed.narrow(axis, 0, t.start))
        new_viewed.narrow(axis, t.start + self.new, n_after).copy_(viewed.narrow(axis, t.start + self.old, n_after))
        rows = new_viewed.narrow(axis, t.start, self.new).movedim(axis, 0)  # (new, *rest), a view
        if t.anchor != "end":
            self._new_block(block, rows)
        elif self.new < self.old and self.shrink == "truncate":  # keep the last rows, stash the first
            rows.copy_(block[self.old - self.new:])
            dropped = block.new_empty((self.old - self.new, *block.shape[1:]))
            _copy_reversed(dropped, block[: self.old - self.new])  # back to front, as they return
            self._stash(dropped)
        else:
            # Strategies work from the front: they get the block back to front, and the rows they
            # write are turned around again in place, a few at a time (no flipped full-size copies).
            if self.new >= self.old:
                _copy_reversed(rows[: self.old], block)
                self._new_block(rows[: self.old], rows)
            else:
                front_first = block.new_empty(block.shape)
                _copy_reversed(front_first, block)
                self._new_block(front_first, rows)
            _reverse_rows_(rows)
        stored = new_viewed.reshape(t.stored_shape(tuple(new_viewed.shape)))  # a view: it is contiguous
        absent = self.new == 0 and t.template is not None
        self.edit.set_tensor(t.module, t.name, None if absent else stored, t.requires_grad)

    def _stashed(self, like: torch.Tensor) -> tuple[str, dict, tuple[torch.Tensor, ...] | None]:
        """The stash key, a copy of the model's stash, and this tensor's stashed rows (as chunks in
        the order they come back), or None when there are none for rows shaped like `like`."""
        key = f"{self.site.name}:{self.tensor_key}"
        stash = dict(model_state(self.model).stash)
        stashed = stash.get(key)
        if stashed is not None and (stashed[0].shape[1:] != like.shape[1:] or stashed[0].dtype != like.dtype):
            stashed = None  # the table changed shape since (another site moved): nothing to restore
        return key, stash, stashed

    def _stash(self, dropped: torch.Tensor) -> None:
        """Keep rows a truncate dropped (front first: the order they come back in) for `restore`.
        Newest in front, kept as chunks: concatenating would copy every earlier stash again (a 128 MB
        stash, to drop 4 MB more)."""
        key, stash, stashed = self._stashed(dropped)
        stash[key] = (dropped,) if stashed is None else (dropped, *stashed)
        _set_state(self.model, self.edit, stash=stash)

    def _new_block(self, block: torch.Tensor, out: torch.Tensor) -> None:
        """Write the site's `new` rows for `block` ((old, *rest)) into `out` ((new, *rest))."""
        if self.new < self.old:
            out.copy_(strategies.SHRINK[self.shrink](block, self.new))
            if self.shrink == "truncate":
                self._stash(block[self.new:].clone())
            return
        if self.init != strategies.RESTORE:
            strategies.GROWTH[self.init](block, self.new, self.generator, out=out)
            return
        stash_key, stash, stashed = self._stashed(block)
        strategies.keep(block, out)
        have = self.old
        if stashed is not None:
            rest = list(stashed)
            while have < self.new and rest:
                chunk = rest.pop(0)
                taken = chunk[: self.new - have]
                out[have:have + taken.shape[0]].copy_(taken)
                if chunk.shape[0] > taken.shape[0]:
                    rest.insert(0, chunk[taken.shape[0]:])
                have += taken.shape[0]
            if rest:
                stash[stash_key] = tuple(rest)
            else:
                del stash[stash_key]
            _set_state(self.model, self.edit, stash=stash)
        if have < self.new:  # rows the stash did not hold: the site's default init, from all rows so far
            strategies.GROWTH[self.site.default_init](out[:have], self.new, self.generator, out=out)


def _chunk_rows(x: torch.Tensor) -> int:
    """Rows per temporary when turning rows around: as many as strategies.chunk_values allows."""
    return max(1, strategies.chunk_values(x) // max(1, x[:1].numel()))


def _copy_reversed(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[i] = src[n - 1 - i] along dim 0, through temporaries of a few rows."""
    n, step = src.shape[0], _chunk_rows(src)
    for i in range(0, n, step):
        k = min(step, n - i)
        dst[i:i + k].copy_(src[n - i - k:n - i].flip(0))


def _reverse_rows_(x: torch.Tensor) -> None:
    """Reverse x along dim 0 in place, swapping a few rows from each end at a time."""
    n, step = x.shape[0], _chunk_rows(x)
    for i in range(0, n // 2, step):
        k = min(step, n // 2 - i)
        front, back = x[i:i + k], x[n - i - k:n - i]
        saved = front.clone()
        front.copy_(back.flip(0))
        back.copy_(saved.flip(0))


# -- resize / tokens -----------------------------------------------------------------------------


def _pick(choice: str | Mapping[str, str], name: str, check) -> str:
    value = choice.get(name, None) if isinstance(choice, Mapping) else choice
    return check(value) if value is not None else None


def validate(model: nn.Module, requested: Mapping[str, Any], backbone: str | None = None) -> dict[str, TokenSite]:
    """Check names and counts against the sites' constraints before anything changes."""
    current = sites(model, backbone)
    for name, count in requested.items():
        if name not in current:
            allowed = ", ".join(current) or "none"
            raise SiteError(f"model has no token site {name!r}; its sites: {allowed}")
        site = current[name]
        problem = site.violation(count)
        if problem:
            raise CountError(f"site {name!r}: {problem}; allowed: {site.allowed()}")
    return current


def _apply(model: nn.Module, backbone: str, requested: Mapping[str, int], edit: Edit,
           init: str | Mapping[str, str], shrink: str | Mapping[str, str], seed: int) -> dict[str, tuple[int, int]]:
    """Apply the requested counts into `edit` (no events, no rollback: the callers do those)."""
    host = get_host()
    current = validate(model, requested, backbone)
    # Shrinks first, in declaration order; then growths in reverse declaration order. Two sites
    # sharing a tensor (the Q and L axes of one adapter table) then grow back in the opposite
    # order to the one they shrank in, so each finds its stashed rows in the shape it left them.
    asked = [name for name in current if name in requested]
    order = ([n for n in asked if requested[n] < current[n].count]
             + [n for n in reversed(asked) if requested[n] >= current[n].count])
    changes: dict[str, tuple[int, int]] = {}
    steps: list[dict] = []
    for name in order:
        site = sites(model, backbone)[name]  # re-read: an earlier site may have moved this one's rows
        new = requested[name]
        problem = site.violation(new)
        if problem:
            raise CountError(f"site {name!r}: {problem}; allowed: {site.allowed()}")
        if new == site.count:
            continue
        grow = _pick(init, name, strategies.check_growth) or strategies.RESTORE
        cut = _pick(shrink, name, strategies.check_shrink) or "truncate"
        change = SiteChange(model, backbone, site, new, edit, grow, cut, seed)
        applied_by = None  # the plugin whose surgery_apply_count is running or applied the change
        try:
            expected = verify.Expectation(change)
            for plugin, function in reversed(host.implementations("surgery_apply_count")):  # pluggy's order
                applied_by = plugin
                handled = function(model=model, backbone=backbone, change=change)
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
    for plugin, function in get_host().implementations(event):
        try:
            function(model=model, backbone=backbone, changes=dict(changes))
        except SurgeryError:
            raise
        except Exception as exc:
            raise ResizeError(f"plugin {plugin!r} failed in {event} for {dict(changes)}: "
                              f"{type(exc).__name__}: {exc}; the model was left as it was") from exc


@contextlib.contextmanager
def _transaction(model: nn.Module, backbone: str) -> Iterator[Edit]:
    """Yield a journal; on any exception roll it back (the model is as before) and re-raise."""
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


def resize(model: nn.Module, *, init: str | Mapping[str, str] = strategies.RESTORE,
           shrink: str | Mapping[str, str] = "truncate", seed: int = 0, backbone: str | None = None,
           **requested: int) -> dict[str, tuple[int, int]]:
    """Set token counts, e.g. `resize(vit, reg_tokens=4, init="mean")`. Returns {site: (old, new)}.

    `init` (growth): restore (default: tokens a truncate dropped come back first, then the site's
    default), zeros, mean, normal, copy, interpolate. `shrink`: truncate (default), pool. Either
    may be a {site: strategy} mapping. `seed` makes `normal` reproducible (recipes replay it).
    Atomic: on any error the model is exactly as it was.
    """
    backbone = backbone or backbone_of(model)
    if not isinstance(init, Mapping):
        strategies.check_growth(init)
    if not isinstance(shrink, Mapping):
        strategies.check_shrink(shrink)
    planned = {n: (c, requested[n]) for n, c in counts(model, backbone).items() if n in requested}
    validate(model, requested, backbone)
    _notify(model, backbone, "surgery_before_resize", {n: oc for n, oc in planned.items() if oc[0] != oc[1]})
    with _transaction(model, backbone) as edit:
        changes = _apply(model, backbone, requested, edit, init, shrink, seed)
        _notify(model, backbone, "surgery_after_resize", changes)
    return changes


@contextlib.contextmanager
def tokens(model: nn.Module, *, init: str | Mapping[str, str] = strategies.RESTORE,
           shrink: str | Mapping[str, str] = "truncate", seed: int = 0, backbone: str | None = None,
           **requested: int) -> Iterator[nn.Module]:
    """Temporarily run `model` with other counts; on exit (also on an exception) it is bit-exactly
    what it was: the original tensor objects, counters and recipe are put back."""
    backbone = backbone or backbone_of(model)
    before = counts(model, backbone)
    with _transaction(model, backbone) as edit:
        _notify(model, backbone, "surgery_before_resize",
                {n: (before[n], c) for n, c in requested.items() if n in before and before[n] != c})
        changes = _apply(model, backbone, requested, edit, init, shrink, seed)
        _notify(model, backbone, "surgery_after_resize", changes)
    undo = {n: (new, old) for n, (old, new) in changes.items()}
    try:
        yield model
    finally:
        try:
            _notify(model, backbone, "surgery_before_resize", undo)
        finally:
            edit.rollback()  # the original tensor objects, counters and recipe come back
            _notify(model, backbone, "surgery_after_resize", undo)


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
        data = json.loads(text) if isinstance(text, str) else text
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
