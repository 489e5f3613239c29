"""How new tokens are made (growth) and how tokens are removed (shrink).

Every strategy works on one site's block of one tensor, with the token axis moved to the front:
`block` is `(n, *rest)` and the result is `(m, *rest)`. Statistics are taken over the token axis
only, separately for every position of `rest` (for an adapter table seen as (L, Q, D) each of
the L layers keeps its own statistics). Arithmetic is done in float32 and cast back, so bf16 and
fp16 tables get the same new values as fp32 ones would, rounded once.

Growth strategies keep the existing tokens and append new ones, except `interpolate`, which
resamples the whole block to the new count. Shrink strategies: `truncate` keeps the first m
tokens (the engine stashes the dropped ones so that growing back with `restore` brings them back
bit-exactly); `pool` averages the block down to m tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import StrategyError

# std of new tokens when there are none to match: timm's init for class and register tokens.
EMPTY_NORMAL_STD = 1e-6

Growth = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
Shrink = Callable[[torch.Tensor, int], torch.Tensor]


def _float(block: torch.Tensor) -> torch.Tensor:
    return block.to(torch.float32)


def _need_tokens(name: str, block: torch.Tensor) -> None:
    if block.shape[0] == 0:
        raise StrategyError(
            f"init {name!r} needs existing tokens to work from, and there are none; "
            f"use 'zeros' or 'normal' to grow from zero tokens"
        )


def grow_zeros(block: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    new = block.new_zeros((m - block.shape[0], *block.shape[1:]))
    return torch.cat([block, new])


def grow_mean(block: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    _need_tokens("mean", block)
    mean = _float(block).mean(dim=0, keepdim=True)  # (1, *rest)
    new = mean.expand(m - block.shape[0], *block.shape[1:]).to(block.dtype)
    return torch.cat([block, new])


def grow_normal(block: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """New tokens ~ N(mean, std) of the existing ones: per-feature mean, the block's spread.

    The standard deviation is taken over all existing values around their per-feature means, so a
    single existing token still gives a scale. With no existing tokens: N(0, 1e-6), timm's init.
    """
    k = m - block.shape[0]
    noise = torch.randn((k, *block.shape[1:]), generator=gen, dtype=torch.float32)
    if block.shape[0] == 0:
        new = noise * EMPTY_NORMAL_STD
    else:
        x = _float(block)
        mean = x.mean(dim=0, keepdim=True)  # (1, *rest)
        std = (x - mean).square().mean().sqrt() if x.shape[0] > 1 else x.std(correction=0)
        new = mean + noise.to(mean.device) * std
    return torch.cat([block, new.to(device=block.device, dtype=block.dtype)])


def grow_copy(block: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """New token i is a copy of existing token i mod n (cycle the existing tokens)."""
    _need_tokens("copy", block)
    index = torch.arange(block.shape[0], m, device=block.device) % block.shape[0]
    return torch.cat([block, block.index_select(0, index)])


def grow_interpolate(block: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """Resample the n tokens to m by linear interpolation along the token axis (ends kept)."""
    _need_tokens("interpolate", block)
    return _resample(block, m)


def shrink_truncate(block: torch.Tensor, m: int) -> torch.Tensor:
    return block[:m]


def shrink_pool(block: torch.Tensor, m: int) -> torch.Tensor:
    """Average the n tokens down to m (adaptive average pooling along the token axis)."""
    if m == 0:
        return block[:0]
    n, rest = block.shape[0], block.shape[1:]
    x = _float(block).reshape(n, -1).t().unsqueeze(0)  # (1, features, n)
    pooled = F.adaptive_avg_pool1d(x, m)  # (1, features, m)
    return pooled[0].t().reshape(m, *rest).to(block.dtype)


def _resample(block: torch.Tensor, m: int) -> torch.Tensor:
    n, rest = block.shape[0], block.shape[1:]
    x = _float(block).reshape(n, -1).t().unsqueeze(0)  # (1, features, n)
    if n == 1:
        y = x.expand(1, x.shape[1], m)
    else:
        y = F.interpolate(x, size=m, mode="linear", align_corners=True)  # (1, features, m)
    return y[0].t().reshape(m, *rest).to(block.dtype)


GROWTH: dict[str, Growth] = {
    "zeros": grow_zeros,
    "mean": grow_mean,
    "normal": grow_normal,
    "copy": grow_copy,
    "interpolate": grow_interpolate,
}
SHRINK: dict[str, Shrink] = {
    "truncate": shrink_truncate,
    "pool": shrink_pool,
}
# `restore` is the default growth: bring back tokens a truncate stashed, then the site's default.
RESTORE = "restore"
GROWTH_NAMES = (RESTORE, *GROWTH)
SHRINK_NAMES = tuple(SHRINK)


def check_growth(name: str) -> str:
    if name not in GROWTH_NAMES:
        raise StrategyError(f"unknown init strategy {name!r}; allowed: {', '.join(GROWTH_NAMES)}")
    return name


def check_shrink(name: str) -> str:
    if name not in SHRINK_NAMES:
        raise StrategyError(f"unknown shrink strategy {name!r}; allowed: {', '.join(SHRINK_NAMES)}")
    return name
