"""One site's block of rows in one tensor: rebuilding the tensor around it, and the stash of rows a
truncate dropped, so that `restore` brings them back bit for bit.

Token identity. Along a site's axis the block `[start, start + count)` holds the site's tokens
0..count-1: in order for a block anchored at its start, back to front for one anchored at its end
(token 0 is the last row). Shrinking to m keeps tokens 0..m-1; growing adds tokens from m on.

Several sites may carry one tensor on different axes (an adapter table seen as (layers, queries,
dim): `query_layer` on one axis, `query_len` on the other). A row dropped along one axis spans the
other sites' tokens as they were then, and a row grown back along it spans them as they are now.
So the stash is a set of `Piece`s: boxes of cells, each with the range of token identities it
covers along every site axis of the tensor. Growing a site with `restore` takes from the pieces
every cell of its new rows they hold, whichever site dropped it; the cells taken (or overwritten
by another strategy) leave the pieces, whose rest stays as views of the same values (nothing is
copied). A cell is stashed only while it is out of the tensor, so pieces never overlap and every
cell comes back exactly once, in any order of changes.

Pieces keep their rows in the tensor's own order (positional), so neither a truncate nor a
restore turns rows around; only strategies, which work from the front, see an end-anchored
block back to front (`_copy_reversed`, `_reverse_rows_`, a few rows at a time).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable, Sequence

import torch

from . import strategies


@dataclasses.dataclass(frozen=True)
class Axis:
    """A site's token axis in a tensor (seen through its view): `count` tokens from row `start`."""

    site: str
    dim: int
    start: int
    count: int
    end: bool = False  # anchored at its end: token i is row start + count - 1 - i

    def rows(self, lo: int, hi: int) -> tuple[int, int]:
        """(first row, number of rows) of tokens [lo, hi)."""
        return (self.start + self.count - hi if self.end else self.start + lo), hi - lo


@dataclasses.dataclass(frozen=True)
class Span:
    """The tokens [lo, hi) of one site axis that a piece covers, in the piece's rows."""

    site: str
    dim: int
    lo: int
    hi: int
    end: bool

    def rows(self, lo: int, hi: int) -> tuple[int, int]:
        return (self.hi - hi if self.end else lo - self.lo), hi - lo


@dataclasses.dataclass(frozen=True)
class Piece:
    """Stashed cells of a tensor: every row of the dims no site owns, the spans' tokens of the others."""

    values: torch.Tensor
    spans: tuple[Span, ...]

    def fits(self, like: torch.Tensor, axes: Sequence[Axis]) -> bool:
        """Whether the piece belongs to a tensor shaped like `like` with these site axes (it does
        not when a dim no site owns changed size since, or the sites were declared otherwise)."""
        if self.values.dim() != like.dim() or self.values.dtype != like.dtype:
            return False
        if {(s.site, s.dim, s.end) for s in self.spans} != {(a.site, a.dim, a.end) for a in axes}:
            return False
        owned = {a.dim for a in axes}
        return all(self.values.shape[d] == like.shape[d] for d in range(like.dim()) if d not in owned)

    def narrowed(self, site: str, lo: int, hi: int) -> "Piece":
        """The part of the piece holding tokens [lo, hi) of `site` (a view)."""
        span = next(s for s in self.spans if s.site == site)
        values = self.values.narrow(span.dim, *span.rows(lo, hi))
        return Piece(values, tuple(dataclasses.replace(s, lo=lo, hi=hi) if s is span else s for s in self.spans))


def same_stash(a: dict[str, tuple[Piece, ...]], b: dict[str, tuple[Piece, ...]]) -> bool:
    """Whether two stashes hold the same pieces (by identity: pieces hold tensors)."""
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(map(operator.is_, a[k], b[k])) for k in a)


Box = dict  # {site: (lo, hi)}: a range of tokens on every site axis


def _box(axes: Sequence[Axis], lo: int, hi: int) -> Box:
    """Tokens [lo, hi) of the first axis, by every token the other axes hold now."""
    return {a.site: (lo, hi) if i == 0 else (0, a.count) for i, a in enumerate(axes)}


def _overlap(piece: Piece, box: Box) -> Box | None:
    found = {}
    for span in piece.spans:
        lo, hi = box[span.site]
        lo, hi = max(lo, span.lo), min(hi, span.hi)
        if lo >= hi:
            return None
        found[span.site] = (lo, hi)
    return found


def _usable(pieces: Sequence[Piece], like: torch.Tensor, axes: Sequence[Axis], box: Box):
    """(piece, overlap with box) for each piece of this tensor holding cells of the box."""
    for piece in pieces:
        if piece.fits(like, axes):
            overlap = _overlap(piece, box)
            if overlap is not None:
                yield piece, overlap


def cut(tensor: torch.Tensor, axes: Sequence[Axis], lo: int, hi: int) -> Piece:
    """A copy of tokens [lo, hi) of the first axis of `tensor` (with every token of the others)."""
    values = tensor
    for a in axes:
        first, n = a.rows(lo, hi) if a is axes[0] else a.rows(0, a.count)
        values = values.narrow(a.dim, first, n)
    spans = tuple(Span(a.site, a.dim, *((lo, hi) if a is axes[0] else (0, a.count)), a.end) for a in axes)
    return Piece(values.clone(), spans)


def coverage(pieces: Sequence[Piece], like: torch.Tensor, axes: Sequence[Axis], lo: int, hi: int) -> list[int]:
    """How many cells of each token row lo..hi-1 of the first axis the pieces hold."""
    covered = [0] * (hi - lo)
    for _, overlap in _usable(pieces, like, axes, _box(axes, lo, hi)):
        a, b = overlap[axes[0].site]
        cells = math.prod(overlap[x.site][1] - overlap[x.site][0] for x in axes[1:])
        for row in range(a, b):
            covered[row - lo] += cells
    return covered


def copy_into(tensor: torch.Tensor, pieces: Sequence[Piece], axes: Sequence[Axis], lo: int, hi: int) -> None:
    """Write every stashed cell of tokens [lo, hi) of the first axis into `tensor`, in place."""
    for piece, overlap in _usable(pieces, tensor, axes, _box(axes, lo, hi)):
        dst, src = tensor, piece.values
        for a in axes:
            span = next(s for s in piece.spans if s.site == a.site)
            dst = dst.narrow(a.dim, *a.rows(*overlap[a.site]))
            src = src.narrow(a.dim, *span.rows(*overlap[a.site]))
        dst.copy_(src)


def without(pieces: Sequence[Piece], like: torch.Tensor, axes: Sequence[Axis], lo: int, hi: int) -> tuple[Piece, ...]:
    """The pieces less the cells of tokens [lo, hi) of the first axis (now back in the tensor)."""
    kept: list[Piece] = []
    box = _box(axes, lo, hi)
    for piece in pieces:
        overlap = _overlap(piece, box) if piece.fits(like, axes) else None
        if overlap is None:
            kept.append(piece)
            continue
        rest = piece  # split off what lies outside the overlap, one site axis at a time
        for span in piece.spans:
            a, b = overlap[span.site]
            if span.lo < a:
                kept.append(rest.narrowed(span.site, span.lo, a))
            if b < span.hi:
                kept.append(rest.narrowed(span.site, b, span.hi))
            rest = rest.narrowed(span.site, a, b)
    return tuple(kept)


# -- rebuilding a tensor around its block -----------------------------------------------------------

Shrink = Callable[[torch.Tensor, torch.Tensor], None]  # (old rows (old, *rest), out (new, *rest)), front first
Grow = Callable[[torch.Tensor, int], None]  # (rows (new, *rest) with the first `have` in place, have)


def resize_block(viewed: torch.Tensor, axes: Sequence[Axis], new: int, pieces: tuple[Piece, ...], *,
                 shrink: Shrink | None, grow: Grow, restore: bool) -> tuple[torch.Tensor, tuple[Piece, ...]]:
    """The tensor with the first axis' block at `new` tokens, and the stash after it.

    Shrinking: `shrink=None` truncates (keeps tokens 0..new-1 and stashes the rest), else `shrink`
    writes the new rows from the old ones. Growing: the old tokens are kept; with `restore`, the
    stashed cells of the new rows come back, and `grow` makes the rows after the leading ones
    that came back whole (cells it writes that were stashed are put back after it); without,
    `grow` makes every new row (and may rewrite the old ones: `interpolate`).

    The new tensor is allocated once: the rows around the block are copied over and everything
    else is written straight into it, so a large change makes no temporaries of the site's size.
    It never shares memory with `viewed`, which is kept for an exact undo.
    """
    own = axes[0]
    old, dim = own.count, own.dim
    shape = list(viewed.shape)
    shape[dim] += new - old
    out = viewed.new_empty(shape)
    after = viewed.shape[dim] - own.start - old
    out.narrow(dim, 0, own.start).copy_(viewed.narrow(dim, 0, own.start))
    out.narrow(dim, own.start + new, after).copy_(viewed.narrow(dim, own.start + old, after))
    before = viewed.narrow(dim, own.start, old).movedim(dim, 0)  # (old, *rest)
    rows = out.narrow(dim, own.start, new).movedim(dim, 0)  # (new, *rest), a view of `out`
    if new < old:
        if shrink is None:
            rows.copy_(before[old - new:] if own.end else before[:new])
            return out, (*pieces, cut(viewed, axes, new, old))
        if own.end:  # strategies work from the front
            front_first = before.new_empty(before.shape)
            _copy_reversed(front_first, before)
            shrink(front_first, rows)
            _reverse_rows_(rows)
        else:
            shrink(before, rows)
        return out, pieces
    grown = (dataclasses.replace(own, count=new), *axes[1:])
    if restore:
        (rows[new - old:] if own.end else rows[:old]).copy_(before)
        whole = math.prod(a.count for a in axes[1:])
        covered = coverage(pieces, out, grown, old, new)
        have = old
        while have < new and covered[have - old] == whole:
            have += 1
        copy_into(out, pieces, grown, old, have)
        if have < new:  # rows the stash does not hold whole: `grow`, then the cells it does hold
            if own.end:
                _reverse_rows_(rows)
            grow(rows, have)
            if own.end:
                _reverse_rows_(rows)
            copy_into(out, pieces, grown, have, new)
    else:
        if own.end:
            _copy_reversed(rows[:old], before)
        else:
            rows[:old].copy_(before)
        grow(rows, old)
        if own.end:
            _reverse_rows_(rows)
    return out, without(pieces, out, grown, old, new)


def _chunk_rows(x: torch.Tensor) -> int:
    """Rows per temporary when turning rows around: as many as strategies.chunk_values allows."""
    return max(1, strategies.chunk_values(x) // max(1, x[:1].numel()))


def _copy_reversed(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[i] = src[n - 1 - i] along dim 0, through temporaries of a few rows."""
    n, step = src.shape[0], _chunk_rows(src)
    for i in range(0, n, step):
        k = min(step, n - i)
        dst[i:i + k].copy_(src[n - i - k:n - i].flip(0))


def _reverse_rows_(x: torch.Tensor) -> None:
    """Reverse x along dim 0 in place, swapping a few rows from each end at a time."""
    n, step = x.shape[0], _chunk_rows(x)
    for i in range(0, n // 2, step):
        k = min(step, n // 2 - i)
        front, back = x[i:i + k], x[n - i - k:n - i]
        saved = front.clone()
        front.copy_(back.flip(0))
        back.copy_(saved.flip(0))
