"""Optimizers follow a change of counts: `resize(model, ..., optimizer=opt)`, `tokens(..., optimizer=opt)`.

A resized parameter keeps its identity, so the optimizer still holds it, but its state (`exp_avg`,
`momentum_buffer`, ...) still has the old rows and the next step would fail on the shape or train a
token with another's history. Here every state tensor shaped like the parameter follows the site's
rows (kept rows keep their state, new rows start at zero, dropped rows' state is stashed for
`restore`), through the engine's journal so a failed resize leaves the optimizers as they were.
The rules in full: docs/plugins.md, "Live models".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from . import rows
from .edit import Edit
from .errors import OptimizerError
from .site import TokenTensor

STASH_ATTR = "_surgery_stash"  # on the optimizer: {"<tensor key>:<state name>": pieces}


def optimizers_of(optimizer: Any) -> tuple[torch.optim.Optimizer, ...]:
    """`optimizer=` as a tuple of optimizers: None, one optimizer, or a list/tuple of them."""
    if optimizer is None:
        return ()
    items = optimizer if isinstance(optimizer, (list, tuple)) else (optimizer,)
    for item in items:
        if not isinstance(item, torch.optim.Optimizer):
            raise OptimizerError(f"optimizer= takes a torch.optim.Optimizer or a list of them; "
                                 f"got a {type(item).__name__}")
    return tuple(items)


def holds(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def follow(optimizers: Sequence[torch.optim.Optimizer], param: nn.Parameter, t: TokenTensor,
           axes: Sequence[rows.Axis], new: int, key: str, edit: Edit, *, truncate: bool, restore: bool,
           rewrites_old: bool) -> None:
    """Resize `param`'s state in every optimizer holding it, as its rows (`t`, along `axes`[0]) go
    from `axes[0].count` to `new`: `truncate` stashes dropped rows' state (else the shrunk rows
    start from zero), `restore` brings stashed state back, `rewrites_old` zeroes the kept rows'
    state too (`interpolate`). Call it before the parameter gets its new rows."""
    for optimizer in optimizers:
        state = optimizer.state.get(param)
        if not state or not holds(optimizer, param):
            continue
        before = optimizer.__dict__.get(STASH_ATTR) or {}
        stash = dict(before)
        for name, value in list(state.items()):
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                continue  # a step count, a scalar: not per row
            viewed = value.reshape(t.view) if t.view is not None else value
            new_viewed, pieces = rows.resize_block(
                viewed, axes, new, stash.pop(f"{key}:{name}", ()), restore=restore,
                shrink=None if truncate else _zero_shrunk, grow=_zero_all if rewrites_old else _zero_new)
            edit.set_attr(state, name, new_viewed.reshape(t.stored_shape(tuple(new_viewed.shape))))
            if pieces:
                stash[f"{key}:{name}"] = pieces
        if not rows.same_stash(stash, before):
            edit.set_attr(optimizer, STASH_ATTR, stash)


def join(optimizers: Sequence[torch.optim.Optimizer], param: nn.Parameter, siblings: Sequence[nn.Parameter],
         edit: Edit) -> None:
    """Add a parameter that (re-)entered the model to the optimizers, unless one holds it already or
    it is frozen: to the group holding one of `siblings`, else the first optimizer's first group."""
    if not optimizers or not param.requires_grad or any(holds(o, param) for o in optimizers):
        return
    groups = [g for o in optimizers for g in o.param_groups]
    group = next((g for g in groups if any(p is s for p in g["params"] for s in siblings)), groups[0])
    edit.set_attr(group, "params", [*group["params"], param])


def _zero_shrunk(old: torch.Tensor, out: torch.Tensor) -> None:
    out.zero_()


def _zero_all(out: torch.Tensor, have: int) -> None:
    out.zero_()


def _zero_new(out: torch.Tensor, have: int) -> None:
    out[have:].zero_()
