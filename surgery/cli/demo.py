"""`surgery demo`: the installed story, or the whole idea on one model, each claim checked as it goes.

Typed alone it runs the first story registered as a kind of `demo` (the core has none and registers
first, then the built-in plugins', so ImageBind-LLM's `study` wins over a third-party one). With no
story, or with --model or --set, it walks one model (default vit_tiny_test) through a resize and
the guarantees (`walkthrough.check_guarantees`). A failed check prints MISMATCH and exits 1, so the
demo doubles as a smoke test of a plugin.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from surgery.commands import Command, UsageError

from .arguments import add_set_option, requested_counts
from .format import counts_text, format_shape_changes, format_sites, print_lines, site_dicts, state_shapes
from .walkthrough import Change, Walkthrough, check_guarantees, checkpoint_name, forward_runner, shapes

DEFAULT_MODEL = "vit_tiny_test"  # walked when no story is installed
GROUP = "demo"  # stories are kinds of this group: register(NAME, run, group="demo", ...)

DESCRIPTION = (
    "Typed alone: the installed story (the first 'surgery demo KIND' registered; 'surgery demo\n"
    "--help' lists them), e.g. ImageBind-LLM's study: LLaMA-Adapter V2 generating while query_len\n"
    "changes, ImageBind's vision CLS tokens going 1 -> 4, ImageBind-LLM reading them as 4 visual\n"
    "tokens, then the guarantees. With --model NAME (or --set, or no story installed: vit_tiny_test):\n"
    "one model with random weights: its sites, a resize (default: reg_tokens -> 4 where the model\n"
    "has registers, else its first site one token up), the old counts run temporarily, undo and\n"
    "redo bit-exactly, save and load into a fresh model, the recipe. Every check prints MISMATCH\n"
    "when it fails, and the command then exits 1.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME",
                   help=f"walk this registered model instead of the story (without a story: {DEFAULT_MODEL})")
    add_set_option(p, required=False)
    p.add_argument("--out", metavar="DIR", help="keep the demo checkpoint in DIR (default: a temporary folder)")


def cmd_demo(args: argparse.Namespace) -> int:
    """The installed story, or the single-model walk (--model, --set, or no story installed)."""
    if args.model is None and not args.set:
        story = installed_story()
        if story is not None:
            return story.run(story_arguments(story, args))
    return walk_model(args.model or DEFAULT_MODEL, requested_counts(args.set) if args.set else None, args.out)


def installed_story() -> Command | None:
    """The first story registered (a kind of `demo`), None when no command module has one."""
    from . import command_registry

    return next((c for c in command_registry().commands.values() if c.group == GROUP), None)


def story_arguments(story: Command, args: argparse.Namespace) -> argparse.Namespace:
    """The story's own options at their defaults, with those given to `surgery demo` (--out)."""
    parser = argparse.ArgumentParser(prog=f"surgery {story.path}", add_help=False)
    if story.add_arguments is not None:
        story.add_arguments(parser)
    story_args = parser.parse_args([])
    for name in ("out",):
        value = getattr(args, name, None)
        if value is not None:
            if not hasattr(story_args, name):
                raise UsageError(f"--{name}: 'surgery {story.path}' (the installed story) takes no --{name}")
            setattr(story_args, name, value)
    story_args.command_object = story
    return story_args


def walk_model(model_name: str, target: dict[str, int] | None, out: str | None) -> int:
    """Resize, undo, restore, save and load one registered model, checking each claim as it goes."""
    import torch

    import surgery
    from surgery.model_source import build_model

    spec = surgery.get_host().model_spec(model_name)
    if spec.example_inputs is None:
        raise UsageError(f"model {model_name!r} registers no example inputs, which the demo needs; "
                         f"pick another --model")
    torch.manual_seed(0)  # random weights, but the same ones every run: the printed numbers repeat
    model = build_model(model_name, {})
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise UsageError(f"model {model_name!r} is built on the meta device (shapes, no values), so the demo cannot "
                         f"run it; pick a model with weights (see 'surgery models')")
    original = surgery.counts(model)
    target = target or _demo_target(model_name, surgery.sites(model))
    surgery.engine.validate(model, target)
    if all(original.get(n) == c for n, c in target.items()):
        raise UsageError(f"--set asks for the counts the model already has ({counts_text(target)})")
    change = Change(target)
    back = change.undo_on(model)
    file_name = checkpoint_name(model_name, change, out)
    inputs = spec.example_inputs(model)
    run = forward_runner(spec, inputs)
    walk = Walkthrough()

    print(f"token-surgery demo: {model_name} ({spec.description or spec.backbone})")
    walk.step("Build the model and list its token sites",
              f"model = surgery.build({model_name!r}); surgery.sites(model)")
    print(f"  backbone {surgery.backbone_of(model)}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print_lines(format_sites(site_dicts(model)))
    y0 = run(model)
    print(f"  forward on example inputs {shapes(inputs)} -> {shapes(y0)}")

    walk.step("Resize (atomic: on any error the model is left as it was)", *change.calls())
    before, defaults = state_shapes(model), {n: site.default_init for n, site in surgery.sites(model).items()}
    for site, (old, new) in change.apply(model).items():
        grown = f"  (new tokens: nothing stashed to restore, so the site's default init {defaults[site]!r})"
        print(f"  {site}: {old} -> {new}" + (grown if new > old else "  (shrink: truncate, dropped tokens stashed)"))
    print(f"  counts now {counts_text(surgery.counts(model))}; tensors that changed shape:")
    print_lines(format_shape_changes(before, state_shapes(model)))
    y1 = run(model)
    if all(a.shape == b.shape for a, b in zip(y0, y1)):
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(y0, y1))
        print(f"  output changed: max |new - original| = {diff:.3g}")
    else:
        print(f"  output shape changed: {shapes(y1)}")

    check_guarantees(walk, model, change, back, run=run, original=y0, changed=y1,
                     rebuild=lambda: surgery.build(model_name), out=out, file_name=file_name)
    return walk.finish()


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
