"""What the demos share: numbered steps that show the code they run, checks that record what
failed, and the guarantees every change keeps, checked on the model at hand.

Every "bit-exact" line is a `torch.equal`; a failed check prints MISMATCH and `finish()` returns 1.
Public for plugins' command modules (a story runs its own steps, then the same guarantees): import
it only inside a command's `run`, since it imports torch on use.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from surgery.commands import UsageError

from .format import counts_text, print_lines, recipe_lines

Outputs = tuple  # the tensors of one forward (`tensors`)


class Walkthrough:
    """Numbered steps and the checks made along the way (the failures are kept for `finish`)."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.number = 0

    def step(self, title: str, *code: str) -> None:
        """A numbered heading, then the code the step runs."""
        self.number += 1
        print(f"\n{self.number}. {title}")
        for line in code:
            self.code(line)

    @staticmethod
    def code(line: str) -> None:
        """One line of code as typed at the Python prompt (an indented line continues a block)."""
        print(f"  {'...' if line.startswith(' ') else '>>>'} {line}")

    def check(self, label: str, got: Any, expected: Any) -> bool:
        """Bit-exact: as many tensors (nested as `tensors` reads them), each with the same shape,
        dtype and values (`torch.equal`)."""
        import torch

        a, b = tensors(got), tensors(expected)
        same = len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))
        return self.expect(label, same, "bit-exact")

    def expect(self, label: str, ok: bool, shown: str = "yes") -> bool:
        """A claim other than equality (a shape, a count): `shown` when it holds, else MISMATCH."""
        print(f"    {label}: {shown if ok else 'MISMATCH'}")
        if not ok:
            self.failures.append(label)
        return ok

    def finish(self) -> int:
        """The exit status: 0 when every check held, else 1 after naming the failed ones."""
        if self.failures:
            print(f"\n{len(self.failures)} check(s) failed: {'; '.join(self.failures)}")
            return 1
        print("\nall checks passed")
        return 0


@dataclass(frozen=True)
class Change:
    """Token counts and model options changed together (`surgery.resize`, `surgery.set_options`).

    Counts go first and options after (an option may need the new counts: a head that reads every
    CLS token needs one); `undo_on` gives the change back to a model's current state, in the
    reverse order."""

    counts: Mapping[str, int]
    options: Mapping[str, Any] = field(default_factory=dict)
    options_first: bool = False

    def calls(self, model: str = "model") -> list[str]:
        """The calls that make the change, as printed (they run as written)."""
        resize = [f"surgery.resize({model}, {keywords(self.counts)})"] if self.counts else []
        options = [f"surgery.set_options({model}, {keywords(self.options)})"] if self.options else []
        return options + resize if self.options_first else resize + options

    def apply(self, model: Any) -> dict[str, tuple[int, int]]:
        """Make the change; returns the resized sites {site: (old, new)}."""
        import surgery

        resized: dict[str, tuple[int, int]] = {}
        for call in ("options", "counts") if self.options_first else ("counts", "options"):
            if call == "counts" and self.counts:
                resized = surgery.resize(model, **self.counts)
            elif call == "options" and self.options:
                surgery.set_options(model, **self.options)
        return resized

    def undo_on(self, model: Any) -> "Change":
        """The change that brings `model`, as it is now, back from this one (taken before it)."""
        import surgery
        from surgery.options import model_options

        counts, options = surgery.counts(model), model_options(model)
        back = {}
        for name, value in self.options.items():
            old = options.get(name)
            back[name] = {k: old[k] for k in value} if isinstance(value, Mapping) and isinstance(old, Mapping) else old
        return Change({n: counts[n] for n in self.counts}, back, options_first=not self.options_first)

    def text(self) -> str:
        """`num_cls_tokens.vision=4, head_mode={'vision': 'all'}`."""
        return ", ".join(part for part in (counts_text(self.counts) if self.counts else "",
                                           keywords(self.options) if self.options else "") if part)


def check_guarantees(walk: Walkthrough, model: Any, change: Change, back: Change, *,
                     run: Callable[[Any], Outputs], original: Outputs, changed: Outputs,
                     rebuild: Callable[[], Any], out: str | None, file_name: str) -> None:
    """The guarantees of a change already made to `model` (`back` undoes it): running with the
    original state for a while gives the original outputs and leaving the block the changed ones;
    undoing for good, then redoing (the stash restores dropped tokens), gives each again; a fresh
    model loaded from the saved file gives the changed outputs; the recipe lists every step.
    `run(model)` is a forward's tensors; `original` and `changed` its outputs before and after."""
    import surgery

    if back.options:
        walk.step("Run with the original state for a while (undone when the block is left)",
                  "with surgery.tokens(model):", *(f"    {call}" for call in back.calls()))
        block = surgery.tokens(model)
    else:
        walk.step("Run with the original counts for a while",
                  f"with surgery.tokens(model, {keywords(back.counts)}): ...")
        block = surgery.tokens(model, **back.counts)
    with block:
        if back.options:
            back.apply(model)
        print(f"  inside: {state_text(model, change)}")
        walk.check("output equals the original model's", run(model), original)
    print(f"  after the block: {state_text(model, change)}")
    walk.check("output equals the changed model's", run(model), changed)

    walk.step("Undo for good, and forward again", *back.calls())
    back.apply(model)
    walk.check("output equals the original model's", run(model), original)
    for call in change.calls():
        restores = call.startswith("surgery.resize")
        walk.code(call + ("   # init='restore' brings the stashed tokens back" if restores else ""))
    change.apply(model)
    walk.check("output equals the changed model's", run(model), changed)

    walk.step("Save, and load into a freshly built model", "surgery.save(model, path); surgery.load(path, fresh)")
    with tempfile.TemporaryDirectory(prefix="surgery-demo-") as tmp:
        folder = out or tmp
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, file_name)
        surgery.save(model, path)
        fresh = rebuild()
        print(f"  fresh model: {state_text(fresh, change)}")
        replayed = surgery.load(path, fresh).replayed
        print(f"  after load:  {state_text(fresh, change)}  ({os.path.getsize(path):,} bytes; "
              f"{'recipe replayed, then weights loaded' if replayed else 'resized to the file, then loaded'})")
        walk.check("loaded model's output equals the saved model's", run(fresh), changed)
        print(f"  checkpoint kept at {path}" if out else "  (temporary checkpoint removed; --out DIR keeps it)")

    walk.step("The recipe: every change, replayable on a fresh model", "surgery.recipe(model)")
    print_lines(recipe_lines(surgery.recipe(model).steps))


def checkpoint_name(model_name: str, change: Change, out: str | None) -> str:
    """The demo checkpoint's file name; a usage error, before any work, when --out holds it already."""
    stem = model_name.replace("/", "_")  # a resolved name such as timm/<arch> is not a folder
    name = f"{stem}_{'_'.join(f'{n}{c}' for n, c in change.counts.items())}.safetensors"
    if out and os.path.exists(os.path.join(out, name)):
        raise UsageError(f"{os.path.join(out, name)!r} already exists; remove it or choose another --out")
    return name


def state_text(model: Any, change: Change) -> str:
    """What `change` touches, as `model` has it now: `reg_tokens=0`, `... head_mode={'vision': 'first'}`."""
    import surgery
    from surgery.options import model_options

    counts, options = surgery.counts(model), model_options(model)
    shown = {name: {k: options.get(name, {}).get(k) for k in value} if isinstance(value, Mapping)
             else options.get(name) for name, value in change.options.items()}
    return ", ".join(part for part in (counts_text({n: counts.get(n) for n in change.counts}),
                                       keywords(shown) if shown else "") if part)


def forward_runner(spec: Any, inputs: tuple) -> Callable[[Any], Outputs]:
    """`run(model)`: the registered forward (or the model's call) on `inputs`, its tensors as a tuple."""
    import torch

    def run(model: Any) -> Outputs:
        with torch.no_grad():
            y = spec.forward(model, *inputs) if spec.forward else model(*inputs)
        return tuple(tensors(y))
    return run


def keywords(values: Mapping[str, Any]) -> str:
    """Keyword arguments of a call that runs as printed (`**{...}` when a name is dotted)."""
    if all(name.isidentifier() for name in values):
        return ", ".join(f"{name}={value!r}" for name, value in values.items())
    return f"**{dict(values)!r}"


def tensors(value: Any) -> list[Any]:
    """The tensors in a model's inputs or outputs: a tensor, or tensors in tuples, lists, dicts."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in tensors(item)]


def shapes(value: Any) -> str:
    """Shapes of (nested) inputs or outputs, e.g. `[(2, 3, 32, 32)]` or `[{vision: (2, 24), ...}]`."""
    if hasattr(value, "shape"):
        return str(tuple(value.shape))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {shapes(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shapes(v) for v in value) + "]"
    return type(value).__name__


__all__ = ["Walkthrough", "Change", "check_guarantees", "checkpoint_name", "state_text", "forward_runner",
           "keywords", "tensors", "shapes"]
