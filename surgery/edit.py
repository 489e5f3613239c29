"""`Edit`: the journal through which every change to a model goes, so any change can be undone.

Each mutation records what it replaces before it happens. `rollback()` undoes them in reverse
order and puts back the *same objects* (the original tensors, not copies), which is why undo is
bit-exact and free. Parameters keep their identity: a resized parameter gets new `.data`, so
references held elsewhere (an optimizer's param groups, tied weights) follow it.

New values are always computed before anything is replaced, so a failure while computing (a
strategy's error, out of memory) leaves the model untouched; a failure later rolls back.

Undo is precise: a module attribute, parameter, buffer or submodule slot comes back alone (in its
place in its table's order), so whatever else changed meanwhile stays (a head replaced by
`reset_classifier` inside `tokens(...)`). And a rollback, once started, completes: a Ctrl-C while
it runs is held back until it is done, then raised.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator, MutableMapping

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

    def set_tensor(self, module: nn.Module, name: str, value: torch.Tensor | None, requires_grad: bool = True,
                   parameter: nn.Parameter | None = None) -> None:
        """Give `module.<name>` a new value: new `.data` for an existing parameter, else a new attribute.

        `value=None` removes the tensor (the attribute becomes None, as timm and ImageBind keep
        absent token tensors). A None attribute given a tensor becomes a parameter: `parameter`
        when given (one that was there before, given `value` as its `.data`), else a new one.
        """
        old = getattr(module, name, None)
        if isinstance(old, nn.Parameter) and value is not None:
            self._set_data(old, value)
            return
        snapshot = _snapshot_slot(module, name)
        self._undo.append(lambda: _restore_slot(module, name, snapshot))
        if parameter is not None and value is not None:
            self._set_data(parameter, value)
            setattr(module, name, parameter)
        elif value is None:
            setattr(module, name, None)  # a registered parameter keeps its slot (and key order) as None
        elif isinstance(old, torch.Tensor) and name in module._buffers:
            module._buffers[name] = value
        else:
            setattr(module, name, nn.Parameter(value.detach(), requires_grad=requires_grad))

    def _set_data(self, param: nn.Parameter, value: torch.Tensor) -> None:
        old_data, old_grad = param.data, param.grad
        self._undo.append(lambda: _restore_param(param, old_data, old_grad))
        param.data = value.detach()
        param.grad = None  # a gradient of the old shape would break the next optimizer step

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
        """Undo every change, newest first. Safe to call twice (the journal is emptied).

        It completes whatever happens meanwhile: a Ctrl-C (SIGINT, in the main thread) is held
        back until the end; an undo step interrupted by a KeyboardInterrupt runs again (each one
        puts saved values back, so running it twice is running it once); a step that fails does
        not stop the others. Then the interrupt, or the first failure, is raised.
        """
        failure: BaseException | None = None
        with _interrupts_held():  # a Ctrl-C meanwhile is delivered when the block ends
            while self._undo:
                action = self._undo[-1]
                try:
                    action()
                except KeyboardInterrupt as exc:
                    failure = failure or exc
                    try:
                        action()
                    except BaseException as again:  # noqa: BLE001 - kept, raised after the rest is undone
                        failure = failure or again
                except BaseException as exc:  # noqa: BLE001 - the same
                    failure = failure or exc
                self._undo.pop()
        if failure is not None:
            raise failure

    def absorb(self, other: "Edit") -> None:
        """Take over another journal's changes (they are undone after this one's own later changes)."""
        self._undo.extend(other._undo)
        other._undo = []


def _restore_param(param: nn.Parameter, data: torch.Tensor, grad: torch.Tensor | None) -> None:
    param.data = data
    param.grad = grad


_TABLES = ("_parameters", "_buffers", "_modules")


def _snapshot_slot(module: nn.Module, name: str) -> tuple[str | None, Any, int, bool]:
    """Where `name` lives in the module: (its table, or None for a plain attribute; its value there;
    its position in the table's order; whether it is a non-persistent buffer)."""
    d = module.__dict__
    hidden = name in d.get("_non_persistent_buffers_set", ())
    for table in _TABLES:
        if name in d[table]:
            return table, d[table][name], list(d[table]).index(name), hidden
    return None, d.get(name, _MISSING), 0, hidden


def _restore_slot(module: nn.Module, name: str, snapshot: tuple[str | None, Any, int, bool]) -> None:
    """Put this one slot back as it was, at its place in its table's order; every other entry stays."""
    table_name, value, index, was_hidden = snapshot
    d = module.__dict__
    for table in _TABLES:
        if table != table_name:
            d[table].pop(name, None)
    if table_name is None:
        if value is _MISSING:
            d.pop(name, None)
        else:
            d[name] = value
    else:
        d.pop(name, None)
        table = d[table_name]
        if name in table:
            table[name] = value
        else:  # it was removed or moved: re-insert it where it was
            items = list(table.items())
            items.insert(min(index, len(items)), (name, value))
            table.clear()
            table.update(items)
    hidden = d.get("_non_persistent_buffers_set")
    if hidden is not None:
        (hidden.add if was_hidden else hidden.discard)(name)


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


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold back SIGINT while the block runs, and deliver it to the handler it was meant for once
    the block is done (the default one raises KeyboardInterrupt then).

    Only the main thread receives signals, and only a Python-level handler can be swapped: anywhere
    else (or under SIG_IGN/SIG_DFL) the block runs as it is.
    """
    held: list = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        try:
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
            else:
                previous = None
        except (ValueError, OSError):  # no signals here (an embedded interpreter, say)
            previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            if held:
                previous(signal.SIGINT, None)
