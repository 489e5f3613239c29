"""What the engine keeps on a model besides its weights: recipe, stash, parked parameters, origin.

It lives in the model's `__dict__` (never in its state dict), as one frozen `ModelState` that is
replaced, never mutated, through an `Edit` journal: a rollback puts the previous object back, so
the recipe, the rows a truncate stashed and the parameters parked at a count of 0 always agree
with the model's tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import nn

from .edit import Edit
from .rows import Piece

STATE_ATTR = "_surgery_state"


@dataclasses.dataclass(frozen=True)
class ModelState:
    """What the engine keeps on a model. Replaced, never mutated, so the journal can put the previous one back."""

    recipe: tuple[dict, ...] = ()  # the steps that made the model what it is (`surgery.recipes`)
    # per tensor key: the rows a truncate dropped (`surgery.rows`), and a parameter absent at count 0
    stash: Mapping[str, tuple[Piece, ...]] = dataclasses.field(default_factory=dict)
    parked: Mapping[str, nn.Parameter] = dataclasses.field(default_factory=dict)
    model_name: str | None = None  # registered name, when built by `surgery.build`
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def model_state(model: nn.Module) -> ModelState:
    """The model's engine state (an empty one for a model surgery never touched)."""
    return model.__dict__.get(STATE_ATTR) or ModelState()


def set_state(model: nn.Module, edit: Edit, **changes: Any) -> None:
    """Replace fields of the model's state, journaled in `edit`."""
    edit.set_attr(model, STATE_ATTR, dataclasses.replace(model_state(model), **changes))


def mark_built(model: nn.Module, name: str, kwargs: Mapping[str, Any]) -> None:
    """Record the registered name and arguments a model was built from (`surgery.build`): not a change
    of the model, so not journaled."""
    model.__dict__[STATE_ATTR] = dataclasses.replace(model_state(model), model_name=name, model_kwargs=dict(kwargs))


__all__ = ["STATE_ATTR", "ModelState", "model_state", "set_state", "mark_built"]
