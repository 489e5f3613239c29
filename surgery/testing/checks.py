"""The conformance checks: each takes a `Subject` and raises AssertionError saying what broke.

Every check builds its own fresh model(s), so they run in any order and alone. What each one
promises is in its docstring; `CHECKS` lists them in the order `check_conformance` runs them
(cheap and fundamental first: a factory that is not deterministic makes the rest meaningless).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator, Mapping

from .compare import (Subject, assert_matches_fresh_build, assert_same_model, assert_unchanged, output_differences,
                      snapshot)

MAX_INJECTIONS = 8  # failure points tried per site and Edit method (spread over all of them)


class InjectedFailure(RuntimeError):
    """The failure the kit injects; the engine must roll back and raise a `SurgeryError`."""


def _fresh(subject: Subject) -> tuple[Any, tuple]:
    model = subject.build()
    return model, subject.inputs(model)


def _resize(model: Any, context: str, **kwargs: Any) -> None:
    """`surgery.resize`; a refusal fails the check, saying which step was refused."""
    from surgery.engine import resize
    from surgery.errors import SurgeryError

    try:
        resize(model, **kwargs)
    except SurgeryError as exc:
        raise AssertionError(f"{context}: resize({_kw(kwargs)}) raised {type(exc).__name__}: {exc}") from exc


def _kw(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _plans(tries: Mapping[str, list[int]], pick: Callable[[list[int]], list[int]],
           together: Callable[[list[int]], int] | None) -> list[dict[str, int]]:
    """One plan per site and picked count; then, with several sites, one moving them all at once."""
    plans = [{name: n} for name, tried in tries.items() for n in pick(tried)]
    sites = {name: pick(tried) for name, tried in tries.items() if pick(tried)}
    if together is not None and len(sites) > 1:
        plans.append({name: together(picked) for name, picked in sites.items()})
    return plans


def check_something_to_check(subject: Subject) -> None:
    """At least one site can change its count: otherwise every other check passes vacuously."""
    assert any(subject.trials(subject.build()).values()), \
        "nothing to check: no site of the model can change its count (give counts={site: [...]})"


def check_factory_deterministic(subject: Subject) -> None:
    """Two models built after the same `torch.manual_seed` are identical: the other checks compare
    a changed model with a fresh one, which means nothing if the factory is not repeatable."""
    a, inputs = _fresh(subject)
    assert_same_model(a, subject.build(), inputs, subject.forward,
                      context=f"two models built after torch.manual_seed({subject.seed}) differ")


def check_same_count_is_noop(subject: Subject) -> None:
    """Resizing to the current counts (with `resize` or `tokens`) changes nothing at all."""
    from surgery.engine import resize, tokens

    model, inputs = _fresh(subject)
    before = snapshot(model, subject, inputs)
    same = _kw(before.counts)
    changes = resize(model, **before.counts)
    assert changes == {}, f"resize({same}), the current counts, reported changes {changes}"
    assert_unchanged(model, before, subject, inputs, f"resize({same}) (the current counts)")
    with tokens(model, **before.counts):
        assert_unchanged(model, before, subject, inputs, f"inside tokens({same}) (the current counts)")
    assert_unchanged(model, before, subject, inputs, f"after tokens({same}) (the current counts)")


def check_counters_follow(subject: Subject) -> None:
    """At every tried count the site reports it, every declared counter (of every site) reads what
    its declaration says, and the site's tensors grew or shrank by exactly the change."""
    from surgery.engine import sites, tokens

    model, _ = _fresh(subject)
    start = sites(model)
    _check_declared(start, "on the freshly built model")
    extents = {(name, id(t.module), t.name): _extent(t) for name, site in start.items() for t in site.tensors}
    for name, tried in subject.trials(model).items():
        for n in tried:
            where, delta = f"inside tokens({name}={n})", n - start[name].count
            with tokens(model, **{name: n}):
                now = sites(model)
                assert now[name].count == n, f"{where}: site {name!r} reports count {now[name].count}"
                _check_declared(now, where)
                for t in now[name].tensors:
                    old = extents.get((name, id(t.module), t.name))
                    if old is not None and _extent(t) - old != delta:
                        raise AssertionError(f"{where}: tensor {t.name!r} of site {name!r} went from {old} to "
                                             f"{_extent(t)} along axis {t.axis}, not by {delta}")


def _check_declared(found: Mapping[str, Any], where: str) -> None:
    for name, site in found.items():
        for counter in site.counters:
            target, want, label = counter.target, counter.value_for(site.count), type(counter.target).__name__
            if isinstance(target, Mapping) and counter.attr not in target:
                continue  # unset: such a mapping records only non-default arguments
            if not isinstance(target, Mapping) and not hasattr(target, counter.attr):
                raise AssertionError(f"{where}: site {name!r} declares a counter {label}.{counter.attr}, "
                                     f"which the model does not have")
            have = counter.current()
            if have != want or type(have) is not type(want):
                raise AssertionError(f"{where}: counter {label}.{counter.attr} of site {name!r} reads "
                                     f"{have!r}, its declaration says {want!r} for count {site.count}")


def _extent(t: Any) -> int:
    return 0 if t.current() is None else t.viewed().shape[t.axis]


def check_forward_at_every_count(subject: Subject) -> None:
    """The model runs at every tried count (each site alone, then all at their largest) with finite
    outputs of the same structure and (`expect_output_change`) different values or shapes: a count
    that does not reach the forward means an undeclared counter or coupled tensor."""
    import torch
    from surgery.engine import tokens

    model, inputs = _fresh(subject)
    base = subject.run(model, inputs, " on the freshly built model")
    for plan in _plans(subject.trials(model), lambda tried: tried, max):
        where = f" inside tokens({_kw(plan)})"
        with tokens(model, **plan):
            out = subject.run(model, inputs, where)
        assert len(out) == len(base), f"forward returned {len(base)} tensors, {len(out)}{where}"
        for i, o in enumerate(out):
            if (o.is_floating_point() or o.is_complex()) and not torch.isfinite(o).all():
                raise AssertionError(f"output {i} is not finite{where}")
        if subject.expect_output_change and not output_differences(base, out):
            raise AssertionError(f"outputs are bit-identical to the original ones{where}: the count does not "
                                 f"reach the forward (an undeclared counter or coupled tensor?); "
                                 f"set expect_output_change=False if that is intended")


def check_matches_fresh_build(subject: Subject) -> None:
    """At every tried count (each site alone, then all at their largest), the resized model is the
    model the factory builds at those counts (`Subject.build_at`) once given the resized weights:
    the same state_dict keys and shapes, buffers, outputs and plain attributes anywhere in the
    model, config objects included. An attribute the fresh build sets from the count while the
    resize left it at its old value is a counter the plugin forgot to declare, even where the
    outputs at another count merely differ (which `check_forward_at_every_count` accepts)."""
    from surgery.engine import counts, tokens

    model, inputs = _fresh(subject)
    original = snapshot(model, identity=False)
    for plan in _plans(subject.trials(model), lambda tried: tried, max):
        where = f"inside tokens({_kw(plan)})"
        with tokens(model, **plan):
            fresh = subject.build_at(counts(model), f"{where}: ")
            assert_matches_fresh_build(model, fresh, original, subject, inputs, where)


def check_grow_shrink_roundtrip(subject: Subject) -> None:
    """Growing (default `restore` init) then shrinking back (default `truncate`) gives back the
    same state_dict, attributes and outputs; per site, then all sites at once."""
    from surgery.engine import counts

    model, inputs = _fresh(subject)
    original = counts(model)
    grown = {name: [n for n in tried if n > original[name]] for name, tried in subject.trials(model).items()}
    for plan in _plans(grown, lambda ups: ups, max):
        back = {name: original[name] for name in plan}
        before = snapshot(model, subject, inputs, identity=False)
        _resize(model, "grow", **plan)
        subject.run(model, inputs, f" after resize({_kw(plan)})")
        _resize(model, "shrink back", **back)
        assert_unchanged(model, before, subject, inputs, f"resize({_kw(plan)}) then resize({_kw(back)})")


def check_shrink_restore_roundtrip(subject: Subject) -> None:
    """Shrinking (default `truncate`) then growing back (default `restore`) brings the dropped
    tokens back bit-exactly. A site at its minimum is grown first so there is something to drop.
    Then all sites shrink at once and come back one by one, the last shrunk first (a later site's
    stash may hold rows of an earlier one's tensor)."""
    from surgery.engine import counts

    model, inputs = _fresh(subject)
    original, tries = counts(model), subject.trials(model)
    for name, tried in tries.items():
        base = original[name]
        if tried and min(tried) > base:
            base = max(tried)
            _resize(model, "grow first", **{name: base}, init="normal", seed=subject.seed + 1)
        for n in sorted({*tried, original[name]} - {base}):
            if n < base:
                before = snapshot(model, subject, inputs, identity=False)
                _resize(model, "shrink", **{name: n})
                subject.run(model, inputs, f" after resize({name}={n})")
                _resize(model, "restore", **{name: base})
                assert_unchanged(model, before, subject, inputs, f"resize({name}={n}) then resize({name}={base})")
        if base != original[name]:
            _resize(model, "shrink to the original count", **{name: original[name]})
    downs = {name: min(tried) for name, tried in tries.items() if tried and min(tried) < original[name]}
    if len(downs) > 1:
        before = snapshot(model, subject, inputs, identity=False)
        _resize(model, "shrink all", **downs)
        for name in reversed(list(downs)):
            _resize(model, "restore", **{name: original[name]})
        assert_unchanged(model, before, subject, inputs, f"resize({_kw(downs)}) then each back, last first")


class _BodyError(Exception):
    """Raised by the kit inside a `tokens(...)` body, to check the restore on an exception."""


def check_tokens_restores(subject: Subject) -> None:
    """`tokens(...)` shows the body the requested counts, then puts back the very same tensors,
    parameters, counters and engine state, on a normal exit and when the body raises."""
    from surgery.engine import counts, tokens

    model, inputs = _fresh(subject)
    before = snapshot(model, subject, inputs)
    for plan in _plans(subject.trials(model), lambda tried: tried, min):
        with tokens(model, **plan):
            inside = counts(model)
            assert inside == {**inside, **plan}, f"inside tokens({_kw(plan)}) the counts are {inside}"
            subject.run(model, inputs, f" inside tokens({_kw(plan)})")
        assert_unchanged(model, before, subject, inputs, f"after tokens({_kw(plan)})")
        with contextlib.suppress(_BodyError), tokens(model, **plan):
            raise _BodyError("raised by the body")
        assert_unchanged(model, before, subject, inputs, f"after tokens({_kw(plan)}) whose body raised")


def _recipe_steps(now: Mapping[str, int], tries: Mapping[str, list[int]], seed: int) -> list[dict]:
    """Per site: grow to the largest tried count (init="normal", seeded), pool down to the smallest
    non-zero one, grow again with init="mean" (or a seeded "normal" from zero tokens)."""
    steps = []
    for name, tried in tries.items():
        cur, counts = now[name], [*tried, now[name]]
        if tried and max(tried) > cur:
            cur = max(tried)
            steps.append({name: cur, "init": "normal", "seed": seed + 11})
        lower = [n for n in counts if n < cur]
        if lower:
            cur = min([n for n in lower if n > 0] or lower)
            steps.append({name: cur, "shrink": "pool"})
        if tried and max(counts) > cur:
            init = {"init": "mean"} if cur > 0 else {"init": "normal", "seed": seed + 13}
            cur = max(counts)
            steps.append({name: cur, **init})
    return steps


def check_recipe_replays(subject: Subject) -> None:
    """`surgery.recipe(model)` replayed on a fresh model (directly and through its JSON) gives the
    same state_dict and outputs: seeded `normal`, `mean` and `pool` steps over every site."""
    from surgery.engine import Recipe, counts, recipe

    model, inputs = _fresh(subject)
    steps = _recipe_steps(counts(model), subject.trials(model), subject.seed)
    for step in steps:
        _resize(model, "recipe step", **step)
    made = recipe(model)
    for how, replayed in (("replay", made), ("replay from JSON", Recipe.from_json(made.to_json()))):
        fresh = subject.build()
        replayed.replay(fresh)
        assert_same_model(model, fresh, inputs, subject.forward,
                          context=f"{how} of the recipe {made.steps} on a fresh model differs from the original")


@contextlib.contextmanager
def _failing_edit(method: str, on_call: int) -> Iterator[dict]:
    """`Edit.<method>` raises InjectedFailure on its `on_call`-th call; yields {calls, fired}."""
    from unittest import mock

    from surgery.edit import Edit

    original, state = getattr(Edit, method), {"calls": 0, "fired": False}

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        state["calls"] += 1
        if state["calls"] == on_call:
            state["fired"] = True
            raise InjectedFailure(f"injected failure in Edit.{method} (call {on_call})")
        return original(self, *args, **kwargs)

    with mock.patch.object(Edit, method, failing):
        yield state


@contextlib.contextmanager
def _failing_plugin(hook: str, on_call: int) -> Iterator[dict]:
    """A plugin, registered for the block, whose `hook` raises InjectedFailure on its `on_call`-th call."""
    from surgery.hookspecs import hookimpl
    from surgery.plugins import get_host

    state = {"calls": 0, "fired": False}

    def fail(*args: Any) -> None:
        state["calls"] += 1
        if state["calls"] == on_call:
            state["fired"] = True
            raise InjectedFailure(f"injected failure in {hook} (call {on_call})")

    impl = (lambda model, backbone, change: fail()) if hook == "surgery_apply_count" else \
        (lambda model, backbone, changes: fail())
    name, pm = "surgery.testing:failing-plugin", get_host().pm
    pm.register(types.SimpleNamespace(**{hook: hookimpl(impl)}), name=name)
    try:
        yield state
    finally:
        pm.unregister(name=name)


def _expect_rollback(action: Callable[[], Any], state: dict, context: str) -> bool:
    """Run `action` under an injected failure; it must surface as a SurgeryError. False when the
    failure was never reached (the action then ran as usual)."""
    from surgery.errors import SurgeryError

    try:
        action()
    except SurgeryError:
        return True
    except Exception as exc:
        if not state["fired"]:
            raise
        raise AssertionError(f"{context}: the failure surfaced as {type(exc).__name__}: {exc}, "
                             f"not as a surgery.errors.SurgeryError") from exc
    if state["fired"]:
        raise AssertionError(f"{context}: succeeded although the injected failure fired (an error was swallowed)")
    return False


def _spread(n: int, limit: int) -> list[int]:
    """At most `limit` of 1..n, evenly spread, always the first and the last."""
    return list(range(1, n + 1)) if n <= limit else sorted({1 + round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def check_atomic_on_injected_failure(subject: Subject) -> None:
    """A failure at any step of a resize (the k-th `Edit.set_tensor` / `Edit.set_attr` raising, as
    out-of-memory would) leaves the model bit-identical, same objects, and raises a SurgeryError."""
    from surgery.engine import resize, tokens

    model, inputs = _fresh(subject)
    before = snapshot(model, subject, inputs)
    for name, tried in subject.trials(model).items():
        plan = {name: max(tried) if max(tried) > before.counts[name] else min(tried)} if tried else {}
        for method in ("set_tensor", "set_attr") if plan else ():
            with _failing_edit(method, on_call=0) as counted, tokens(model, **plan):
                calls = counted["calls"]  # how many calls a successful change makes
            for k in _spread(calls, MAX_INJECTIONS):
                where = f"resize({_kw(plan)}) with Edit.{method} failing on call {k}"
                with _failing_edit(method, k) as state:
                    reached = _expect_rollback(lambda: resize(model, **plan), state, where)
                if not reached:  # the change went through: start again from a fresh model
                    model, inputs = _fresh(subject)
                    before = snapshot(model, subject, inputs)
                assert_unchanged(model, before, subject, inputs, where)


def check_atomic_on_failing_plugin(subject: Subject) -> None:
    """A plugin raising in `surgery_apply_count` or a before/after-resize event (in `resize`, on
    entering `tokens`, or in its restore on the way out) leaves the model bit-identical and
    surfaces as a SurgeryError."""
    from surgery.engine import resize, tokens

    def enter_tokens(model: Any, plan: dict) -> None:
        with tokens(model, **plan):
            pass

    model, inputs = _fresh(subject)
    before = snapshot(model, subject, inputs)
    cases = [(hook, 1, op) for hook in ("surgery_apply_count", "surgery_before_resize", "surgery_after_resize")
             for op in ("resize", "tokens")]
    cases += [("surgery_before_resize", 2, "tokens"), ("surgery_after_resize", 2, "tokens")]  # on the way out
    for plan in _plans(subject.trials(model), lambda tried: tried[-1:], None):
        for hook, on_call, op in cases:
            where = f"{op}({_kw(plan)}) with a plugin failing in {hook} (call {on_call})"
            action = (lambda: resize(model, **plan)) if op == "resize" else (lambda: enter_tokens(model, plan))
            with _failing_plugin(hook, on_call) as state:
                reached = _expect_rollback(action, state, where)
            if not reached and op == "resize":  # the change went through: start again
                model, inputs = _fresh(subject)
                before = snapshot(model, subject, inputs)
            assert_unchanged(model, before, subject, inputs, where)


def check_submodels_compose(subject: Subject) -> None:
    """A model that contains another backbone's model (`surgery_submodels`, `surgery.compose`) shows
    that sub-model's sites as its own: the same names, counts and tensors the sub-model has alone;
    and changing one through the composed model changes the sub-model exactly as changing it alone
    does. Passes at once for a model without sub-models."""
    from surgery.compose import parts
    from surgery.engine import backbone_of, sites

    model, _ = _fresh(subject)
    backbone = backbone_of(model)
    composed, tries = sites(model, backbone), subject.trials(model)
    for part in parts(model, backbone)[1:]:
        alone = sites(part.model, part.backbone)
        for name, site in alone.items():
            where = f"site {name!r} of the {part.backbone!r} sub-model at {part.path!r}"
            assert name in composed, f"{where} is missing from the composed model's sites {list(composed)}"
            shown = composed[name]
            assert shown.count == site.count and shown.part == part.path, \
                f"{where}: the composed model shows count {shown.count} at part {shown.part!r}, alone {site.count}"
            assert [(id(t.module), t.name, t.axis) for t in shown.tensors] == \
                [(id(t.module), t.name, t.axis) for t in site.tensors], f"{where}: other tensors when composed"
        for name in (n for n in alone if tries.get(n)):
            count = max(tries[name])  # a growth: rows to compare
            through, direct = subject.build(), subject.build()
            _resize(through, f"{name} through the composed model", **{name: count})
            _resize(direct.get_submodule(part.path), f"{name} on the sub-model alone", backbone=part.backbone,
                    **{name: count})
            assert_same_model(through.get_submodule(part.path), direct.get_submodule(part.path),
                              context=f"{name} -> {count} through the composed model and on the {part.backbone!r} "
                                      f"sub-model alone give different sub-models")


CHECKS: tuple[Callable[[Subject], None], ...] = (
    check_factory_deterministic,
    check_same_count_is_noop,
    check_counters_follow,
    check_submodels_compose,
    check_forward_at_every_count,
    check_matches_fresh_build,
    check_grow_shrink_roundtrip,
    check_shrink_restore_roundtrip,
    check_tokens_restores,
    check_recipe_replays,
    check_atomic_on_injected_failure,
    check_atomic_on_failing_plugin,
)
