"""Pieces every family of the transformers plugin shares: config counters, fixed sites, tiny builds.

A Hugging Face model keeps its counts in its config (`config.num_query_tokens`), and one config
object may be held by several modules (a classification model, its base model and its
embeddings hold the same one), or a sub-model may hold a config of its own: every distinct
config object that has the attribute gets a counter, so `save_pretrained` writes the new count
and `from_pretrained` builds the model at it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from surgery.errors import ModelConfigError
from surgery.site import Counter, TokenSite, TokenTensor

SEED_INPUTS = 0  # example inputs are seeded: the conformance kit compares outputs bit for bit


def held_configs(model: nn.Module) -> list[Any]:
    """The distinct config objects the model's modules hold (`module.config`), model's first."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and hasattr(config, "to_dict"):
            seen.setdefault(id(config), config)
    return list(seen.values())


def config_counters(model: nn.Module, attr: str, value: Callable[[int], Any] | None = None) -> list[Counter]:
    """`attr` on every config object of the model that has it."""
    return [Counter(config, attr, value) for config in held_configs(model) if hasattr(config, attr)]


def module_counters(model: nn.Module, attr: str) -> list[Counter]:
    """`attr` on every module holding it as a plain int (DINOv2's Backbone keeps its own copy)."""
    return [Counter(m, attr) for m in model.modules() if type(m.__dict__.get(attr)) is int]


def embedding_rows(embedding: nn.Embedding) -> tuple[TokenTensor, Counter]:
    """An `nn.Embedding` whose rows are the tokens: its weight, and `num_embeddings` following it."""
    return TokenTensor(embedding, "weight", axis=0), Counter(embedding, "num_embeddings")


def fixed_site(name: str, count: int, tensors: list[TokenTensor], note: str, description: str) -> TokenSite:
    """A count transformers cannot build otherwise: declared (shown by `surgery inspect`), every
    change refused with `note`."""
    return TokenSite(name=name, count=count, tensors=tensors, min=count, max=count, note=note,
                     description=description)


def fixed_count(name: str, asked: Any, count: int, note: str) -> None:
    """A factory's keyword for a fixed site (the conformance kit passes every site's count): only its count."""
    if asked != count:
        raise ModelConfigError(f"{name}={asked!r}: only {count} can be built ({note})")


def seeded(*shape: int, high: int | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
    """Seeded random inputs: normal floats, or integers in [0, high)."""
    gen = torch.Generator().manual_seed(SEED_INPUTS)
    if high is not None:
        return torch.randint(0, high, shape, generator=gen)
    x = torch.randn(*shape, generator=gen)
    return x if like is None else x.to(device=like.device, dtype=like.dtype)


def images(model: nn.Module, size: int | tuple, channels: int = 3, batch: int = 2) -> torch.Tensor:
    """A seeded batch of images (`size` as a config gives it: an int or (height, width)), in the
    model's dtype and on its device."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return seeded(batch, channels, height, width, like=next(model.parameters()))


def tensors_of(output: Any, names: Iterable[str]) -> tuple[torch.Tensor, ...]:
    """The named fields of a transformers output, flattening tuples of tensors (hidden states)."""
    found: list[torch.Tensor] = []
    for name in names:
        value = getattr(output, name)
        found.extend(value if isinstance(value, (tuple, list)) else [value])
    return tuple(found)


TOKEN_TABLES = ("query_tokens", "register_tokens", "cls_token", "distillation_token", "mask_token")


def randomize_zero_tokens(model: nn.Module) -> nn.Module:
    """transformers initialises learned tokens to zeros (trained ones never are): drawn from N(0, 1)
    instead, in place, so that every token differs and a test can tell which ones a resize kept."""
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            # on the meta device (a model only counted, `surgery inspect FILE`) there are no values
            if name.rsplit(".", 1)[-1] in TOKEN_TABLES and not tensor.is_meta and not tensor.any():
                tensor.normal_()
    return model


def build(cls: type, config: Any) -> nn.Module:
    """A transformers model from a config, random weights (token tables too), eval mode: what the
    registered tiny models' factories return."""
    return randomize_zero_tokens(cls(config).eval())
