"""Recipes: what was changed on a model, step by step, so a fresh model can be brought to the same state.

    {"backbone": "imagebind", "steps": [
        {"site": "num_cls_tokens.vision", "from": 1, "to": 4, "init": "normal", "shrink": "truncate", "seed": 0},
        {"option": "head_mode", "from": {"vision": "first", ...}, "to": {"vision": "all", ...}}]}

A count step carries the strategy and seed that made its rows, so a replay is bit-exact; steps are
replayed in order (`all` needs a CLS token) in one transaction. Recipes come from files, so
`Recipe.from_json` checks every field (a RecipeError names the step and the field).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from torch import nn

from . import strategies
from .declarations import backbone_of
from .errors import CountError, ModelConfigError, RecipeError, SurgeryError, short_repr
from .options import MAX_CHARS, canonical, json_problem, model_options
from .transaction import Transaction

COUNT_FIELDS = {"site": str, "from": int, "to": int, "init": str, "shrink": str, "seed": int}
OPTION_FIELDS = ("option", "from", "to")
MAX_NAME = 200  # characters of an option's name


def is_option_step(step: Mapping[str, Any]) -> bool:
    """Whether a (checked) step changes an option rather than a count."""
    return "option" in step


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What was changed on a model, step by step; replays bit-exactly on a fresh model."""

    backbone: str
    steps: tuple[dict, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Final count of every site the recipe touches."""
        return {step["site"]: step["to"] for step in self.steps if not is_option_step(step)}

    @property
    def initial(self) -> dict[str, int]:
        """Count each touched site must have before replaying."""
        first: dict[str, int] = {}
        for step in self.steps:
            if not is_option_step(step):
                first.setdefault(step["site"], step["from"])
        return first

    @property
    def options(self) -> dict[str, Any]:
        """Final value of every option the recipe changes."""
        return {step["option"]: step["to"] for step in self.steps if is_option_step(step)}

    @property
    def initial_options(self) -> dict[str, Any]:
        """Value each changed option must have before replaying."""
        first: dict[str, Any] = {}
        for step in self.steps:
            if is_option_step(step):
                first.setdefault(step["option"], step["from"])
        return first

    def to_json(self) -> str:
        return json.dumps({"backbone": self.backbone, "steps": list(self.steps)})

    @classmethod
    def from_json(cls, text: str | bytes | Mapping) -> "Recipe":
        """The recipe `to_json` wrote (its text, or that text decoded). Recipes come from files, so
        every field is checked: a malformed one is a RecipeError naming the step and the field."""
        try:
            data = json.loads(text) if isinstance(text, (str, bytes)) else text
        except (ValueError, RecursionError) as exc:
            raise RecipeError(f"recipe is not valid JSON: {type(exc).__name__}: {exc}") from None
        if not (isinstance(data, Mapping) and isinstance(data.get("backbone"), str)
                and isinstance(data.get("steps"), (list, tuple))):
            raise RecipeError(f'a recipe is an object {{"backbone": str, "steps": [...]}}, got '
                              f"{type(data).__name__} {short_repr(data)}")
        for i, step in enumerate(data["steps"], 1):
            if isinstance(step, Mapping) and set(step) == set(OPTION_FIELDS):
                _check_option_step(i, step)
            elif isinstance(step, Mapping) and set(step) == set(COUNT_FIELDS):
                _check_count_step(i, step)
            else:
                got = sorted(map(str, step)) if isinstance(step, Mapping) else type(step).__name__
                raise RecipeError(f"recipe step {i}: expected the fields {', '.join(COUNT_FIELDS)} (a count) or "
                                  f"{', '.join(OPTION_FIELDS)} (a model option), got {short_repr(got)}")
        return cls(backbone=data["backbone"], steps=tuple(json.loads(json.dumps(s)) for s in data["steps"]))

    def replay(self, model: nn.Module) -> None:
        """Apply the steps to `model`, which must have the recipe's starting counts and options
        (a freshly built model). Atomic: one transaction, announced once with the net change."""
        backbone = backbone_of(model)
        if backbone != self.backbone:
            raise SurgeryError(f"recipe is for backbone {self.backbone!r}, the model is {backbone!r}")
        with Transaction(model, backbone) as txn:
            now = txn.start
            wrong = {n: now.get(n) for n, c in self.initial.items() if now.get(n) != c}
            if wrong:
                raise CountError(f"recipe starts from counts {self.initial}, the model has {wrong}; "
                                 f"replay it on a freshly built model")
            if self.initial_options:
                have = model_options(model, backbone)
                unknown = sorted(n for n in self.initial_options if n not in have)
                if unknown:
                    raise ModelConfigError(f"recipe: option {unknown[0]!r:.60} is not an option of this {backbone!r} "
                                           f"model; its options: {', '.join(sorted(have)) or 'none'}")
                wrong = {n: have[n] for n, v in self.initial_options.items() if canonical(have[n]) != canonical(v)}
                if wrong:
                    raise RecipeError(f"recipe starts from options {short_repr(self.initial_options)}, the model "
                                      f"has {short_repr(wrong)}; replay it on a freshly built model")
            txn.announce({n: (self.initial[n], c) for n, c in self.counts.items() if self.initial[n] != c},
                         force=bool(self.options))
            for i, step in enumerate(self.steps, 1):
                if is_option_step(step):
                    txn.set_options({step["option"]: step["to"]}, where=f"recipe step {i}", announce=False)
                else:
                    txn.resize({step["site"]: step["to"]}, step["init"], step["shrink"], step["seed"],
                               announce=False)


def _check_count_step(i: int, step: Mapping[str, Any]) -> None:
    for key, kind in COUNT_FIELDS.items():
        value = step[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (key in ("from", "to") and value < 0):
            want = "a count (an integer >= 0)" if key in ("from", "to") else f"a {kind.__name__}"
            raise RecipeError(f"recipe step {i}: {key} must be {want}, got {short_repr(value)}")
    for value, allowed in ((step["init"], strategies.GROWTH_NAMES), (step["shrink"], strategies.SHRINK_NAMES)):
        if value not in allowed:
            raise RecipeError(f"recipe step {i}: unknown strategy {short_repr(value)}; allowed: {', '.join(allowed)}")
    if not -(1 << 63) <= step["seed"] < (1 << 64):
        raise RecipeError(f"recipe step {i}: seed {step['seed']} is outside what a torch generator takes")


def _check_option_step(i: int, step: Mapping[str, Any]) -> None:
    name = step["option"]
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise RecipeError(f"recipe step {i}: option must be an option's name (a non-empty string of at most "
                          f"{MAX_NAME} characters), got {short_repr(name)}")
    for key in ("from", "to"):
        problem = json_problem(step[key])
        if problem:
            raise RecipeError(f"recipe step {i}: {key} of option {name!r} must be plain JSON ({problem})")
        if len(canonical(step[key])) > MAX_CHARS:
            raise RecipeError(f"recipe step {i}: {key} of option {name!r} is longer than {MAX_CHARS} characters "
                              f"as JSON; a model option is a setting")


def describe_step(step: Mapping[str, Any]) -> str:
    """One step for people: `reg_tokens: 0 -> 4  (init normal, seed 0)`, or for an option the keys
    that changed, `option head_mode: vision first -> all`."""
    if not is_option_step(step):
        how = f"init {step['init']}, seed {step['seed']}" if step["to"] > step["from"] else f"shrink {step['shrink']}"
        return f"{step['site']}: {step['from']} -> {step['to']}  ({how})"
    old, new = step["from"], step["to"]
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if canonical(old.get(k)) != canonical(new.get(k))]
        text = ", ".join(f"{k} {_plain(old.get(k))} -> {_plain(new.get(k))}" for k in keys) or "unchanged"
    else:
        text = f"{_plain(old)} -> {_plain(new)}"
    return f"option {step['option']}: {text}"


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


__all__ = ["Recipe", "describe_step", "is_option_step", "COUNT_FIELDS", "OPTION_FIELDS"]
