"""One model, one surgery at a time: a lock per model, and the `tokens(...)` blocks open on it.

Interleaved surgery would leave counts, rows and counters that disagree, so a resize, a replay or an
open `tokens(...)` block holds the model's (reentrant) lock. Blocks are left innermost first: leaving
one with inner blocks still open undoes those too and raises a `NestingError`. Locks live beside the
models (weakly keyed), not on them, so a model still copies and pickles.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

from torch import nn

from .edit import Edit
from .errors import NestingError


class Block:
    """An open `tokens(...)` block: its journal, the counts it opened at, and how to undo it
    (`undo(block)`: put the model back as it was when the block opened)."""

    def __init__(self, edit: Edit, backbone: str, before: dict[str, int], undo: Callable[["Block"], None]) -> None:
        self.edit, self.backbone, self.before = edit, backbone, before
        self._undo = undo
        self.undone = False

    def undo(self) -> None:
        self.undone = True
        self._undo(self)


class Guard:
    """A model's lock and its open blocks, innermost last."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.open: list[Block] = []

    def leave(self, block: Block) -> None:
        """Undo `block`. Left before blocks opened inside it, it undoes them first (innermost first)
        and raises a NestingError once the model is back where `block` found it."""
        if block.undone:
            raise NestingError("a tokens(...) block was left after the block enclosing it, which had already "
                               "put the model back (leave blocks innermost first)")
        index = self.open.index(block)
        inner = self.open[index + 1:]
        del self.open[index:]
        failure = None
        for each in [*reversed(inner), block]:
            try:
                each.undo()
            except BaseException as exc:  # noqa: BLE001 - every block is undone; the first error is raised after
                failure = failure or exc
        if failure is not None:
            raise failure
        if inner:
            raise NestingError(f"a tokens(...) block was left while {len(inner)} block(s) opened inside it were "
                               f"still open; they were undone with it, and the model is as it was before it "
                               f"(leave blocks innermost first)")


_GUARDS: "weakref.WeakKeyDictionary[nn.Module, Guard]" = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def guard_of(model: nn.Module) -> Guard:
    """The model's guard (made on first use)."""
    with _GUARDS_LOCK:
        guard = _GUARDS.get(model)
        if guard is None:
            guard = _GUARDS[model] = Guard()
        return guard
