"""The model under test, and bit-exact comparisons of models (part of the conformance kit).

A `Subject` says how to build, feed and run a model; a `Snapshot` captures everything a resize
may touch (state_dict, buffers, which objects hold them, every plain attribute of every module,
the outputs), so that "the model is what it was" is one comparison that lists every difference.
It is loaded with the pytest plugin in every pytest run, so torch and the engine are imported
inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence


@dataclasses.dataclass
class Subject:
    """How to build, feed and run the model under test, and which counts to try on it.

    `counts` maps a site to the counts to try (sites left out get defaults around their current
    count; `[]` skips a site). `ignore_attributes` names plain attributes that may differ after a
    restore (a cache a plugin drops in `surgery_before_resize`): `attr` or `path.attr`.
    """

    factory: Callable[[], Any]
    example_inputs: Callable[[Any], tuple] | tuple
    forward: Callable[..., Any] | None = None
    counts: Mapping[str, Iterable[int]] | None = None
    seed: int = 0
    expect_output_change: bool = True
    ignore_attributes: Sequence[str] = ()

    def build(self) -> Any:
        """A fresh model after `torch.manual_seed(seed)`, in eval mode (dropout defeats bit-exact checks)."""
        import torch

        torch.manual_seed(self.seed)
        return self.factory().eval()

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
            raise AssertionError(f"forward failed{context}: {type(exc).__name__}: {exc}") from exc
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
    attributes, mapping_keys = {}, {}  # id(mapping) -> its keys that are declared counters
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
            if isinstance(value, Mapping) and id(value) in mapping_keys:
                value = {k: v for k, v in value.items() if k not in mapping_keys[id(value)]}
            attributes[f"{path or '<model>'}.{attr}"] = _freeze(value, identity)
    return Snapshot(counts(model), tuple(state), tensors, objects, attributes, outputs, identity)


def _freeze(value: Any, identity: bool, depth: int = 0) -> Any:
    """A comparable stand-in for an attribute's value: plain values and containers by value,
    tensors and other objects by identity (or by type, when comparing two models)."""
    import torch

    if isinstance(value, (bool, float)):
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


def _differences(before: Snapshot, after: Snapshot, ignore: Sequence[str] = ()) -> list[str]:
    import torch

    problems = [f"counts {before.counts} became {after.counts}"] if before.counts != after.counts else []
    if before.keys != after.keys:
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
        if a != b and key not in ignore and key.rsplit(".", 1)[-1] not in ignore:
            problems.append(f"attribute {key}: {_short(a)} became {_short(b)}")
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
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _assert_no_differences(problems: list[str], context: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise AssertionError(f"{context}:\n  " + "\n  ".join(problems[:12]) + more)


def assert_unchanged(model: Any, before: Snapshot, subject: Subject, inputs: tuple, context: str) -> None:
    after = snapshot(model, subject, inputs, identity=before.identity)
    _assert_no_differences(_differences(before, after, subject.ignore_attributes),
                           f"{context}: the model is not what it was")


def assert_same_model(a: Any, b: Any, inputs: tuple | None = None, forward: Callable | None = None,
                      context: str = "the two models differ") -> None:
    """Assert two models are the same: state_dict keys (in order) and every entry (`torch.equal`),
    `surgery.counts`, plain attributes, and the outputs on `inputs` when given."""
    subject = Subject(lambda: None, inputs, forward) if inputs is not None else None
    _assert_no_differences(_differences(snapshot(a, subject, inputs, identity=False),
                                        snapshot(b, subject, inputs, identity=False)), context)
