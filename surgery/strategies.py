"""How new tokens are made (growth) and how tokens are removed (shrink).

Each strategy maps one site's block of one tensor, token axis first, `(n, *rest)` to `(m, *rest)`.
Statistics are over the token axis only, per position of `rest` (each adapter layer keeps its own),
in float32 and cast back, so bf16 and fp16 tables get fp32's values rounded once. Growth appends
(`interpolate` resamples the whole block); `truncate` keeps the first m (the engine stashes the rest
for `restore`), `pool` averages down to m.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import StrategyError

# std of new tokens when there are none to match: timm's init for class and register tokens.
EMPTY_NORMAL_STD = 1e-6

# New tokens drawn by `normal` are made this many values at a time in a reused buffer, so a large
# growth (246 new queries of a 31-layer, 4096-wide adapter: 31M values) never allocates its noise
# as one more tensor of the site's size. See `_fill_normal` for why the values do not change.
NORMAL_CHUNK = 1 << 20

Growth = Callable[..., torch.Tensor]  # (block, m, generator, *, out=None) -> (m, *rest)
Shrink = Callable[[torch.Tensor, int], torch.Tensor]


def _float(block: torch.Tensor) -> torch.Tensor:
    return block.to(torch.float32)


def _need_tokens(name: str, block: torch.Tensor) -> None:
    if block.shape[0] == 0:
        raise StrategyError(
            f"init {name!r} needs existing tokens to work from, and there are none; "
            f"use 'zeros' or 'normal' to grow from zero tokens"
        )


def _output(block: torch.Tensor, m: int, out: torch.Tensor | None) -> torch.Tensor:
    """Where a growth writes its m tokens: `out` (the engine passes the new tensor's rows, often a
    strided view of it, so that nothing is built twice), or a new tensor."""
    if out is None:
        return block.new_empty((m, *block.shape[1:]))
    if tuple(out.shape) != (m, *block.shape[1:]) or out.dtype != block.dtype:
        raise StrategyError(f"growth output is {tuple(out.shape)} {out.dtype}; expected "
                            f"{(m, *block.shape[1:])} {block.dtype}")
    return out


def keep(block: torch.Tensor, out: torch.Tensor) -> None:
    """Put the existing tokens first. Nothing to do when `block` already is `out`'s first rows (the
    engine's restore path hands over rows it has already placed)."""
    head = out[: block.shape[0]]
    already = (head.data_ptr() == block.data_ptr() and head.stride() == block.stride()
               and head.device == block.device)
    if not already:
        head.copy_(block)


def grow_zeros(block: torch.Tensor, m: int, gen: torch.Generator, *, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _output(block, m, out)
    keep(block, out)
    out[block.shape[0]:].zero_()
    return out


def grow_mean(block: torch.Tensor, m: int, gen: torch.Generator, *, out: torch.Tensor | None = None) -> torch.Tensor:
    _need_tokens("mean", block)
    out = _output(block, m, out)
    mean = _float(block).mean(dim=0, keepdim=True)  # (1, *rest)
    keep(block, out)
    new = out[block.shape[0]:]
    new.copy_(mean.expand_as(new))  # rounded once to the table's dtype
    return out


def grow_normal(block: torch.Tensor, m: int, gen: torch.Generator, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """New tokens ~ N(mean, std) of the existing ones: per-feature mean, the block's spread.

    The standard deviation is taken over all existing values around their per-feature means, so a
    single existing token still gives a scale. With no existing tokens: N(0, 1e-6), timm's init.
    The values are `mean + torch.randn((m - n, *rest), generator=gen) * std` in float32, rounded
    once to the block's dtype.
    """
    out = _output(block, m, out)
    if block.shape[0] == 0:
        mean, std = None, EMPTY_NORMAL_STD
    elif block.shape[0] == 1:
        mean, std = _float(block), _float(block).std(correction=0)
    else:
        mean, std = mean_and_spread(block)
    keep(block, out)
    _fill_normal(out[block.shape[0]:], gen, mean, std)
    return out


def chunk_values(t: torch.Tensor) -> int:
    """Values per temporary while a site's tensor is rebuilt (here and in the engine): NORMAL_CHUNK,
    and at most 1/16 of the tensor (small sites stay small)."""
    return max(16, min(NORMAL_CHUNK, t.numel() // 16))


def mean_and_spread(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean (1, *rest) and the spread sqrt(mean over features of the per-feature
    variance) of a block of n >= 2 tokens, in float32.

    Computed a slice of features at a time, so a large table (or a bf16 one, widened to float32)
    never gets a temporary of its own size: a growth stays within twice the site's bytes.
    """
    n, rest = block.shape[0], block.shape[1:]
    if not rest:
        x = _float(block)
        mean = x.mean(dim=0, keepdim=True)
        return mean, (x - mean).square().mean().sqrt()
    mean = torch.empty((1, *rest), dtype=torch.float32, device=block.device)
    squares = torch.zeros((), dtype=torch.float64, device=block.device)  # sum of squared deviations
    step = max(1, chunk_values(block) // (n * math.prod(rest[1:]) or 1))
    for j in range(0, rest[0], step):
        part = _float(block[:, j:j + step])  # (n, s, *rest[1:])
        mean[:, j:j + step] = part_mean = part.mean(dim=0, keepdim=True)
        squares += torch.sub(part, part_mean).square_().sum(dtype=torch.float64)
    return mean, (squares / block.numel()).sqrt().float()


def _fill_normal(new: torch.Tensor, gen: torch.Generator, mean: torch.Tensor | None, std) -> None:
    """new[...] = mean + randn(new.shape, generator=gen) * std, drawn a chunk of rows at a time.

    torch draws normals on the CPU in groups of 16 from one uniform stream, so consecutive draws of
    a multiple of 16 values each give exactly the values of one large draw (tests/test_strategies.py
    checks this against a single `torch.randn`). Chunks are whole rows and a multiple of 16 values; the buffer
    is reused, so the noise never exists as a full-size tensor, and each chunk is scaled in place
    and written (cast, moved to the table's device) straight into its rows of `new`.
    """
    k, row = new.shape[0], math.prod(new.shape[1:])
    if k == 0 or row == 0 or new.device.type == "meta":  # no values to make (a meta tensor has none)
        return
    # the arithmetic is done on the CPU, beside the generator: float32 `*` and `+` round the same
    # on every device, so the values are the ones the block's device would have computed
    mean = None if mean is None else mean.to("cpu")
    std = std.to("cpu") if isinstance(std, torch.Tensor) else std
    step = 16 // math.gcd(row, 16)  # rows per group whose values are a multiple of 16
    rows = max(step, chunk_values(new) // row // step * step)
    # (a last chunk of under 16 values would be drawn another way: it joins the one before)
    buffer = torch.empty(min(rows + 16, k) * row, dtype=torch.float32)
    i = 0
    while i < k:
        n = min(rows, k - i)
        if 0 < (k - i - n) * row < 16:
            n = k - i
        noise = buffer[: n * row].view(n, *new.shape[1:]).normal_(generator=gen)  # (n, *rest)
        noise.mul_(std)
        if mean is not None:
            noise.add_(mean)
        new[i:i + n].copy_(noise)
        i += n


def grow_copy(block: torch.Tensor, m: int, gen: torch.Generator, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """New token i is a copy of existing token i mod n (cycle the existing tokens)."""
    _need_tokens("copy", block)
    out = _output(block, m, out)
    keep(block, out)
    n = block.shape[0]
    for start in range(n, m, n):  # whole copies of the block, the last one cut short
        out[start:start + n].copy_(block[: min(n, m - start)])
    return out


def grow_interpolate(block: torch.Tensor, m: int, gen: torch.Generator, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Resample the n tokens to m by linear interpolation along the token axis (ends kept)."""
    _need_tokens("interpolate", block)
    resampled = _resample(block, m)  # computed in full first: `block` may be `out`'s first rows
    if out is None:
        return resampled
    _output(block, m, out).copy_(resampled)
    return out


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
