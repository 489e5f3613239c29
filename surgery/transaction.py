"""`Transaction`: one atomic change of a model's token counts and options, with its events.

    with Transaction(model, backbone) as txn:       # the model's lock, one Edit journal
        txn.resize({"reg_tokens": 4}, init="mean")  # sites read once, re-read after each change
        txn.set_options({"head_mode": {"vision": "all"}})
    # committed: steps recorded in the recipe, surgery_after_resize fired; on any error: rolled back

`surgery.resize`, `surgery.tokens(...)`, `surgery.set_options`, a recipe's replay and a checkpoint
load are each one transaction, so the rule is written once: every change goes through the
transaction's `Edit`; `surgery_before_resize` fires ahead of each batch of changes (plugins only
drop caches there) and `surgery_after_resize` once, at commit, with the net change; a rollback
that undoes anything is bracketed by a before/after pair of its own, so a plugin's caches always
follow the model. A rollback, once started, completes (a Ctrl-C meanwhile is raised after it,
`surgery.edit`). Committed inside an open `tokens(...)` block, the change joins the block's
journal: leaving the block undoes it too.

Sites are asked of the plugins once, when first needed, and again only after a change that may
have moved them (the check that a change reached its count re-reads them, and the next site uses
that reading); an option change only marks them to be re-read, since options may change what
counts a site allows.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import options as model_options_
from . import strategies
from .change import SiteChange, apply_change
from .compose import Part, part_at, parts
from .compose import calls as part_calls
from .declarations import check_count, check_declaration, check_request, read_sites, sites
from .edit import Edit
from .errors import ResizeError, SiteError, SurgeryError
from .guard import Block, guard_of
from .site import TokenSite, module_paths
from .state import model_state, set_state

BEFORE, AFTER = "surgery_before_resize", "surgery_after_resize"


def notify(model: nn.Module, backbone: str, event: str, changes: Mapping[str, tuple[int, int]],
           force: bool = False, known: list[Part] | None = None) -> None:
    """Fire a before/after-resize event on every part of the model (`known`: the parts, when already
    read); a plugin's error becomes a ResizeError naming the plugin. Nothing fires without
    `changes`, unless `force` (options changed)."""
    if not changes and not force:
        return
    for plugin, function, part in part_calls(model, backbone, event, known):  # every part sees every change
        try:
            function(model=part.model, backbone=part.backbone, changes=dict(changes))
        except SurgeryError:
            raise
        except Exception as exc:
            raise ResizeError(f"plugin {plugin!r} failed in {event} for {dict(changes)}: "
                              f"{type(exc).__name__}: {exc}; the model was left as it was") from exc


def bracket(model: nn.Module, backbone: str, changes: Mapping[str, tuple[int, int]], undo: Callable[[], None],
            force: bool = False) -> BaseException | None:
    """Run `undo` between a before and an after event announcing `changes`. The undo always runs
    (and raises what it raises); the first failure of an event is returned, not raised."""
    failure: BaseException | None = None
    try:
        notify(model, backbone, BEFORE, changes, force)
    except BaseException as exc:  # noqa: BLE001 - the undo runs regardless; the caller decides
        failure = exc
    try:
        undo()
    finally:
        try:
            notify(model, backbone, AFTER, changes, force)
        except BaseException as exc:  # noqa: BLE001 - the same
            failure = failure or exc
    return failure


def adopt(model: nn.Module, edit: Edit) -> None:
    """A change committed while a `tokens(...)` block is open on the model joins the block's journal:
    leaving the block undoes it too, which keeps the model consistent (the block puts back rows
    and counters this change may have moved)."""
    guard = guard_of(model)
    if guard.open:
        guard.open[-1].edit.absorb(edit)


def _pick(choice: str | Mapping[str, str], name: str, check: Callable[[str], str]) -> str | None:
    value = choice.get(name, None) if isinstance(choice, Mapping) else choice
    return check(value) if value is not None else None


class Transaction:
    """One atomic change of `model`: held under the model's lock from `with` to its end, committed
    when the block ends normally, rolled back (the model exactly as it was) on any exception.

    `failure(exc)` turns an exception that is not a SurgeryError into one (default: a ResizeError
    saying the model was left as it was). `opens_block`: the journal becomes a `tokens(...)` block's
    instead of joining an open one.
    """

    def __init__(self, model: nn.Module, backbone: str, *, optimizers: tuple[torch.optim.Optimizer, ...] = (),
                 opens_block: bool = False, failure: Callable[[Exception], SurgeryError] | None = None) -> None:
        self.model, self.backbone = model, backbone
        self.optimizers = tuple(optimizers)
        self.opens_block = opens_block
        self.edit = Edit()
        self.steps: list[dict] = []  # recipe steps this transaction adds (`surgery.recipes`)
        self.options_changed = False
        self._failure = failure or (lambda exc: ResizeError(
            f"changing the counts of a {backbone!r} model failed: {type(exc).__name__}: {exc}; "
            f"the model was left as it was"))
        self._declared: dict[str, TokenSite] | None = None
        self._parts: list[Part] | None = None  # the model's parts (`surgery.compose`), read with the sites
        self._paths: dict[int, str] | None = None
        self._start: dict[str, int] | None = None
        self._now: dict[str, int] = {}
        self._lock = guard_of(model).lock

    # -- the sites, read when needed ------------------------------------------------------------

    @property
    def declared(self) -> dict[str, TokenSite]:
        """The model's sites as they are now (read from the plugins when not known)."""
        if self._declared is None:
            self._redeclare()
        return self._declared

    @property
    def start(self) -> dict[str, int]:
        """{site: count} when the transaction began."""
        if self._start is None:
            self._redeclare()
        return dict(self._start)

    @property
    def now(self) -> dict[str, int]:
        """{site: count} as the transaction has left them so far."""
        if self._start is None:
            self._redeclare()
        return dict(self._now)

    def _redeclare(self) -> dict[str, TokenSite]:
        self._parts = parts(self.model, self.backbone)
        self._declared, self._paths = read_sites(self.model, self.backbone, self._parts), None
        self._now = {name: site.count for name, site in self._declared.items()}
        if self._start is None:
            self._start = dict(self._now)
        return self._declared

    @property
    def paths(self) -> dict[int, str]:
        if self._paths is None:
            self._paths = module_paths(self.model)
        return self._paths

    def net(self) -> dict[str, tuple[int, int]]:
        """{site: (count at the start, count now)} of the sites this transaction changed."""
        if self._start is None:
            return {}
        return {n: (c, self._now[n]) for n, c in self._start.items() if n in self._now and self._now[n] != c}

    # -- changes ---------------------------------------------------------------------------------

    def announce(self, changes: Mapping[str, tuple[int, int]], force: bool = False) -> None:
        """Fire `surgery_before_resize` for changes about to be made (`force`: also with none, when
        options are about to change)."""
        notify(self.model, self.backbone, BEFORE, changes, force, self._parts)

    def resize(self, requested: Mapping[str, Any], init: str | Mapping[str, str] = strategies.RESTORE,
               shrink: str | Mapping[str, str] = "truncate", seed: int = 0,
               announce: bool = True) -> dict[str, tuple[int, int]]:
        """Set the `requested` counts, one site at a time; returns {site: (old, new)} of those changed.

        Everything is checked against the sites first (names, counts, strategies, declarations).
        Shrinks go first, in declaration order; then growths in reverse declaration order (stashed
        rows come back in any order, `surgery.rows`; this one undoes a shrink of two sites
        mirror-wise). After each change the sites are re-read (to check it) and the next site is
        checked again against that reading, since an earlier site may have moved its rows.
        """
        declared = self.declared
        check_request(declared, requested, self.paths, init=init, shrink=shrink)
        if announce:
            self.announce({n: (declared[n].count, c) for n, c in requested.items() if declared[n].count != c})
        asked = [name for name in declared if name in requested]
        order = ([n for n in asked if requested[n] < declared[n].count]
                 + [n for n in reversed(asked) if requested[n] >= declared[n].count])
        changes: dict[str, tuple[int, int]] = {}
        for name in order:
            if self._declared is not declared:  # re-read since the check: check this site again
                declared = self.declared
                if name not in declared:
                    raise SiteError(f"site {name!r} is no longer declared once {', '.join(changes)} changed; "
                                    f"its plugin declares it only at some counts of the others")
                check_declaration(declared[name], declared, self.paths)
                check_count(declared[name], requested[name])
            site, new = declared[name], requested[name]
            if new == site.count:
                continue
            grow = _pick(init, name, strategies.check_growth) or strategies.RESTORE
            cut = _pick(shrink, name, strategies.check_shrink) or "truncate"
            change = SiteChange(self.model, self.backbone, site, new, self.edit, grow, cut, seed, sites=declared,
                                optimizers=self.optimizers, paths=self.paths)
            apply_change(change, self._owner(site.part), lambda: self._redeclare().get(name))
            changes[name] = (site.count, new)
            self.steps.append({"site": name, "from": site.count, "to": new, "init": grow, "shrink": cut,
                               "seed": seed})
        return changes

    def _owner(self, path: str) -> Part:
        """The (sub-)model whose plugins declared a site at `path` ("" the model itself)."""
        known = next((p for p in self._parts or () if p.path == path), None)
        return known or part_at(self.model, self.backbone, path)

    def set_options(self, requested: Mapping[str, Any], *, where: str = "options", only_valid: bool = False,
                    announce: bool = True) -> dict[str, Any]:
        """Set model options through their plugins (`surgery.options.change_options`); returns those
        left unapplied (with `only_valid`, the ones a plugin refused for now). Each option that
        changed is a recipe step {"option", "from", "to"} (whole values), and the sites are read
        again when next needed: an option may change what counts a site allows."""
        before = (lambda: self.announce({}, force=True)) if announce else None
        left, changed = model_options_.change_options(self.model, requested, self.edit, backbone=self.backbone,
                                                      where=where, only_valid=only_valid, before_change=before)
        for name, (old, new) in changed.items():
            self.steps.append({"option": name, "from": old, "to": new})
        if changed:
            self.options_changed, self._declared = True, None
        return left

    # -- the end ---------------------------------------------------------------------------------

    def commit(self) -> None:
        """Record the steps in the model's recipe, fire `surgery_after_resize` with the net change,
        and join an open `tokens(...)` block's journal."""
        if self.steps:
            set_state(self.model, self.edit, recipe=model_state(self.model).recipe + tuple(self.steps))
        notify(self.model, self.backbone, AFTER, self.net(), self.options_changed, self._parts)
        if not self.opens_block:
            adopt(self.model, self.edit)

    def rollback(self) -> BaseException | None:
        """Undo everything (completely, whatever happens meanwhile), bracketed by events when
        anything had changed; returns an event's failure (the undo raises what it raises)."""
        undo = {n: (new, old) for n, (old, new) in self.net().items()}
        try:
            return bracket(self.model, self.backbone, undo, self.edit.rollback, self.options_changed)
        finally:
            self.steps, self.options_changed, self._declared, self._paths, self._parts = [], False, None, None, None
            self._now = dict(self._start or {})

    def __enter__(self) -> "Transaction":
        self._lock.acquire()
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            if exc is None:
                try:
                    self.commit()
                    return False
                except BaseException as failed:  # an after-event, say: undo what was committed
                    exc = failed
            self._abandon(exc)
        finally:
            self._lock.release()
        return False

    def _abandon(self, exc: BaseException) -> None:
        """Roll back, then raise `exc` (as a SurgeryError: `failure`); a Ctrl-C or an undo step's
        failure during the rollback is raised instead, an event's failure noted on `exc`."""
        try:
            failure = self.rollback()
        except BaseException as during:
            raise during from exc
        if failure is not None and not isinstance(failure, Exception):
            raise failure from exc
        raised = self._failure(exc) if isinstance(exc, Exception) and not isinstance(exc, SurgeryError) else exc
        if failure is not None:
            raised.add_note(f"(announcing the rollback also failed: {failure})")
        if raised is exc:
            raise exc
        raise raised from exc


def undo_block(model: nn.Module) -> Callable[[Block], None]:
    """How a `tokens(...)` block is left: the model put back as it was when the block opened
    (changes made inside it included), bracketed by resize events."""
    def undo(block: Block) -> None:
        now = sites(model, block.backbone)
        changes = {n: (s.count, block.before[n]) for n, s in now.items()
                   if n in block.before and block.before[n] != s.count}
        failure = bracket(model, block.backbone, changes, block.edit.rollback, force=len(block.edit) > 0)
        if failure is not None:
            raise failure
    return undo


__all__ = ["Transaction", "notify", "bracket", "adopt", "undo_block", "BEFORE", "AFTER"]
