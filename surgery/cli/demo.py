"""`surgery demo`: the whole idea on a tiny model, in seconds, each claim checked as it goes.

Build, list sites, resize, run temporarily with the old counts, resize back bit-exactly, save and
load into a fresh model, print the recipe. Every "bit-exact" line is a `torch.equal`; a failed
one prints MISMATCH and exits 1, so the demo doubles as a smoke test of a plugin.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Mapping

from surgery.commands import UsageError

from .arguments import add_set_option, requested_counts
from .format import counts_text, format_shape_changes, format_sites, print_lines, recipe_lines, site_dicts, state_shapes

DESCRIPTION = (
    "Walk through token surgery on a small model with random weights: list its sites,\n"
    "resize (default: reg_tokens -> 4 where the model has registers, else its first site one\n"
    "token up), run temporarily with the old counts, resize back bit-exactly, save and load\n"
    "into a fresh model, and print the recipe.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_tiny_test", metavar="NAME", help="registered model (default vit_tiny_test)")
    add_set_option(p, required=False)
    p.add_argument("--out", metavar="DIR", help="keep the demo checkpoint in DIR (default: a temporary folder)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Resize, undo, restore, save and load on a tiny model, checking each claim as it goes."""
    import torch

    import surgery
    from surgery.model_source import build_model

    spec = surgery.get_host().model_spec(args.model)
    if spec.example_inputs is None:
        raise UsageError(f"model {args.model!r} registers no example inputs, which the demo needs; pick another --model")
    torch.manual_seed(0)  # random weights, but the same ones every run: the printed numbers repeat
    model = build_model(args.model, {})
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise UsageError(f"model {args.model!r} is built on the meta device (shapes, no values), so the demo cannot "
                         f"run it; pick a model with weights (see 'surgery models')")
    original = surgery.counts(model)
    target = requested_counts(args.set) if args.set else _demo_target(args.model, surgery.sites(model))
    surgery.engine.validate(model, target)
    if all(original.get(n) == c for n, c in target.items()):
        raise UsageError(f"--set asks for the counts the model already has ({counts_text(target)})")
    back = {n: original[n] for n in target}
    file_name = f"{args.model}_{'_'.join(f'{n}{c}' for n, c in target.items())}.safetensors"
    if args.out and os.path.exists(os.path.join(args.out, file_name)):
        raise UsageError(f"{os.path.join(args.out, file_name)!r} already exists; remove it or choose another --out")
    inputs = spec.example_inputs(model)
    failures: list[str] = []

    def run(m: torch.nn.Module) -> tuple:
        with torch.no_grad():
            y = spec.forward(m, *inputs) if spec.forward else m(*inputs)
        return tuple(_tensors(y))  # a tensor, or tensors nested in tuples, lists and dicts (ImageBind's)

    def check(label: str, a: tuple, b: tuple) -> None:
        same = len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
        print(f"    {label}: {'bit-exact' if same else 'MISMATCH'}")
        if not same:
            failures.append(label)

    def step(title: str, code: str) -> None:
        print(f"\n{title}\n  >>> {code}")

    args_text, back_text = _keywords(target), _keywords(back)
    print(f"token-surgery demo: {args.model} ({spec.description or spec.backbone})")
    step("1. Build the model and list its token sites", f"model = surgery.build({args.model!r}); surgery.sites(model)")
    print(f"  backbone {surgery.backbone_of(model)}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print_lines(format_sites(site_dicts(model)))
    y0 = run(model)
    print(f"  forward on example inputs {_shapes(inputs)} -> {_shapes(y0)}")

    step("2. Resize (atomic: on any error the model is left as it was)", f"surgery.resize(model, {args_text})")
    before, defaults = state_shapes(model), {n: site.default_init for n, site in surgery.sites(model).items()}
    for site, (old, new) in surgery.resize(model, **target).items():
        grown = f"  (new tokens: nothing stashed to restore, so the site's default init {defaults[site]!r})"
        print(f"  {site}: {old} -> {new}" + (grown if new > old else "  (shrink: truncate, dropped tokens stashed)"))
    print(f"  counts now {counts_text(surgery.counts(model))}; tensors that changed shape:")
    print_lines(format_shape_changes(before, state_shapes(model)))
    y1 = run(model)
    if all(a.shape == b.shape for a, b in zip(y0, y1)):
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(y0, y1))
        print(f"  output changed: max |new - original| = {diff:.3g}")
    else:
        print(f"  output shape changed: {_shapes(y1)}")

    step("3. Run with the original counts for a while", f"with surgery.tokens(model, {back_text}): ...")
    with surgery.tokens(model, **back):
        print(f"  inside: {counts_text(surgery.counts(model))}")
        check("output equals the original model's", run(model), y0)
    print(f"  after the block: {counts_text(surgery.counts(model))}")
    check("output equals the resized model's", run(model), y1)

    step("4. Resize back for good, and forward again", f"surgery.resize(model, {back_text})")
    surgery.resize(model, **back)
    check("output equals the original model's", run(model), y0)
    print(f"  >>> surgery.resize(model, {args_text})   # init='restore' brings the stashed tokens back")
    surgery.resize(model, **target)
    check("output equals the resized model's", run(model), y1)

    step("5. Save, and load into a freshly built model", "surgery.save(model, path); surgery.load(path, fresh)")
    with tempfile.TemporaryDirectory(prefix="surgery-demo-") as tmp:
        folder = args.out or tmp
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, file_name)
        surgery.save(model, path)
        fresh = surgery.build(args.model)
        print(f"  fresh model: {counts_text(surgery.counts(fresh))}")
        replayed = surgery.load(path, fresh).replayed
        print(f"  after load:  {counts_text(surgery.counts(fresh))}  ({os.path.getsize(path):,} bytes; "
              f"{'recipe replayed, then weights loaded' if replayed else 'resized to the file, then loaded'})")
        check("loaded model's output equals the saved model's", run(fresh), y1)
        print(f"  checkpoint kept at {path}" if args.out else "  (temporary checkpoint removed; --out DIR keeps it)")

    step("6. The recipe: every change, replayable on a fresh model", "surgery.recipe(model)")
    print_lines(recipe_lines(surgery.recipe(model).steps))
    if failures:
        print(f"\n{len(failures)} check(s) failed: {'; '.join(failures)}")
        return 1
    print("\nall checks passed")
    return 0


def _demo_target(model_name: str, sites: Mapping[str, Any]) -> dict[str, int]:
    """The demo's change when --set gives none: 4 register tokens where the model has that site,
    else the first site one step up (or down, where up is not allowed)."""
    if "reg_tokens" in sites and sites["reg_tokens"].count != 4:
        return {"reg_tokens": 4}
    for name, site in sites.items():
        for count in (site.count + site.step, site.count - site.step):
            if site.violation(count) is None:
                return {name: count}
    raise UsageError(f"model {model_name!r} has no site whose count can change "
                     f"({counts_text({n: s.count for n, s in sites.items()})}); pick another --model")


def _keywords(counts: Mapping[str, int]) -> str:
    """Counts as the keyword arguments of a call that runs as printed (`**{...}` for a dotted site name)."""
    if all(name.isidentifier() for name in counts):
        return ", ".join(f"{name}={count}" for name, count in counts.items())
    return f"**{dict(counts)!r}"


def _tensors(value: Any) -> list[Any]:
    """The tensors in a model's inputs or outputs: a tensor, or tensors in tuples, lists, dicts."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


def _shapes(value: Any) -> str:
    """Shapes of (nested) inputs or outputs, e.g. `[(2, 3, 32, 32)]` or `[{vision: (2, 24), ...}]`."""
    if hasattr(value, "shape"):
        return str(tuple(value.shape))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_shapes(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shapes(v) for v in value) + "]"
    return type(value).__name__
