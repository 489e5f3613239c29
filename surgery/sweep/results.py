"""A sweep's results on disk, in `--out DIR`: the resume log (cells.jsonl), tidy tables (results.csv,
results.json), a plot per metric and site, saved generations and summary.md (docs/sweeps.md).

A failed cell is one row with its error. Files are rewritten from the log after every run, so they
always hold exactly the current grid's cells.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..bench import report
from .grid import NO_INIT, Cell
from .runner import CellResult

LOG = "cells.jsonl"
TABLE = "results"


class Store:
    """The resume log of one output folder: results by cell key, appended as cells finish."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOG
        self.results: dict[str, CellResult] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        result = CellResult.from_dict(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by an interrupted run: that cell runs again
                    self.results[result.cell.key] = result

    def finished(self, cell: Cell) -> bool:
        found = self.results.get(cell.key)
        return found is not None and found.ok

    def add(self, result: CellResult) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(result.to_dict(), default=str) + "\n")
        self.results[result.cell.key] = result
        if result.artifacts:
            folder = self.out / "generations"
            folder.mkdir(exist_ok=True)
            (folder / f"{result.cell.key}.json").write_text(
                json.dumps({"cell": result.cell.to_dict(), **result.artifacts}, indent=1, default=str) + "\n",
                encoding="utf-8")

    def of(self, cells: Iterable[Cell]) -> list[CellResult]:
        return [self.results[c.key] for c in cells if c.key in self.results]


# -- tidy rows -------------------------------------------------------------------------------------


def rows(results: Sequence[CellResult], versions: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        c = r.cell
        base = {"model": c.model, "site": c.label, "count": c.count_text, "counts": dict(c.counts), "init": c.init,
                "seed": c.seed, "head_mode": c.head_mode, "steps": c.training.steps, "lr": c.training.lr,
                "batch_size": c.training.batch_size, "rows": c.training.rows, "baseline": c.baseline}
        tail = {"seconds": round(r.seconds, 4), "error": r.error, "key": c.key, "versions": dict(versions)}
        if not r.ok:
            out.append({**base, "metric": None, "value": None, **tail})
        for metric, value in r.values.items():
            out.append({**base, "metric": metric, "value": value, **tail})
    return out


# -- plots -----------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "x"


def plot(results: Sequence[CellResult], out: Path) -> list[Path]:
    """One PNG per model, swept site (or joint sites) and metric value: the metric against the count,
    a line per init strategy (and head mode), seeds averaged, the baseline marked."""
    files = []
    ok = [r for r in results if r.ok]
    for model in dict.fromkeys(r.cell.model for r in ok):
        mine = [r for r in ok if r.cell.model == model]
        baseline = next((r for r in mine if r.cell.baseline), None)
        for label in dict.fromkeys(r.cell.label for r in mine if not r.cell.baseline):
            swept = [r for r in mine if r.cell.label == label]
            first_site = next(iter(swept[0].cell.counts))
            for metric in dict.fromkeys(m for r in swept for m in r.values):
                series = _series(swept, first_site, metric, baseline)
                if not series:
                    continue
                mark = None
                if baseline is not None and metric in baseline.values:
                    mark = (baseline.cell.counts[first_site], baseline.values[metric])
                path = out / f"{_file_part(metric)}__{_file_part(Path(model).stem)}__{_file_part(label)}.png"
                if report.plot_lines(series, path, f"{metric}: {model}, {label}", f"{first_site} count", metric,
                                     baseline=mark) is not None:  # None: matplotlib is not installed
                    files.append(path)
    return files


def _series(swept: Sequence[CellResult], first_site: str, metric: str,
            baseline: CellResult | None) -> dict[str, list[tuple[float, float]]]:
    """{line label: [(count, value averaged over seeds)]}; the cells that grow nothing (no init
    strategy) and the baseline belong to every strategy's line."""
    points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    shared: dict[float, list[float]] = defaultdict(list)
    for r in swept:
        if metric not in r.values:
            continue
        c = r.cell
        others = ",".join(f"{s}={n}" for s, n in c.counts.items() if s != first_site)
        x = c.counts[first_site]
        if c.init == NO_INIT and not others and c.head_mode is None:
            shared[x].append(r.values[metric])
            continue
        name = " ".join(p for p in (c.init if c.init != NO_INIT else "", c.head_mode or "", others) if p) or "cells"
        points[name][x].append(r.values[metric])
    if baseline is not None and metric in baseline.values and first_site in baseline.cell.counts:
        shared[baseline.cell.counts[first_site]].append(baseline.values[metric])
    if not points and shared:
        points["truncate"] = defaultdict(list)
    series = {}
    for name, by_x in points.items():
        merged = {**{x: v for x, v in shared.items()}, **by_x}
        series[name] = [(x, _mean(v)) for x, v in sorted(merged.items())]
    return series


# -- the summary -----------------------------------------------------------------------------------


def summary_sections(results: Sequence[CellResult], grid_text: str) -> list[tuple[str, str]]:
    """Markdown: the grid; per model and swept site a table of the values (seeds averaged); failures."""
    sections = [("Grid", grid_text)]
    ok = [r for r in results if r.ok]
    for model in dict.fromkeys(r.cell.model for r in ok):
        mine = [r for r in ok if r.cell.model == model]
        metrics = list(dict.fromkeys(m for r in mine for m in r.values))
        groups: dict[tuple, list[CellResult]] = defaultdict(list)
        for r in mine:
            c = r.cell
            groups[(c.label, c.count_text, c.init, c.head_mode or "-", c.training.steps)].append(r)
        table = []
        for (label, count, init, mode, steps), group in groups.items():
            seeds = ",".join(str(s) for s in sorted({r.cell.seed for r in group}))
            values = [_mean([r.values[m] for r in group if m in r.values]) if any(m in r.values for r in group)
                      else None for m in metrics]
            table.append([label, count, init, mode, steps, seeds, *values,
                          _mean([r.seconds for r in group])])
        headers = ["site", "count", "init", "head mode", "steps", "seeds", *metrics, "seconds"]
        sections.append((f"{model}", report.markdown_table(headers, table)))
    failed = [r for r in results if not r.ok]
    if failed:
        lines = [f"- `{r.cell.key}` {r.cell.model} {r.cell.label}={r.cell.count_text} init {r.cell.init} "
                 f"seed {r.cell.seed}: {r.error}" for r in failed]
        sections.append((f"Failed cells ({len(failed)})", "\n".join(lines)))
    return sections


def write(out: Path, results: Sequence[CellResult], env: Mapping[str, Any], versions: Mapping[str, Any],
          grid_text: str, title: str = "Sweep") -> list[Path]:
    """results.csv/json, the plots and summary.md for `results` (the current grid's cells)."""
    files = report.write_table(out, TABLE, rows(results, versions), env)
    files += plot(results, out)
    files.append(report.write_summary(out, title, summary_sections(results, grid_text), env, files))
    return files


__all__ = ["Store", "rows", "plot", "write", "summary_sections", "LOG", "TABLE"]
