"""The model under test, and bit-exact comparisons of models (part of the conformance kit).

A `Subject` says how to build, feed and run a model; a `Snapshot` captures everything a resize
may touch (state_dict, buffers, which objects hold them, every plain attribute of every module,
the outputs), so that "the model is what it was" is one comparison that lists every difference.
It is loaded with the pytest plugin in every pytest run, so torch and the engine are imported
inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from typing import Any, Callable, Iterable, Mapping, Sequence

# Said whenever a forward fails: the kit's inputs are made once, at the counts the factory builds.
INPUTS_HINT = ("\n(the kit makes the inputs once, from the freshly built model, and reuses them at every count: "
               "what depends on a count, like placeholder tokens for the learned ones in a prompt, belongs in "
               "forward(model, *inputs), which sees the model at the count under test)")


@dataclasses.dataclass
class Subject:
    """How to build, feed and run the model under test, and which counts to try on it.

    `counts` maps a site to the counts to try (sites left out get defaults around their current
    count; `[]` skips a site). `ignore_attributes` names plain attributes that may differ after a
    restore (a cache a plugin drops in `surgery_before_resize`): `attr` or `path.attr`.

    `factory()` builds the model under test; `factory(**kwargs)` builds it at other counts, for the
    comparison with a fresh build. The keywords are every site's count, named after the site
    (`prompts=4`; a dotted site `num_cls_tokens.vision` goes in as `num_cls_tokens={"vision": 4}`),
    or what `count_kwargs(counts)` makes of them when the factory spells them otherwise.
    `example_inputs` is called once per model, at the counts the factory builds: the same inputs
    are used at every count (what depends on a count belongs in `forward`).
    """

    factory: Callable[..., Any]
    example_inputs: Callable[[Any], tuple] | tuple
    forward: Callable[..., Any] | None = None
    counts: Mapping[str, Iterable[int]] | None = None
    seed: int = 0
    expect_output_change: bool = True
    ignore_attributes: Sequence[str] = ()
    count_kwargs: Callable[[dict[str, int]], Mapping[str, Any]] | None = None

    def build(self) -> Any:
        """A fresh model after `torch.manual_seed(seed)`, in eval mode (dropout defeats bit-exact checks)."""
        import torch

        torch.manual_seed(self.seed)
        return self.factory().eval()

    def factory_kwargs(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """The factory's keywords for a model at `counts` (every site's count)."""
        if self.count_kwargs is not None:
            return dict(self.count_kwargs(dict(counts)))
        kwargs: dict[str, Any] = {}
        for name, n in counts.items():
            head, dot, key = name.partition(".")
            if dot:
                kwargs.setdefault(head, {})[key] = n
            else:
                kwargs[name] = n
        return kwargs

    def build_at(self, counts: Mapping[str, int], context: str = "") -> Any:
        """`build()`, at `counts`: the factory given them as keywords. A factory that refuses them,
        or builds other counts, fails the check, saying how to give them."""
        import torch
        from surgery.engine import counts as counts_of

        kwargs = self.factory_kwargs(counts)
        how = ("a factory takes every site's count as a keyword named after the site (a dotted site "
               "'a.b' as a={'b': n}), or give count_kwargs: a function from {site: count} to the factory's keywords")
        torch.manual_seed(self.seed)
        try:
            model = self.factory(**kwargs)
        except TypeError as exc:
            raise AssertionError(f"{context}the factory cannot build the model at {dict(counts)}: called with "
                                 f"{_short(kwargs)} it raised TypeError: {exc}; {how}") from exc
        built = counts_of(model)
        if built != dict(counts):
            raise AssertionError(f"{context}the factory, called with {_short(kwargs)}, built a model with counts "
                                 f"{built}, not {dict(counts)}; {how}")
        return model.eval()

    def inputs(self, model: Any) -> tuple:
        inputs = self.example_inputs(model) if callable(self.example_inputs) else self.example_inputs
        return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)

    def run(self, model: Any, inputs: tuple, context: str = "") -> tuple:
        """The forward's tensors, flattened; a forward that raises fails the check, saying where."""
        import torch

        try:
            with torch.no_grad():
                out = self.forward(model, *inputs) if self.forward is not None else model(*inputs)
        except Exception as exc:
            raise AssertionError(f"forward failed{context}: {type(exc).__name__}: {exc}{INPUTS_HINT}") from exc
        return _flatten(out)

    def trials(self, model: Any) -> dict[str, list[int]]:
        """{site: counts to try other than the current one}, each allowed by the site's constraints."""
        from surgery.engine import sites

        found, chosen = sites(model), dict(self.counts or {})
        unknown = sorted(set(chosen) - set(found))
        if unknown:
            raise AssertionError(f"counts names sites the model does not have: {unknown}; its sites: {list(found)}")
        tries = {}
        for name, site in found.items():
            c = site.count
            wanted = chosen.get(name, (site.min, c - site.step, c + site.step, c + 2 * site.step))
            bad = {n: site.violation(n) for n in wanted if site.violation(n)} if name in chosen else {}
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
    if isinstance(out, (Mapping, tuple, list)):
        return tuple(t for value in (out.values() if isinstance(out, Mapping) else out) for t in _flatten(value))
    raise AssertionError(f"forward must return tensors (or tuples/dicts of them), got {type(out).__name__}")


# -- snapshots and comparisons -------------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    """Everything a resize may touch. With `identity`, also which objects (parameters, their
    storage, submodules, objects in attributes): what `tokens(...)` and a rollback give back."""

    counts: dict[str, int]
    keys: tuple[str, ...]  # state_dict keys, in order
    tensors: dict[str, Any]  # state_dict entries and every buffer, cloned
    objects: dict[str, Any]  # parameters, buffers, submodules: identities (or types)
    attributes: dict[str, Any]  # every plain attribute of every module, frozen
    outputs: tuple | None
    identity: bool


def snapshot(model: Any, subject: Subject | None = None, inputs: tuple | None = None, *,
             identity: bool = True) -> Snapshot:
    """Capture `model`, and its outputs when a subject runs it (first, so caches the forward fills
    are part of the snapshot). Attributes read as `getattr` reads them (a None `_parameters` entry
    is a None attribute). Without `identity` (comparing two models, or a round trip) the engine's
    own state is left out, and a key a counter declares on a mapping (timm's `_model_args`) reads
    as its declared value while absent: such mappings record only non-default arguments."""
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
    attributes, mapping_keys, seen_objects = {}, {}, set()  # id(mapping) -> its keys that are declared counters
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
            seen.pop(STATE_ATTR, None)  # the engine's recipe and stash grow with every resize
        for attr, value in seen.items():
            _record(attributes, f"{path or '<model>'}.{attr}", value, identity, mapping_keys, seen_objects)
    return Snapshot(counts(model), tuple(state), tensors, objects, attributes, outputs, identity)


def _record(attributes: dict[str, Any], key: str, value: Any, identity: bool, mapping_keys: Mapping[int, set],
            seen_objects: set[int], depth: int = 0) -> None:
    """One attribute; a plain data object (a config) is recorded field by field, `key.field`, once
    (where it is first seen), so that a count kept in a config reads like any other attribute."""
    if isinstance(value, Mapping) and id(value) in mapping_keys:
        value = {k: v for k, v in value.items() if k not in mapping_keys[id(value)]}
    fields = _data_fields(value) if depth < 3 and id(value) not in seen_objects else None
    if fields is None:
        attributes[key] = _freeze(value, identity)
        return
    seen_objects.add(id(value))
    kind = type(value).__qualname__
    attributes[key] = ("object", kind, id(value)) if identity else ("object", kind)
    for name, field in fields.items():
        _record(attributes, f"{key}.{name}", field, identity, mapping_keys, seen_objects, depth + 1)


def _data_fields(value: Any, depth: int = 0) -> dict[str, Any] | None:
    """The fields of a plain data object (a dataclass, a namespace, a config class holding plain
    values, containers and other such objects), None for anything else (modules, tensors,
    callables, objects holding other kinds of objects, such as a logger)."""
    import torch

    if depth > 3 or isinstance(value, (type, torch.nn.Module, torch.Tensor, enum.Enum)) or callable(value):
        return None
    if dataclasses.is_dataclass(value) and not hasattr(value, "__dict__"):  # slots
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif hasattr(value, "__dict__") and not isinstance(value, types.ModuleType):
        fields = dict(vars(value))
    else:
        return None
    if dataclasses.is_dataclass(value) or isinstance(value, types.SimpleNamespace):
        return fields
    return fields if all(_is_data(v, depth + 1) for v in fields.values()) else None


def _is_data(value: Any, depth: int = 0) -> bool:
    import torch

    if isinstance(value, (int, float, str, bytes, complex, type(None), enum.Enum, torch.dtype, torch.device)):
        return True
    if depth > 3:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_data(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(_is_data(k, depth + 1) and _is_data(v, depth + 1) for k, v in value.items())
    return _data_fields(value, depth + 1) is not None


def _freeze(value: Any, identity: bool, depth: int = 0) -> Any:
    """A comparable stand-in for an attribute's value: plain values and containers by value,
    tensors and other objects by identity (or by type, when comparing two models)."""
    import torch

    if isinstance(value, (bool, float, enum.Enum)):
        return (type(value).__name__, repr(value))  # True is not 1; repr: nan equals nan
    if isinstance(value, (int, str, bytes, complex, type(None), torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value)) if identity else ("tensor", tuple(value.shape), str(value.dtype))
    if depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(_freeze(v, identity, depth + 1) for v in value)
        return (type(value).__name__, frozenset(items) if isinstance(value, (set, frozenset)) else items)
    if depth < 4 and isinstance(value, Mapping):
        return (type(value).__name__,
                tuple((_freeze(k, identity, depth + 1), _freeze(v, identity, depth + 1)) for k, v in value.items()))
    return ("object", type(value).__qualname__, id(value)) if identity else ("object", type(value).__qualname__)


def _differences(before: Snapshot, after: Snapshot, ignore: Sequence[str] = (), *, ordered: bool = True,
                 original: Snapshot | None = None) -> list[str]:
    """What differs from `before` to `after`; `ordered=False` lets the state_dict keys come in another
    order; with `original`, an attribute `before` still holds as `original` did is called stale."""
    import torch

    problems = [f"counts {before.counts} became {after.counts}"] if before.counts != after.counts else []
    if before.keys != after.keys and (ordered or set(before.keys) != set(after.keys)):
        missing, extra = sorted(set(before.keys) - set(after.keys)), sorted(set(after.keys) - set(before.keys))
        problems.append(f"state_dict keys changed: missing {missing}, extra {extra}"
                        if missing or extra else "state_dict keys are in another order")
    for key, a in before.tensors.items():
        b = after.tensors.get(key)
        if b is not None and (a.shape != b.shape or a.dtype != b.dtype or a.device != b.device):
            problems.append(f"tensor {key}: {tuple(a.shape)} {a.dtype} became {tuple(b.shape)} {b.dtype}")
        elif b is not None and not torch.equal(a, b):
            problems.append(f"tensor {key}: values differ{_max_diff(a, b)}")
    for key in sorted(set(before.objects) | set(after.objects)):
        a, b = before.objects.get(key, "<absent>"), after.objects.get(key, "<absent>")
        if a != b:
            problems.append(f"{key} is another object" if before.identity and "<absent>" not in (a, b)
                            else f"{key}: {a} became {b}")
    for key in sorted(set(before.attributes) | set(after.attributes)):
        a, b = before.attributes.get(key, "<absent>"), after.attributes.get(key, "<absent>")
        if a == b or key in ignore or key.rsplit(".", 1)[-1] in ignore:
            continue
        if original is not None and original.attributes.get(key, "<absent>") == a:
            problems.append(f"attribute {key} still holds {_show(a)}, as before the resize; a fresh build at these "
                            f"counts holds {_show(b)} (a count the plugin does not declare as a Counter?)")
        else:
            problems.append(f"attribute {key}: {_show(a)} became {_show(b)}")
    if before.outputs is not None and after.outputs is not None:
        problems.extend(output_differences(before.outputs, after.outputs))
    return problems


def output_differences(a: tuple, b: tuple) -> list[str]:
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
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(frozen: Any) -> str:
    """A `_freeze`d value as its original reads (True, not ('bool', 'True')), shortened."""
    return _short(_render(frozen))


def _render(frozen: Any) -> str:
    if frozen == "<absent>":  # what _differences reads for a missing attribute
        return "absent"
    if not isinstance(frozen, tuple):
        return repr(frozen)
    tag, rest = frozen[0], frozen[1:]
    if tag == "tensor":
        return f"a tensor of shape {rest[0]}, {rest[1]}" if len(rest) == 2 else "a tensor"
    if tag == "object":
        return f"a {rest[0]} object"
    if isinstance(rest[0], str):  # bool, float, enum: their repr
        return rest[0]
    if tag in ("set", "frozenset"):
        return "{" + ", ".join(sorted(_render(item) for item in rest[0])) + "}"
    if tag in ("list", "tuple"):
        inner = ", ".join(_render(item) for item in rest[0])
        return f"[{inner}]" if tag == "list" else f"({inner}{',' if len(rest[0]) == 1 else ''})"
    return "{" + ", ".join(f"{_render(k)}: {_render(v)}" for k, v in rest[0]) + "}"


def _assert_no_differences(problems: list[str], context: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise AssertionError(f"{context}:\n  " + "\n  ".join(problems[:12]) + more)


def assert_unchanged(model: Any, before: Snapshot, subject: Subject, inputs: tuple, context: str) -> None:
    after = snapshot(model, subject, inputs, identity=before.identity)
    _assert_no_differences(_differences(before, after, subject.ignore_attributes),
                           f"{context}: the model is not what it was")


def assert_matches_fresh_build(model: Any, fresh: Any, original: Snapshot, subject: Subject, inputs: tuple,
                                context: str) -> None:
    """`fresh`, built at `model`'s counts, given `model`'s weights, is `model`: the same state_dict
    keys (in any order) and shapes, buffers, plain attributes and outputs. `original` is `model`
    before its counts changed, so that an attribute left at its old value is named as such."""
    ours, theirs = model.state_dict(), fresh.state_dict()
    problems = [f"{key}: only in the resized model" for key in ours if key not in theirs]
    problems += [f"{key}: only in the fresh build" for key in theirs if key not in ours]
    problems += [f"tensor {key}: {tuple(ours[key].shape)} in the resized model, {tuple(theirs[key].shape)} in the "
                 f"fresh build" for key in ours if key in theirs and ours[key].shape != theirs[key].shape]
    _assert_no_differences(problems, f"{context}: its state_dict does not fit a fresh build at these counts")
    fresh.load_state_dict(ours)
    resized = snapshot(model, subject, inputs, identity=False)
    built = snapshot(fresh, subject, inputs, identity=False)
    _assert_no_differences(_differences(resized, built, subject.ignore_attributes, ordered=False, original=original),
                           f"{context}: the resized model is not the fresh build at these counts holding its "
                           f"weights (resized, then fresh)")


def assert_same_model(a: Any, b: Any, inputs: tuple | None = None, forward: Callable | None = None,
                      context: str = "the two models differ") -> None:
    """Assert two models are the same: state_dict keys (in order) and every entry (`torch.equal`),
    `surgery.counts`, plain attributes, and the outputs on `inputs` when given."""
    subject = Subject(lambda: None, inputs, forward) if inputs is not None else None
    _assert_no_differences(_differences(snapshot(a, subject, inputs, identity=False),
                                        snapshot(b, subject, inputs, identity=False)), context)
