"""Token sites: the declarative description of "a count of learned tokens" in a built model.

A `TokenSite` names a site's count and constraints, every tensor that carries it (and along which
axis), the coupled rows of other tensors that belong to those tokens (the positional rows of prefix
tokens) and the attributes ("counters") that follow the count. The engine applies any site from this
alone, so a plugin writes no resize code unless a count changes the model's structure. Descriptors
are snapshots, rebuilt from the model's current state each time, so offsets that depend on another
site's count are always current.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn


@dataclass(frozen=True, repr=False)
class TokenTensor:
    """One tensor whose extent along `axis` holds this site's tokens.

    The site owns the block `[start, start + count)` along `axis`; everything before and after
    that block (patch positions, another site's tokens) is kept as it is.

    `view` lets a flat table be seen with the token axis split out: an `(L*Q, D)` embedding
    table declared with `view=(L, Q, D), axis=1` is resized along Q, and stored back as
    `(L*Q', D)`. Each dimension of the real tensor must be a product of consecutive view dims.

    `template` stands for a tensor that is absent (`None`) while the count is zero, as timm's
    `reg_token` is: a zero-token tensor of the right rank, dtype and device. When the count
    returns to zero the attribute goes back to `None`.

    `anchor="end"` is for blocks whose *last* rows are the ones that matter, such as one adapter
    row per layer for the last L layers: growth then adds rows in front, `truncate` keeps the
    last rows, and stashed rows come back in front.
    """

    module: nn.Module
    name: str
    axis: int
    start: int = 0
    view: tuple[int, ...] | None = None
    coupled: bool = False
    template: torch.Tensor | None = None
    requires_grad: bool = True
    anchor: str = "start"  # or "end": see above

    def __post_init__(self) -> None:
        if self.anchor not in ("start", "end"):
            raise ValueError(f"TokenTensor {self.name}: anchor must be 'start' or 'end', got {self.anchor!r}")

    def current(self) -> torch.Tensor | None:
        """The tensor as stored on the module (None when absent)."""
        return getattr(self.module, self.name, None)

    def __repr__(self) -> str:
        # names the module by its type: the module's own repr would print the whole model
        value = self.current()
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else "absent" if value is None else "not a tensor"
        extras = ([f"view={self.view}"] if self.view is not None else []) + (["coupled"] if self.coupled else [])
        extras += [f"anchor={self.anchor!r}"] if self.anchor != "start" else []
        return (f"TokenTensor({type(self.module).__name__}.{self.name} {shape}, axis={self.axis}, start={self.start}"
                + "".join(f", {e}" for e in extras) + ")")

    def tensor(self) -> torch.Tensor:
        """The tensor, or its zero-token template when absent."""
        value = self.current()
        if value is None:
            if self.template is None:
                raise ValueError(f"{self.name} is None and the site declared no template for it")
            return self.template
        return value

    def viewed(self) -> torch.Tensor:
        """The tensor seen through `view` (or as it is)."""
        value = self.tensor()
        return value.view(self.view) if self.view is not None else value

    def key(self, paths: Mapping[int, str]) -> str:
        """This tensor's state-dict key (`tensor_key`)."""
        return tensor_key(paths, self.module, self.name)

    def stored_shape(self, viewed_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The real tensor's shape for a given shape of its view (groups of view dims multiply)."""
        if self.view is None:
            return tuple(viewed_shape)
        groups = _view_groups(tuple(self.tensor().shape), self.view)
        return tuple(math.prod(viewed_shape[i] for i in group) for group in groups)


@dataclass(frozen=True, repr=False)
class Counter:
    """A plain attribute (or mapping item) that must follow a site's count.

    `value(count)` gives the attribute's value for a count; by default it is the count itself.
    Counters derived from several sites (timm's `num_prefix_tokens` = class + registers) are
    declared with a function closed over the other sites' current counts.
    """

    target: Any
    attr: str
    value: Callable[[int], Any] | None = None

    def value_for(self, count: int) -> Any:
        return count if self.value is None else self.value(count)

    def current(self) -> Any:
        if isinstance(self.target, Mapping):
            return self.target.get(self.attr)
        return getattr(self.target, self.attr)

    @property
    def label(self) -> str:
        """`Type.attr` (`Type['key']` for a mapping): the target named by its type, never printed whole."""
        owner = type(self.target).__name__
        return f"{owner}[{self.attr!r}]" if isinstance(self.target, Mapping) else f"{owner}.{self.attr}"

    def __repr__(self) -> str:
        return f"Counter({self.label})"


@dataclass(repr=False)
class TokenSite:
    """A count of learned tokens in a model, and everything that must follow it.

    Constraints: `min <= count <= max` (`max=None`: unbounded) and `(count - min) % step == 0`.
    `note` explains a constraint that is not obvious ("global_pool='token' reads the class
    token"); it is shown in every error about this site.

    `default_init` is the growth strategy used for new tokens when the caller does not choose
    one (and for rows beyond those the `restore` strategy can bring back).

    `count_in_state_dict(state_dict, paths)` reads this site's count out of a state dict of the
    same backbone (for loading checkpoints of another count); `paths` maps id(module) to the
    module's key prefix in the state dict (`module_paths`), and returning None means "cannot tell"
    (the site keeps the model's count). `None` instead of a function uses the default reading of
    `surgery.checkpoint`: the first tensor's key and extent along `axis` (not for a `view`).
    """

    name: str
    count: int
    tensors: list[TokenTensor] = field(default_factory=list)
    counters: list[Counter] = field(default_factory=list)
    min: int = 0
    max: int | None = None
    step: int = 1
    default_init: str = "normal"
    note: str = ""
    description: str = ""
    count_in_state_dict: Callable[[Mapping[str, torch.Tensor], Mapping[int, str]], int | None] | None = None
    plugin: str = ""  # filled in by the host: which plugin declared the site
    part: str = ""  # filled in by the host: the path of the sub-model it belongs to ("": the model; surgery.compose)

    def __repr__(self) -> str:
        return (f"TokenSite(name={self.name!r}, count={self.count}, min={self.min}, max={self.max}, step={self.step}, "
                f"plugin={self.plugin!r}, tensors={self.tensors!r}, counters={self.counters!r})")

    def allowed(self) -> str:
        """The constraint in words, for error messages."""
        upper = "no upper bound" if self.max is None else f"at most {self.max}"
        text = f"an integer, at least {self.min}, {upper}"
        if self.step != 1:
            text += f", in steps of {self.step} from {self.min}"
        if self.note:
            text += f" ({self.note})"
        return text

    def violation(self, count: Any) -> str | None:
        """Why `count` is not allowed, or None when it is."""
        if isinstance(count, bool) or not isinstance(count, int):
            return f"got {count!r} of type {type(count).__name__}"
        if count < self.min:
            return f"got {count}, below the minimum {self.min}"
        if self.max is not None and count > self.max:
            return f"got {count}, above the maximum {self.max}"
        if (count - self.min) % self.step:
            return f"got {count}, not a multiple of {self.step} steps from {self.min}"
        return None

    def to_dict(self, paths: Mapping[int, str] | None = None) -> dict[str, Any]:
        """A JSON-ready summary (used by `surgery inspect`)."""
        def path(t: TokenTensor) -> str:
            return t.key(paths if paths is not None else {})

        return {
            "name": self.name,
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "step": self.step,
            "default_init": self.default_init,
            "note": self.note,
            "description": self.description,
            "plugin": self.plugin,
            "part": self.part,
            "tensors": [
                {
                    "key": path(t),
                    "shape": list(t.current().shape) if t.current() is not None else None,
                    "view": list(t.view) if t.view is not None else None,
                    "axis": t.axis,
                    "start": t.start,
                    "coupled": t.coupled,
                }
                for t in self.tensors
            ],
            "counters": [c.label for c in self.counters],
        }


def _view_groups(shape: tuple[int, ...], view: tuple[int, ...]) -> list[list[int]]:
    """Which consecutive dims of `view` make up each dim of `shape`: (L*Q, D) seen as (L, Q, D) -> [[0, 1], [2]].

    A size-1 view dim belongs to the stored dim before it, so a one-token table (L, D) seen as
    (L, 1, D) still grows along its token axis into (L*Q, D).
    """
    groups: list[list[int]] = []
    j = 0
    for size in shape:
        group, product = [], 1
        while j < len(view) and (not group or product != size):
            group.append(j)
            product *= view[j]
            j += 1
        while j < len(view) and view[j] == 1 and (len(groups) == len(shape) - 1 or j + 1 < len(view)):
            group.append(j)
            j += 1
        if product != size:
            break
        groups.append(group)
    if len(groups) != len(shape) or j != len(view):
        raise ValueError(f"view {view} does not split the tensor's shape {shape} into consecutive groups")
    return groups


def module_paths(model: nn.Module) -> dict[int, str]:
    """id(module) -> its dotted path in `model` (the prefix of its state-dict keys)."""
    return {id(m): name for name, m in model.named_modules(remove_duplicate=False)}


def tensor_key(paths: Mapping[int, str], module: nn.Module, name: str) -> str:
    """The state-dict key of `module.<name>`, `paths` being `module_paths(model)`: "blocks.0.attn.qkv"
    + ".weight", or the bare name on the model itself. A module outside the model gets the prefix
    "?", so its key never matches one of the model's by accident (and reads as unknown in a message)."""
    prefix = paths.get(id(module), "?")
    return f"{prefix}.{name}" if prefix else name
