"""The conformance kit for backbone plugins (also the `surgery` pytest plugin).

A backbone plugin only *describes* its token sites; whether that description is complete (every
coupled row, every counter, every change through the journal) shows only when counts change.
The kit changes them in every way the engine promises to handle and checks the promises bit for
bit. A plugin's test suite runs it against its own model factory:

    from surgery.testing import ConformanceSuite

    TestTinyConformance = ConformanceSuite.for_model("my_tiny_test")   # a registered model

    class TestMyBackbone(ConformanceSuite):                             # or any factory
        counts = {"prompts": [0, 1, 8]}        # counts to try per site (default: around the current)
        def make_model(self): return MyModel(prompts=4)
        def make_inputs(self, model): return (torch.randn(2, 5, model.dim),)

or, outside a test class, `check_conformance(factory, example_inputs, ...)`, which runs every
check and raises AssertionError naming the first broken promise. Checks (in `CHECKS` order):
the factory is deterministic; a resize to the current counts is a no-op; declared counters and
tensor extents follow the count; forward runs (finite, changed outputs) at every tried count;
grow-then-shrink and shrink-then-restore round trips are bit-exact; `tokens(...)` restores the
same objects, also when its body raises; a recipe replays on a fresh model; an injected failure
(in `Edit.set_tensor` / `Edit.set_attr`, or in a plugin's hook) leaves the model bit-identical and
surfaces as a `SurgeryError`.

pytest loads this module in every run of the environment (entry point `pytest11`), so it imports
only pytest at module level; torch and the engine are imported when a check runs. It provides
the `surgery_host` fixture: a fresh plugin host installed for one test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pytest

__all__ = [
    "CHECKS", "ConformanceSuite", "InjectedFailure", "Snapshot", "Subject", "assert_same_model",
    "check_conformance", "plugin_host", "snapshot", "surgery_host",
]

InjectCount = 8  # most injection points tried per site and method (spread over all of them)


class InjectedFailure(RuntimeError):
    """The failure the kit injects; the engine must turn it into a `SurgeryError` after rolling back."""


# -- the model under test ------------------------------------------------------------------------


@dataclasses.dataclass
class Subject:
    """How to build, feed and run the model under test, and which counts to try on it.

    `counts` maps a site name to the counts to try (sites left out get defaults around their
    current count; `[]` skips a site). `ignore_attributes` names plain attributes that may
    legitimately differ after a restore (a cache a plugin drops in `surgery_before_resize`), as
    `attr` or `path.attr` (`<model>.attr` for the root module).
    """

    factory: Callable[[], Any]
    example_inputs: Callable[[Any], tuple] | tuple
    forward: Callable[..., Any] | None = None
    counts: Mapping[str, Iterable[int]] | None = None
    seed: int = 0
    expect_output_change: bool = True
    ignore_attributes: Sequence[str] = ()

    def build(self) -> Any:
        """A fresh model from `torch.manual_seed(seed)`, in eval mode (dropout would defeat bit-exact checks)."""
        import torch

        torch.manual_seed(self.seed)
        return self.factory().eval()

    def inputs(self, model: Any) -> tuple:
        inputs = self.example_inputs(model) if callable(self.example_inputs) else self.example_inputs
        return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)

    def run(self, model: Any, inputs: tuple, context: str = "") -> tuple:
        """The forward's tensors, flattened; a forward that raises is a failed check, said where."""
        import torch

        try:
            with torch.no_grad():
                out = self.forward(model, *inputs) if self.forward is not None else model(*inputs)
        except Exception as exc:
            raise AssertionError(f"forward failed{context}: {type(exc).__name__}: {exc}") from exc
        return _flatten(out)

    def trials(self, model: Any) -> dict[str, list[int]]:
        """{site: counts to try, other than the current one}, every one allowed by the site."""
        from surgery.engine import sites

        found = sites(model)
        chosen = dict(self.counts or {})
        unknown = sorted(set(chosen) - set(found))
        if unknown:
            raise AssertionError(f"counts names sites the model does not have: {unknown}; its sites: {list(found)}")
        tries = {}
        for name, site in found.items():
            c = site.count
            wanted = chosen.get(name, (site.min, c - site.step, c + site.step, c + 2 * site.step))
            if name in chosen:
                bad = {n: site.violation(n) for n in wanted if site.violation(n)}
                if bad:
                    raise AssertionError(f"counts for site {name!r} are not allowed: {bad}; allowed: {site.allowed()}")
            tries[name] = sorted({n for n in wanted if n != c and site.violation(n) is None})
        return tries


def _flatten(out: Any) -> tuple:
    import torch

    if out is None:
        return ()
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, Mapping):
        return tuple(t for value in out.values() for t in _flatten(value))
    if isinstance(out, (tuple, list)):
        return tuple(t for value in out for t in _flatten(value))
    raise AssertionError(f"forward must return tensors (or tuples/dicts of them), got {type(out).__name__}")


# -- snapshots and comparisons -------------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    """Everything a resize may touch, captured for a bit-exact comparison later.

    `identity=True` also records object identities (parameters, their storage, submodules, the
    objects held in attributes): what `tokens(...)` and a rolled-back resize must give back.
    """

    counts: dict[str, int]
    keys: tuple[str, ...]  # state_dict keys, in order
    tensors: dict[str, Any]  # state_dict entries and every buffer, cloned
    objects: dict[str, Any]  # parameters, buffers and submodules: identities, or types
    attributes: dict[str, Any]  # every plain attribute of every module, frozen
    outputs: tuple | None
    identity: bool


def snapshot(model: Any, subject: Subject | None = None, inputs: tuple | None = None, *,
             identity: bool = True) -> Snapshot:
    """Capture `model` (and its outputs on `inputs`, when a subject runs it). The forward runs
    first, so a cache it fills is part of the snapshot.

    Attributes are seen as `getattr` sees them (a `None` entry of `_parameters` reads as a None
    attribute). Without `identity`, a key a counter declares on a mapping (timm's `_model_args`)
    counts as its declared value while absent: the mapping records only what differs from the
    defaults, so a round trip may add the key with the default value.
    """
    from surgery.engine import STATE_ATTR, counts, sites

    outputs = subject.run(model, inputs, " while taking a snapshot") if subject is not None else None
    state = model.state_dict()
    tensors = {k: v.detach().clone() for k, v in state.items()}
    objects: dict[str, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        objects[f"parameter {name}"] = (id(p), p.data_ptr(), p.requires_grad) if identity else p.requires_grad
    for name, b in model.named_buffers(remove_duplicate=False):
        tensors.setdefault(name, b.detach().clone())
        objects[f"buffer {name}"] = (id(b), b.data_ptr()) if identity else type(b).__name__
    mapping_keys: dict[int, set] = {}  # id(mapping) -> keys declared as counters
    attributes = {}
    for name, site in sites(model).items():
        for c in site.counters:
            if isinstance(c.target, Mapping) and not identity:
                mapping_keys.setdefault(id(c.target), set()).add(c.attr)
                value = c.target[c.attr] if c.attr in c.target else c.value_for(site.count)
                attributes[f"counter {c.attr!r} of site {name!r}"] = _freeze(value, identity)
    for path, module in model.named_modules(remove_duplicate=False):
        objects[f"module {path or '<model>'}"] = id(module) if identity else type(module).__qualname__
        seen = {k: v for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")}
        seen.update({k: None for table in (module._parameters, module._buffers) for k, v in table.items() if v is None})
        if not identity:
            seen.pop(STATE_ATTR, None)  # the engine's recipe and stash: they grow with every resize
        for attr, value in seen.items():
            if isinstance(value, Mapping) and id(value) in mapping_keys:
                value = {k: v for k, v in value.items() if k not in mapping_keys[id(value)]}
            attributes[f"{path or '<model>'}.{attr}"] = _freeze(value, identity)
    return Snapshot(counts(model), tuple(state), tensors, objects, attributes, outputs, identity)


_PLAIN = (str, bytes, complex, type(None))


def _freeze(value: Any, identity: bool, depth: int = 0) -> Any:
    """A hashable, comparable stand-in for an attribute's value: plain values and containers by
    value, tensors and other objects by identity (or by type, when comparing two models)."""
    import torch

    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int) or isinstance(value, _PLAIN) or isinstance(value, (torch.dtype, torch.device)):
        return value
    if isinstance(value, float):
        return ("float", repr(value))  # repr: nan equals nan, -0.0 differs from 0.0
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value)) if identity else ("tensor", tuple(value.shape), str(value.dtype))
    if depth < 4 and isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v, identity, depth + 1) for v in value))
    if depth < 4 and isinstance(value, Mapping):
        return (type(value).__name__,
                tuple((_freeze(k, identity, depth + 1), _freeze(v, identity, depth + 1)) for k, v in value.items()))
    if depth < 4 and isinstance(value, (set, frozenset)):
        return ("set", frozenset(_freeze(v, identity, depth + 1) for v in value))
    return ("object", type(value).__qualname__, id(value)) if identity else ("object", type(value).__qualname__)


def _differences(before: Snapshot, after: Snapshot, ignore: Sequence[str] = ()) -> list[str]:
    import torch

    problems = []
    if before.counts != after.counts:
        problems.append(f"counts {before.counts} became {after.counts}")
    if before.keys != after.keys:
        missing, extra = set(before.keys) - set(after.keys), set(after.keys) - set(before.keys)
        problems.append(f"state_dict keys changed: missing {sorted(missing)}, extra {sorted(extra)}"
                        if missing or extra else "state_dict keys are in another order")
    for key, a in before.tensors.items():
        b = after.tensors.get(key)
        if b is None:
            continue
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            problems.append(f"tensor {key}: {tuple(a.shape)} {a.dtype} became {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(a, b):
            problems.append(f"tensor {key}: values differ{_max_diff(a, b)}")
    for key, a in before.objects.items():
        if key in after.objects and after.objects[key] != a:
            what = "is another object" if before.identity else f"{a} became {after.objects[key]}"
            problems.append(f"{key} {what}")
    for key in sorted(set(before.objects) ^ set(after.objects)):
        problems.append(f"{key} {'disappeared' if key in before.objects else 'appeared'}")
    for key in sorted(set(before.attributes) | set(after.attributes)):
        if key.rsplit(".", 1)[-1] in ignore or key in ignore:
            continue
        a, b = before.attributes.get(key, "<absent>"), after.attributes.get(key, "<absent>")
        if a != b:
            problems.append(f"attribute {key}: {_short(a)} became {_short(b)}")
    if before.outputs is not None and after.outputs is not None:
        problems.extend(_output_differences(before.outputs, after.outputs))
    return problems


def _output_differences(a: tuple, b: tuple) -> list[str]:
    import torch

    if len(a) != len(b):
        return [f"forward returned {len(a)} tensors, now {len(b)}"]
    problems = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"output {i}: {tuple(x.shape)} {x.dtype} became {tuple(y.shape)} {y.dtype}")
        elif not torch.equal(x, y):
            problems.append(f"output {i}: values differ{_max_diff(x, y)}")
    return problems


def _max_diff(a: Any, b: Any) -> str:
    if a.is_floating_point() and a.numel():
        return f" (max abs difference {(a.double() - b.double()).abs().max().item():.3g})"
    return ""


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _assert_no_differences(problems: list[str], context: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise AssertionError(f"{context}:\n  {shown}")


def _assert_unchanged(model: Any, before: Snapshot, subject: Subject, inputs: tuple, context: str) -> None:
    after = snapshot(model, subject, inputs, identity=before.identity)
    _assert_no_differences(_differences(before, after, subject.ignore_attributes),
                           f"{context}: the model is not what it was")


def assert_same_model(a: Any, b: Any, inputs: tuple | None = None, forward: Callable | None = None,
                      context: str = "the two models differ") -> None:
    """Assert two models are the same: state_dict keys (and order), every entry `torch.equal`,
    counts from `surgery.counts`, plain attributes, and the outputs on `inputs` when given."""
    subject = Subject(factory=lambda: None, example_inputs=inputs or (), forward=forward) if inputs is not None else None
    first = snapshot(a, subject, inputs, identity=False)
    second = snapshot(b, subject, inputs, identity=False)
    _assert_no_differences(_differences(first, second), context)


# -- the checks ----------------------------------------------------------------------------------


def _fresh(subject: Subject) -> tuple[Any, tuple]:
    model = subject.build()
    return model, subject.inputs(model)


def _resize(model: Any, context: str, **kwargs: Any) -> None:
    """`surgery.resize`, with a refusal reported as a failed check that says which step refused."""
    from surgery.engine import resize
    from surgery.errors import SurgeryError

    try:
        resize(model, **kwargs)
    except SurgeryError as exc:
        raise AssertionError(f"{context}: resize({_kw(kwargs)}) raised {type(exc).__name__}: {exc}") from exc


def _kw(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


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
    changes = resize(model, **before.counts)
    assert changes == {}, f"resize to the current counts {before.counts} reported changes {changes}"
    _assert_unchanged(model, before, subject, inputs, f"resize({_kw(before.counts)}) (the current counts)")
    with tokens(model, **before.counts):
        _assert_unchanged(model, before, subject, inputs, f"inside tokens({_kw(before.counts)}) (the current counts)")
    _assert_unchanged(model, before, subject, inputs, f"after tokens({_kw(before.counts)}) (the current counts)")


def check_counters_follow(subject: Subject) -> None:
    """At every tried count, every site reports it, every declared counter reads what its site
    says it should, and every declared tensor grew or shrank by exactly the change."""
    from surgery.engine import sites, tokens

    model, _ = _fresh(subject)
    _check_declared(sites(model), "on the freshly built model")
    start = sites(model)
    extents = {name: {_tensor_key(t): _extent(t) for t in site.tensors} for name, site in start.items()}
    for name, tried in subject.trials(model).items():
        for n in tried:
            where = f"inside tokens({name}={n})"
            with tokens(model, **{name: n}):
                now = sites(model)
                assert now[name].count == n, f"{where}: site {name!r} reports count {now[name].count}"
                _check_declared(now, where)
                for t in now[name].tensors:
                    old = extents[name].get(_tensor_key(t))
                    if old is not None and _extent(t) - old != n - start[name].count:
                        raise AssertionError(f"{where}: tensor {t.name!r} of site {name!r} changed its extent "
                                             f"along axis {t.axis} from {old} to {_extent(t)}, "
                                             f"not by {n - start[name].count}")


def _check_declared(found: Mapping[str, Any], where: str) -> None:
    for name, site in found.items():
        for counter in site.counters:
            target, want = counter.target, counter.value_for(site.count)
            if isinstance(target, Mapping) and counter.attr not in target:
                continue  # unset: the mapping records only non-default arguments
            if not isinstance(target, Mapping) and not hasattr(target, counter.attr):
                raise AssertionError(f"{where}: site {name!r} declares a counter {type(target).__name__}."
                                     f"{counter.attr}, which the model does not have")
            have = counter.current()
            if have != want or type(have) is not type(want):
                raise AssertionError(f"{where}: counter {type(counter.target).__name__}.{counter.attr} of site "
                                     f"{name!r} reads {have!r}, its declaration says {want!r} for count {site.count}")


def _tensor_key(t: Any) -> tuple[int, str]:
    return id(t.module), t.name


def _extent(t: Any) -> int:
    return 0 if t.current() is None else t.viewed().shape[t.axis]


def check_forward_at_every_count(subject: Subject) -> None:
    """The model runs at every tried count (each site alone, then all at their largest), gives
    finite outputs of the same structure, and (`expect_output_change`) different ones: a site
    whose count does not reach the forward is missing a counter or a coupled tensor."""
    import torch
    from surgery.engine import tokens

    model, inputs = _fresh(subject)
    base = subject.run(model, inputs, " on the freshly built model")
    tries = subject.trials(model)
    plans = [{name: n} for name, tried in tries.items() for n in tried]
    if sum(1 for tried in tries.values() if tried) > 1:
        plans.append({name: max(tried) for name, tried in tries.items() if tried})
    for plan in plans:
        where = f" inside tokens({_kw(plan)})"
        with tokens(model, **plan):
            out = subject.run(model, inputs, where)
        assert len(out) == len(base), f"forward returned {len(base)} tensors, {len(out)}{where}"
        for i, o in enumerate(out):
            if (o.is_floating_point() or o.is_complex()) and not torch.isfinite(o).all():
                raise AssertionError(f"output {i} is not finite{where}")
        if subject.expect_output_change and not _output_differences(base, out):
            raise AssertionError(f"outputs are bit-identical to the original ones{where}: the new count does not "
                                 f"reach the forward (an undeclared counter or coupled tensor?); set "
                                 f"expect_output_change=False if that is intended")


def check_grow_shrink_roundtrip(subject: Subject) -> None:
    """Growing a site (default `restore` init) and shrinking it back (default `truncate`) gives
    back the very same state_dict, attributes and outputs; also for all sites at once."""
    from surgery.engine import counts

    model, inputs = _fresh(subject)
    tries, original = subject.trials(model), counts(model)
    plans = [{name: n} for name, tried in tries.items() for n in tried if n > original[name]]
    if len(plans) > 1 and len({next(iter(p)) for p in plans}) > 1:
        plans.append({name: max(tried) for name, tried in tries.items() if tried and max(tried) > original[name]})
    for plan in plans:
        back = {name: original[name] for name in plan}
        before = snapshot(model, subject, inputs, identity=False)
        _resize(model, "grow", **plan)
        subject.run(model, inputs, f" after resize({_kw(plan)})")
        _resize(model, "shrink back", **back)
        _assert_unchanged(model, before, subject, inputs, f"resize({_kw(plan)}) then resize({_kw(back)})")


def check_shrink_restore_roundtrip(subject: Subject) -> None:
    """Shrinking a site (default `truncate`) and growing it back (default `restore`) brings the
    dropped tokens back bit-exactly. A site at its minimum is first grown (init="normal") so
    there is something to drop."""
    from surgery.engine import counts

    model, inputs = _fresh(subject)
    original = counts(model)
    for name, tried in subject.trials(model).items():
        base = original[name]
        if not [n for n in tried if n < base] and tried:
            base = max(tried)
            _resize(model, "grow first", **{name: base}, init="normal", seed=subject.seed + 1)
        for n in sorted({*tried, original[name]}):
            if n >= base:
                continue
            before = snapshot(model, subject, inputs, identity=False)
            _resize(model, "shrink", **{name: n})
            subject.run(model, inputs, f" after resize({name}={n})")
            _resize(model, "restore", **{name: base})
            _assert_unchanged(model, before, subject, inputs, f"resize({name}={n}) then resize({name}={base})")
        if base != original[name]:
            _resize(model, "shrink to the original count", **{name: original[name]})
    downs = {name: min(t) for name, t in subject.trials(model).items() if t and min(t) < original[name]}
    if len(downs) > 1:
        before = snapshot(model, subject, inputs, identity=False)
        _resize(model, "shrink all", **downs)
        for name in reversed(list(downs)):  # last dropped, first restored: a later site's stash may
            _resize(model, "restore", **{name: original[name]})  # hold rows of an earlier one's tensor
        _assert_unchanged(model, before, subject, inputs, f"resize({_kw(downs)}) then each back, in reverse")


class _BodyError(Exception):
    """Raised inside a `tokens(...)` body by the kit, to check the restore on an exception."""


def check_tokens_restores(subject: Subject) -> None:
    """`tokens(...)` puts back the same tensor objects, parameters, counters and engine state, on
    a normal exit and when the body raises; the body sees the requested counts."""
    from surgery.engine import counts, tokens

    model, inputs = _fresh(subject)
    before = snapshot(model, subject, inputs)
    tries = subject.trials(model)
    plans = [{name: n} for name, tried in tries.items() for n in tried]
    if sum(1 for tried in tries.values() if tried) > 1:
        plans.append({name: min(tried) for name, tried in tries.items() if tried})
    for plan in plans:
        with tokens(model, **plan):
            inside = counts(model)
            assert all(inside[k] == v for k, v in plan.items()), f"inside tokens({_kw(plan)}) the counts are {inside}"
            subject.run(model, inputs, f" inside tokens({_kw(plan)})")
        _assert_unchanged(model, before, subject, inputs, f"after tokens({_kw(plan)})")
        try:
            with tokens(model, **plan):
                raise _BodyError("raised by the body")
        except _BodyError:
            pass
        _assert_unchanged(model, before, subject, inputs, f"after tokens({_kw(plan)}) whose body raised")


def _recipe_steps(now: Mapping[str, int], tries: Mapping[str, list[int]], seed: int) -> list[dict]:
    """Per site: grow to the largest tried count (init="normal", seeded), pool down to the smallest
    non-zero one, grow again with init="mean" (or "normal" from zero tokens)."""
    steps = []
    for name, tried in tries.items():
        if not tried:
            continue
        cur = now[name]
        if max(tried) > cur:
            cur = max(tried)
            steps.append({name: cur, "init": "normal", "seed": seed + 11})
        lower = [n for n in tried + [now[name]] if n < cur]
        if lower:
            cur = min([n for n in lower if n > 0] or lower)
            steps.append({name: cur, "shrink": "pool"})
        higher = [n for n in tried + [now[name]] if n > cur]
        if higher:
            init = {"init": "mean"} if cur > 0 else {"init": "normal", "seed": seed + 13}
            cur = max(higher)
            steps.append({name: cur, **init})
    return steps


def check_recipe_replays(subject: Subject) -> None:
    """`surgery.recipe(model)` replayed on a fresh model (directly and through its JSON) gives the
    same state_dict and outputs, for seeded `normal`, `mean` and `pool` steps across all sites."""
    from surgery.engine import Recipe, counts, recipe

    model, inputs = _fresh(subject)
    steps = _recipe_steps(counts(model), subject.trials(model), subject.seed)
    for step in steps:
        _resize(model, "recipe step", **step)
    if not steps:
        return
    made = recipe(model)
    for how, replayed in (("replay", made), ("replay from JSON", Recipe.from_json(made.to_json()))):
        fresh = subject.build()
        replayed.replay(fresh)
        assert_same_model(model, fresh, inputs, subject.forward,
                          context=f"{how} of the recipe {made.steps} on a fresh model differs from the original")


@contextlib.contextmanager
def _failing_edit(method: str, on_call: int) -> Iterator[dict]:
    """Make `Edit.<method>` raise `InjectedFailure` on its `on_call`-th call; yields {'fired': bool}."""
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
def _failing_plugin(hook: str, on_call: int = 1) -> Iterator[dict]:
    """A plugin whose `hook` raises `InjectedFailure` on its `on_call`-th call, registered for the block."""
    from surgery.hookspecs import hookimpl
    from surgery.plugins import get_host

    state = {"calls": 0, "fired": False}

    def fail() -> None:
        state["calls"] += 1
        if state["calls"] == on_call:
            state["fired"] = True
            raise InjectedFailure(f"injected failure in {hook} (call {on_call})")

    if hook == "surgery_apply_count":
        impl = hookimpl(lambda model, backbone, change: fail())
    else:
        impl = hookimpl(lambda model, backbone, changes: fail())
    pm = get_host().pm
    name = "surgery.testing:failing-plugin"
    pm.register(types.SimpleNamespace(**{hook: impl}), name=name)
    try:
        yield state
    finally:
        pm.unregister(name=name)


def _expect_rollback(action: Callable[[], Any], state: dict, context: str) -> bool:
    """Run `action` under an injected failure. Returns False when the failure was never reached
    (the action then ran normally); raises AssertionError unless it surfaced as a SurgeryError."""
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
        raise AssertionError(f"{context}: the operation succeeded although the injected failure fired "
                             f"(something swallowed the error)")
    return False


def _calls_while_entering_tokens(model: Any, method: str, plan: Mapping[str, int]) -> int:
    from surgery.engine import tokens

    with _failing_edit(method, on_call=-1) as state:
        with tokens(model, **plan):
            return state["calls"]


def _spread(n: int, limit: int) -> list[int]:
    """At most `limit` of 1..n, always the first and the last."""
    if n <= limit:
        return list(range(1, n + 1))
    return sorted({1 + round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def check_atomic_on_injected_failure(subject: Subject) -> None:
    """A failure at any point of a resize (the k-th `Edit.set_tensor` / `Edit.set_attr` raising, as
    out-of-memory would) leaves the model bit-identical (same objects) and raises a SurgeryError."""
    from surgery.engine import resize

    model, inputs = _fresh(subject)
    before = snapshot(model, subject, inputs)
    for name, tried in subject.trials(model).items():
        if not tried:
            continue
        plan = {name: max(tried) if max(tried) > before.counts[name] else min(tried)}
        for method in ("set_tensor", "set_attr"):
            for k in _spread(_calls_while_entering_tokens(model, method, plan), InjectCount):
                where = f"resize({_kw(plan)}) with Edit.{method} failing on call {k}"
                with _failing_edit(method, k) as state:
                    if not _expect_rollback(lambda: resize(model, **plan), state, where):
                        model, inputs = _fresh(subject)  # not reached: start over from a fresh model
                        before = snapshot(model, subject, inputs)
                        continue
                _assert_unchanged(model, before, subject, inputs, where)


def check_atomic_on_failing_plugin(subject: Subject) -> None:
    """A plugin raising in `surgery_apply_count` or a before/after-resize event (during `resize`,
    entering `tokens`, or in the restore on leaving it) leaves the model bit-identical and
    surfaces as a SurgeryError."""
    from surgery.engine import resize, tokens

    def enter_tokens(model: Any, plan: dict) -> None:
        with tokens(model, **plan):
            pass

    model, inputs = _fresh(subject)
    before = snapshot(model, subject, inputs)
    plans = [{name: tried[-1]} for name, tried in subject.trials(model).items() if tried]
    cases = [(hook, 1, op) for hook in ("surgery_apply_count", "surgery_before_resize", "surgery_after_resize")
             for op in ("resize", "tokens")]
    cases += [("surgery_before_resize", 2, "tokens"), ("surgery_after_resize", 2, "tokens")]  # on the way out
    for plan in plans:
        for hook, on_call, op in cases:
            where = f"{op}({_kw(plan)}) with a plugin failing in {hook} (call {on_call})"
            action = (lambda: resize(model, **plan)) if op == "resize" else (lambda: enter_tokens(model, plan))
            with _failing_plugin(hook, on_call) as state:
                reached = _expect_rollback(action, state, where)
            if not reached and op == "resize":
                model, inputs = _fresh(subject)
                before = snapshot(model, subject, inputs)
                continue
            _assert_unchanged(model, before, subject, inputs, where)


CHECKS: tuple[Callable[[Subject], None], ...] = (
    check_factory_deterministic,
    check_same_count_is_noop,
    check_counters_follow,
    check_forward_at_every_count,
    check_grow_shrink_roundtrip,
    check_shrink_restore_roundtrip,
    check_tokens_restores,
    check_recipe_replays,
    check_atomic_on_injected_failure,
    check_atomic_on_failing_plugin,
)


def check_conformance(factory: Callable[[], Any] | str, example_inputs: Callable[[Any], tuple] | tuple | None = None,
                      forward: Callable[..., Any] | None = None, counts: Mapping[str, Iterable[int]] | None = None,
                      *, seed: int = 0, expect_output_change: bool = True, ignore_attributes: Sequence[str] = (),
                      checks: Iterable[Callable[[Subject], None]] = CHECKS) -> None:
    """Run every check (or `checks`) on models from `factory`; AssertionError names the first
    broken promise. `factory` may be a registered model name: its `example_inputs` and `forward`
    come from the registration."""
    subject = _subject_for(factory, example_inputs, forward, counts, seed=seed,
                           expect_output_change=expect_output_change, ignore_attributes=ignore_attributes)
    model = subject.build()
    if not any(subject.trials(model).values()):
        raise AssertionError("nothing to check: no site of the model can change its count "
                             "(give counts={site: [...]} or a model config with a resizable site)")
    for check in checks:
        try:
            check(subject)
        except AssertionError as exc:
            raise AssertionError(f"{check.__name__}: {exc}") from exc


def _subject_for(factory: Callable[[], Any] | str, example_inputs: Any, forward: Any, counts: Any,
                 **options: Any) -> Subject:
    if isinstance(factory, str):
        from surgery.engine import build
        from surgery.plugins import get_host

        spec, name = get_host().model_spec(factory), factory
        factory = lambda: build(name)  # noqa: E731
        example_inputs = example_inputs if example_inputs is not None else spec.example_inputs
        forward = forward if forward is not None else spec.forward
        if example_inputs is None:
            raise AssertionError(f"model {name!r} was registered without example_inputs; pass example_inputs=...")
    if example_inputs is None:
        raise AssertionError("check_conformance needs example_inputs: a callable (model) -> tuple, or a tuple")
    return Subject(factory, example_inputs, forward, counts, **options)


# -- plugin hosts (pytest fixture) ---------------------------------------------------------------


@contextlib.contextmanager
def plugin_host(*plugins: Any, entry_points: bool = True) -> Iterator[Any]:
    """Install a fresh `PluginHost` as the process-wide one for the block, with the installed
    entry points (unless `entry_points=False`) and `plugins` added: plugin objects or modules, or
    `(name, plugin)` pairs. A plugin that fails to load fails the test with its recorded error."""
    from surgery.plugins import PluginHost, reset_host

    host = PluginHost()
    if entry_points:
        host.load_entry_points()
    for item in plugins:
        name, plugin = item if isinstance(item, tuple) else (getattr(item, "__name__", type(item).__name__), item)
        if not host.add_plugin(plugin, name):
            raise AssertionError(f"plugin {name!r} did not load: {host.records[name].error}")
    old = reset_host(host)
    try:
        yield host
    finally:
        reset_host(old)


@pytest.fixture
def surgery_host() -> Iterator[Any]:
    """A fresh plugin host with the installed plugins, for one test; add one with
    `surgery_host.add_plugin(plugin, "name")`. The previous host comes back afterwards."""
    with plugin_host() as host:
        yield host


# -- the test class ------------------------------------------------------------------------------


class ConformanceSuite:
    """Base class of a plugin's conformance tests: one test method per check.

    Subclass it in a test module as `class TestMyBackbone(ConformanceSuite)` and give
    `make_model()` and `make_inputs(model)` (optionally `forward(model, *inputs)`, `counts`,
    `seed`, `expect_output_change`, `ignore_attributes`, and `plugins` to register plugins that
    are not installed through entry points). Or bind `ConformanceSuite.for_model(name)` to a
    `Test...` name. The base class itself is never collected (`__test__ = False`); subclasses are.
    """

    __test__ = False
    plugins: Sequence[Any] = ()
    counts: Mapping[str, Iterable[int]] | None = None
    seed = 0
    expect_output_change = True
    ignore_attributes: Sequence[str] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__test__" not in cls.__dict__:
            cls.__test__ = True

    def make_model(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define make_model() (or use ConformanceSuite.for_model)")

    def make_inputs(self, model: Any) -> tuple:
        raise NotImplementedError(f"{type(self).__name__} must define make_inputs(model)")

    def forward(self, model: Any, *inputs: Any) -> Any:
        return model(*inputs)

    @classmethod
    def for_model(cls, name: str, **attributes: Any) -> type:
        """A suite for the model a plugin registered as `name` (its factory, example_inputs and
        forward); `attributes` override class attributes such as `counts`."""
        def spec() -> Any:
            from surgery.plugins import get_host

            return get_host().model_spec(name)

        def make_model(self: Any) -> Any:
            from surgery.engine import build

            return build(name)

        def make_inputs(self: Any, model: Any) -> tuple:
            if spec().example_inputs is None:
                raise AssertionError(f"model {name!r} was registered without example_inputs; "
                                     f"subclass the suite and define make_inputs(model)")
            return spec().example_inputs(model)

        def forward(self: Any, model: Any, *inputs: Any) -> Any:
            run = spec().forward
            return run(model, *inputs) if run is not None else model(*inputs)

        title = "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", name) if part)
        body = {"make_model": make_model, "make_inputs": make_inputs, "forward": forward,
                "model_name": name, "__doc__": f"Conformance of the registered model {name!r}.", **attributes}
        return type(f"Test{title}Conformance", (cls,), body)

    def subject(self) -> Subject:
        return Subject(self.make_model, self.make_inputs, self.forward, self.counts, seed=self.seed,
                       expect_output_change=self.expect_output_change, ignore_attributes=self.ignore_attributes)

    @pytest.fixture(autouse=True)
    def _surgery_plugins(self) -> Iterator[None]:
        """Registers `plugins` (if any) on a fresh host for each test of the suite."""
        if not self.plugins:
            yield
            return
        with plugin_host(*self.plugins):
            yield

    def test_something_to_check(self) -> None:
        subject = self.subject()
        assert any(subject.trials(subject.build()).values()), \
            "no site of the model can change its count: give counts={site: [...]} or another model config"

    def test_factory_is_deterministic(self) -> None:
        check_factory_deterministic(self.subject())

    def test_same_count_is_noop(self) -> None:
        check_same_count_is_noop(self.subject())

    def test_counters_follow_counts(self) -> None:
        check_counters_follow(self.subject())

    def test_forward_at_every_count(self) -> None:
        check_forward_at_every_count(self.subject())

    def test_grow_then_shrink_back_is_exact(self) -> None:
        check_grow_shrink_roundtrip(self.subject())

    def test_shrink_then_restore_is_exact(self) -> None:
        check_shrink_restore_roundtrip(self.subject())

    def test_tokens_restores(self) -> None:
        check_tokens_restores(self.subject())

    def test_recipe_replays_on_fresh_model(self) -> None:
        check_recipe_replays(self.subject())

    def test_atomic_on_injected_failure(self) -> None:
        check_atomic_on_injected_failure(self.subject())

    def test_atomic_on_failing_plugin(self) -> None:
        check_atomic_on_failing_plugin(self.subject())
