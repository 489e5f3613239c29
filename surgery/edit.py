"""`Edit`: the journal through which every change to a model goes, so any change can be undone.

Each mutation records what it replaces before it happens. `rollback()` undoes them in reverse
order and puts back the *same objects* (the original tensors, not copies), which is why undo is
bit-exact and free. Parameters keep their identity: a resized parameter gets new `.data`, so
references held elsewhere (an optimizer's param groups, tied weights) follow it.

New values are always computed before anything is replaced, so a failure while computing (a
strategy's error, out of memory) leaves the model untouched; a failure later rolls back.
"""

from __future__ import annotations

from typing import Any, Callable, MutableMapping

import torch
from torch import nn

_MISSING = object()


class Edit:
    """A journal of reversible changes to modules, tensors and attributes."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    # -- mutations ---------------------------------------------------------------------------

    def set_tensor(self, module: nn.Module, name: str, value: torch.Tensor | None, requires_grad: bool = True) -> None:
        """Give `module.<name>` a new value: new `.data` for an existing parameter, else a new attribute.

        `value=None` removes the tensor (the attribute becomes None, as timm and ImageBind keep
        absent token tensors). A None attribute given a tensor becomes a parameter.
        """
        old = getattr(module, name, None)
        if isinstance(old, nn.Parameter) and value is not None:
            old_data, old_grad = old.data, old.grad
            self._undo.append(lambda: _restore_param(old, old_data, old_grad))
            old.data = value.detach()
            old.grad = None  # a gradient of the old shape would break the next optimizer step
            return
        snapshot = _snapshot_slot(module, name)
        self._undo.append(lambda: _restore_slot(module, name, snapshot))
        if value is None:
            setattr(module, name, None)  # a registered parameter keeps its slot (and key order) as None
        elif isinstance(old, torch.Tensor) and name in module._buffers:
            module._buffers[name] = value
        else:
            setattr(module, name, nn.Parameter(value.detach(), requires_grad=requires_grad))

    def set_attr(self, target: Any, name: str, value: Any) -> None:
        """Set a plain attribute (or an item, when `target` is a mapping) and journal the old one."""
        if isinstance(target, MutableMapping):
            old = target.get(name, _MISSING)
            self._undo.append(lambda: _restore_item(target, name, old))
            target[name] = value
        elif isinstance(target, nn.Module):
            snapshot = _snapshot_slot(target, name)
            self._undo.append(lambda: _restore_slot(target, name, snapshot))
            setattr(target, name, value)
        else:
            old = getattr(target, name, _MISSING)
            self._undo.append(lambda: _restore_attr(target, name, old))
            setattr(target, name, value)

    def on_undo(self, action: Callable[[], None]) -> None:
        """Run `action` when this edit is rolled back (for state a plugin keeps outside the model)."""
        self._undo.append(action)

    # -- undo --------------------------------------------------------------------------------

    def rollback(self) -> None:
        """Undo every change, newest first. Safe to call twice (the journal is emptied)."""
        while self._undo:
            self._undo.pop()()

    def absorb(self, other: "Edit") -> None:
        """Take over another journal's changes (they are undone after this one's own later changes)."""
        self._undo.extend(other._undo)
        other._undo = []


def _restore_param(param: nn.Parameter, data: torch.Tensor, grad: torch.Tensor | None) -> None:
    param.data = data
    param.grad = grad


def _snapshot_slot(module: nn.Module, name: str) -> tuple[dict, dict, dict, Any]:
    """Shallow copies of the module's tables, so undo restores entries *and their order*."""
    d = module.__dict__
    return dict(d["_parameters"]), dict(d["_buffers"]), dict(d["_modules"]), d.get(name, _MISSING)


def _restore_slot(module: nn.Module, name: str, snapshot: tuple[dict, dict, dict, Any]) -> None:
    d = module.__dict__
    for table, saved in zip((d["_parameters"], d["_buffers"], d["_modules"]), snapshot[:3]):
        table.clear()
        table.update(saved)
    if snapshot[3] is _MISSING:
        d.pop(name, None)
    else:
        d[name] = snapshot[3]


def _restore_item(target: MutableMapping, name: str, old: Any) -> None:
    if old is _MISSING:
        target.pop(name, None)
    else:
        target[name] = old


def _restore_attr(target: Any, name: str, old: Any) -> None:
    if old is _MISSING:
        if hasattr(target, name):
            delattr(target, name)
    else:
        setattr(target, name, old)
