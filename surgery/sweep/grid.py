"""The grid of a sweep: one `Cell` per model x counts x init strategy x seed (x head mode).

Sites are swept one at a time or jointly; the baseline (the model as loaded) is always a cell, and
cells that would compute the same thing are one (no strategy for a count that grows nothing, one
seed where nothing is drawn). A cell's `key` hashes all that decides its numbers, so a rerun finds
the cells it already has (`results.Store`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import SweepError

NO_INIT = "none"  # the strategy of a cell that grows nothing
RANDOM_INITS = ("normal", "restore")  # strategies that draw (restore falls back on the site's default, often normal)
ROWS = ("new", "all")


@dataclass(frozen=True)
class Training:
    """How a cell trains its tokens before it is evaluated (steps=0: not at all)."""

    steps: int = 0
    lr: float = 1e-2
    batch_size: int = 64
    rows: str = "new"  # "new": the rows a site gained; "all": every row of the swept sites
    objective: str | None = None  # the metric whose loss is minimised (default: the first with one)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise SweepError(f"train steps must be an integer >= 0, got {self.steps!r}")
        if not self.lr > 0:
            raise SweepError(f"learning rate must be > 0, got {self.lr!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SweepError(f"batch size must be an integer >= 1, got {self.batch_size!r}")
        if self.rows not in ROWS:
            raise SweepError(f"rows={self.rows!r}: choose 'new' (the rows a site gained) or 'all'")


@dataclass(frozen=True)
class Grid:
    models: tuple[str, ...]
    sites: Mapping[str, tuple[int, ...]]  # site -> counts to try
    inits: tuple[str, ...] = ("normal",)
    seeds: tuple[int, ...] = (0,)
    head_modes: tuple[str, ...] | None = None  # where the model has a `head_mode` option
    joint: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise SweepError("a sweep needs at least one model (a registered name or a checkpoint file)")
        if not self.inits or not self.seeds:
            raise SweepError("a sweep needs at least one init strategy and one seed")
        for site, counts in self.sites.items():
            if not counts:
                raise SweepError(f"site {site!r} has no counts to try")
            for c in counts:
                if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                    raise SweepError(f"site {site!r}: counts are integers >= 0, got {c!r}")


@dataclass(frozen=True)
class Cell:
    """One point of the grid. `counts` are the swept sites' counts; `label` names what was swept."""

    model: str
    counts: Mapping[str, int]
    init: str
    seed: int
    head_mode: str | None
    training: Training
    baseline: bool = False
    label: str = ""  # "reg_tokens", "class_token+reg_tokens", or "baseline"
    context: str = ""  # the metrics and data the numbers depend on (part of the key)
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", cell_key(self))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = dict(self.counts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Cell":
        return cls(**{**d, "training": Training(**d["training"]), "counts": dict(d["counts"])})

    @property
    def count_text(self) -> str:
        return "+".join(str(self.counts[s]) for s in self.counts)


def cell_key(cell: Cell) -> str:
    what = [cell.model, sorted(cell.counts.items()), cell.init, cell.seed, cell.head_mode, asdict(cell.training),
            cell.baseline, cell.context]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cells(grid: Grid, training: Training, baselines: Mapping[str, Mapping[str, int]],
          baseline_modes: Mapping[str, str | None] | None = None, context: str = "") -> list[Cell]:
    """Every cell of the grid, baselines first, duplicates merged (see the module doc).
    `baselines` gives each model's own counts, `baseline_modes` its own head mode."""
    out: dict[str, Cell] = {}
    sites = list(grid.sites)
    untrained = Training(**{**asdict(training), "steps": 0})
    for model in grid.models:
        base = dict(baselines[model])
        unknown = [s for s in sites if s not in base]
        if unknown:
            raise SweepError(f"model {model!r} has no token site {unknown[0]!r}; "
                             f"its sites: {', '.join(base) or 'none'}")
        own_mode = (baseline_modes or {}).get(model)
        first = Cell(model, {s: base[s] for s in sites}, NO_INIT, grid.seeds[0], None, untrained, baseline=True,
                     label="baseline", context=context)
        out[first.key] = first
        if grid.joint:
            combos = [dict(zip(sites, values)) for values in itertools.product(*(grid.sites[s] for s in sites))]
            labels = ["+".join(sites)] * len(combos)
        else:
            combos = [{s: c} for s in sites for c in grid.sites[s]]
            labels = [next(iter(c)) for c in combos]
        for counts, label in zip(combos, labels):
            for init, seed, mode in itertools.product(grid.inits, grid.seeds, grid.head_modes or (None,)):
                grows = any(c > base[s] for s, c in counts.items())
                trains = training.steps > 0 and (grows or training.rows == "all")
                changed = any(c != base[s] for s, c in counts.items()) or (mode not in (None, own_mode)) or trains
                if not changed:
                    continue  # the baseline itself
                init_used = init if grows else NO_INIT
                seed_used = seed if trains or init_used in RANDOM_INITS else grid.seeds[0]
                trained = training if trains else untrained  # nothing to train: recorded as 0 steps
                cell = Cell(model, counts, init_used, seed_used, mode, trained, label=label, context=context)
                out.setdefault(cell.key, cell)
    return list(out.values())


def parse_counts(text: str) -> tuple[int, ...]:
    """"0,1,2,4,8" or a range "0..8" (inclusive) or both: "0..2,4,8"."""
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("..")
        try:
            values.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError:
            raise SweepError(f"counts {text!r}: expected integers or ranges like 0..8, got {part!r}") from None
    if not values:
        raise SweepError(f"counts {text!r}: no count given")
    return tuple(dict.fromkeys(values))


def site_counts(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """["reg_tokens=0..8", "class_token=0,1"] -> {site: counts}."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        site, sep, counts = item.partition("=")
        if not sep or not site.strip():
            raise SweepError(f"expected SITE=COUNTS (e.g. reg_tokens=0,1,2,4,8 or reg_tokens=0..8), got {item!r}")
        if site.strip() in out:
            raise SweepError(f"site {site.strip()!r} given twice")
        out[site.strip()] = parse_counts(counts)
    return out


__all__ = ["Grid", "Cell", "Training", "cells", "cell_key", "parse_counts", "site_counts", "NO_INIT"]
