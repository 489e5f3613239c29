"""The surgery engine: list a model's token sites, change their counts and options, undo, record, replay.

    surgery.sites(model)                          -> {name: TokenSite}
    surgery.resize(model, reg_tokens=4)           -> {name: (old, new)}  (atomic)
    with surgery.tokens(model, reg_tokens=0): ... (temporary; bit-exact restore on exit)
    surgery.set_options(model, head_mode={"vision": "all"})  -> {option: (old, new)}  (atomic)
    surgery.recipe(model)                         -> Recipe (replayable on a fresh model)

Each call is one `Transaction` (`surgery.transaction`): one `Edit` journal, so a failure anywhere
(a bad count, a strategy that cannot work, a plugin's error, out of memory, Ctrl-C) rolls the
model back to exactly what it was, and `tokens(...)` restores the original tensor objects
themselves. The pieces live in their own modules: what the plugins declare
(`surgery.declarations`), one site's change (`surgery.change`), the engine's state on a model
(`surgery.state`), recipes (`surgery.recipes`); the names below are re-exported here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from torch import nn

from . import optim, strategies
from .change import SiteChange, apply_change
from .declarations import backbone_of, check_declaration, check_request, counts, sites, validate
from .errors import ResizeError
from .guard import Block, guard_of
from .plugins import get_host
from .recipes import Recipe, describe_step
from .state import STATE_ATTR, ModelState, mark_built, model_state
from .transaction import Transaction, adopt, undo_block


def resize(model: nn.Module, *, init: str | Mapping[str, str] = strategies.RESTORE,
           shrink: str | Mapping[str, str] = "truncate", seed: int = 0, backbone: str | None = None,
           optimizer: Any = None, **requested: int) -> dict[str, tuple[int, int]]:
    """Set token counts, e.g. `resize(vit, reg_tokens=4, init="mean")`. Returns {site: (old, new)}.

    `init` (growth): restore (default: tokens a truncate dropped come back first, then the site's
    default), zeros, mean, normal, copy, interpolate. `shrink`: truncate (default), pool. Either
    may be a {site: strategy} mapping (of sites the model has: any other name is a SiteError).
    `seed` makes `normal` reproducible (recipes replay it). `optimizer` (one torch optimizer or a
    list): their per-parameter state follows the rows (`surgery.optim`). Atomic: on any error the
    model (and the optimizers) are exactly as they were. Serialised per model: a resize from
    another thread waits for this one (and for an open `tokens(...)` block); one inside a
    `tokens(...)` block is undone when the block is left.
    """
    backbone = backbone_of(model, backbone)
    optimizers = optim.optimizers_of(optimizer)
    _check_strategies(init, shrink)
    with Transaction(model, backbone, optimizers=optimizers) as txn:
        return txn.resize(requested, init, shrink, seed)


@contextlib.contextmanager
def tokens(model: nn.Module, *, init: str | Mapping[str, str] = strategies.RESTORE,
           shrink: str | Mapping[str, str] = "truncate", seed: int = 0, backbone: str | None = None,
           optimizer: Any = None, **requested: int) -> Iterator[nn.Module]:
    """Temporarily run `model` with other counts; on exit (also on an exception) it is bit-exactly
    what it was: the original tensor objects, counters, options and recipe are put back (and the
    original state tensors of `optimizer`, which follows inside the block as with `resize`).

    Only what surgery changed is put back: other attributes, parameters and submodules changed
    inside the block stay. The block holds the model's lock: surgery from other threads waits
    until it is left. Blocks nest; one left before a block opened inside it undoes both and
    raises a NestingError.
    """
    backbone = backbone_of(model, backbone)
    optimizers = optim.optimizers_of(optimizer)
    _check_strategies(init, shrink)
    guard = guard_of(model)
    with guard.lock:  # held until the block is left
        with Transaction(model, backbone, optimizers=optimizers, opens_block=True) as txn:
            txn.resize(requested, init, shrink, seed)
        block = Block(txn.edit, backbone, txn.start, undo_block(model))
        guard.open.append(block)
        try:
            yield model
        finally:
            guard.leave(block)


def set_options(model: nn.Module, *, backbone: str | None = None, **options: Any) -> dict[str, tuple[Any, Any]]:
    """Set model options (`surgery.options`), e.g. `set_options(imagebind, head_mode={"vision": "all"})`:
    a dict option may name only the keys to change. Returns {option: (old value, new value)} of
    those that changed (whole values).

    As `resize`: atomic (the plugin owning an option checks the value first; any error leaves the
    model as it was), journaled, announced to the plugins (`surgery_before_resize` /
    `surgery_after_resize`, with no count changes), recorded in the recipe (so `surgery.save`,
    a replay and `surgery inspect` carry it), undone with an enclosing `tokens(...)` block.
    """
    backbone = backbone_of(model, backbone)
    with Transaction(model, backbone, failure=lambda exc: ResizeError(
            f"setting options {sorted(options)} of a {backbone!r} model failed: {type(exc).__name__}: {exc}; "
            f"the model was left as it was")) as txn:
        txn.set_options(options, where="set_options")
    return {s["option"]: (s["from"], s["to"]) for s in txn.steps}


def recipe(model: nn.Module) -> Recipe:
    """The recipe of every change made to `model` through the engine."""
    return Recipe(backbone=backbone_of(model), steps=model_state(model).recipe)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a model a plugin registered by name (random weights), e.g. `build("vit_tiny_test")`."""
    spec = get_host().model_spec(name)
    model = spec.factory(**kwargs)
    mark_built(model, name, kwargs)
    return model


def _check_strategies(init: str | Mapping[str, str], shrink: str | Mapping[str, str]) -> None:
    """A strategy named for every site is checked before anything else (even before the sites are read)."""
    if not isinstance(init, Mapping):
        strategies.check_growth(init)
    if not isinstance(shrink, Mapping):
        strategies.check_shrink(shrink)


__all__ = ["sites", "counts", "backbone_of", "resize", "tokens", "set_options", "recipe", "build", "Recipe",
           "describe_step", "SiteChange", "apply_change", "validate", "check_request", "check_declaration",
           "ModelState", "model_state", "STATE_ATTR", "Transaction", "adopt"]
