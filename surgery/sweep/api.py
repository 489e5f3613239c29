"""`surgery.sweep(...)`: plan the grid, run its cells (here or on Ray), write the results.

Every model is loaded once here and everything that can be refused is refused before any cell runs
(an unknown site, a metric that does not apply or cannot use the data, training without an
objective), so a mistake costs seconds, not a grid.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import __version__
from ..errors import SweepError
from .data import load_data
from .grid import Cell, Grid, Training, cells as grid_cells, parse_counts
from .runner import CellResult, Plan, Session, looks_like_file, run_local, threads
from . import results as results_io

EXECUTORS = ("local", "ray")


@dataclass
class SweepResult:
    out: Path
    cells: list[Cell]
    results: list[CellResult]
    files: list[Path] = field(default_factory=list)
    skipped: int = 0  # cells found finished in the resume log

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if not r.ok]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return results_io.rows(self.results, {})

    def value(self, metric: str, **where: Any) -> list[float]:
        """The values of `metric` of the cells matching `where` (cell fields, or a site's count)."""
        out = []
        for r in self.results:
            c = r.cell
            fields = {**c.to_dict(), **c.counts}
            if metric in r.values and all(fields.get(k) == v for k, v in where.items()):
                out.append(r.values[metric])
        return out


def _tuple(value: Any, name: str) -> tuple:
    if value is None:
        return ()
    items = (value,) if isinstance(value, (str, int)) else tuple(value)
    if not items:
        raise SweepError(f"{name} is empty")
    return items


# Libraries whose version a result depends on, recorded when installed (read from their
# metadata: nothing is imported, so a sweep of one backbone needs none of the others).
RECORDED_LIBRARIES = ("timm", "transformers", "peft", "sentencepiece", "ray")


def versions(executor: str) -> dict[str, Any]:
    """token-surgery's, Python's and the installed libraries' versions, and each loaded plugin's."""
    import importlib.metadata

    import torch

    from surgery.plugins import get_host

    found: dict[str, Any] = {"token-surgery": __version__, "python": platform.python_version(),
                             "torch": torch.__version__}  # with its build tag (+cu130), which metadata drops
    for library in RECORDED_LIBRARIES:
        try:
            found[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            if library == "ray" and executor == "ray":
                raise SweepError("--executor ray needs Ray: pip install 'token-surgery[ray]'") from None
    found["plugins"] = {r.name: r.version for r in get_host().records.values() if r.active}
    return found


def sweep(models: str | Sequence[str], sites: Mapping[str, Any], *, inits: str | Sequence[str] = ("normal",),
          seeds: int | Sequence[int] = (0,), head_modes: str | Sequence[str] | None = None, joint: bool = False,
          data: str | None = None, eval_fraction: float = 0.2, metrics: str | Sequence[str] | None = None,
          train_steps: int = 0, lr: float = 1e-2, batch_size: int = 64, rows: str = "new",
          objective: str | None = None, options: Mapping[str, Any] | None = None, executor: str = "local",
          address: str | None = None, workers: int = 2, cpus_per_cell: int = 1, gpus_per_cell: float = 0,
          device: str = "cpu", threads_per_cell: int | None = None, eval_batch_size: int = 64,
          shrink: str = "truncate", out: str | Path = "out/sweep", force: bool = False,
          progress: bool = True) -> SweepResult:
    """Run a sweep and write its results to `out` (docs/sweeps.md).

    `models`: registered names or checkpoint files; `sites`: {site: counts} (a list, or "0..8");
    `inits`, `seeds`, `head_modes`: the other axes; `joint`: every combination of the sites' counts
    instead of one site at a time; `data`: an image folder, a .jsonl/.csv manifest, or None for the
    embedded digits; `metrics`: names (default: every metric of the model that accepts the data);
    `train_steps`, `lr`, `batch_size`, `rows` ("new" or "all"), `objective`: training of the new
    tokens before each cell is measured; `executor` "local" or "ray" (`address`, `workers`,
    `cpus_per_cell`, `gpus_per_cell`); `force` reruns cells the resume log has.
    """
    if executor not in EXECUTORS:
        raise SweepError(f"executor {executor!r}: choose local or ray")
    if address and executor != "ray":
        raise SweepError("an address is for --executor ray")
    counts = {site: parse_counts(c) if isinstance(c, str) else _tuple(c, f"counts of {site!r}")
              for site, c in sites.items()}
    if not counts:
        raise SweepError("a sweep needs at least one site and its counts, e.g. {'reg_tokens': [0, 1, 2, 4, 8]}")
    # files by absolute path: Ray workers need not share this process's working folder
    models = tuple(os.path.abspath(m) if looks_like_file(m) else m for m in _tuple(models, "models"))
    data = os.path.abspath(data) if data is not None and str(data) != "digits" else data
    grid = Grid(models, counts, _tuple(inits, "inits"), _tuple(seeds, "seeds"),
                _tuple(head_modes, "head modes") or None, joint)
    from ..strategies import check_growth, check_shrink

    for init in grid.inits:
        check_growth(init)
    check_shrink(shrink)
    training = Training(train_steps, lr, batch_size, rows, objective)
    plan = Plan(data=None if data is None else str(data), eval_fraction=eval_fraction,
                metrics=_tuple(metrics, "metrics") or None, training=training, options=dict(options or {}),
                device=device, threads=threads_per_cell or (cpus_per_cell if executor == "ray" else None),
                eval_batch_size=eval_batch_size, shrink=shrink)
    loaded = load_data(plan.data, eval_fraction=eval_fraction)
    with threads(plan.threads):
        sessions = {ref: Session(ref, plan, loaded) for ref in grid.models}
    context = json.dumps({"data": loaded.fingerprint, "eval_fraction": eval_fraction,
                          "metrics": {ref: [m.name for m in s.metrics] for ref, s in sessions.items()},
                          "options": plan.options, "shrink": shrink, "device": device}, sort_keys=True, default=str)
    for ref, session in sessions.items():
        for site in counts:
            if site not in session.counts:
                raise SweepError(f"model {ref!r} has no token site {site!r}; its sites: {', '.join(session.counts)}")
        if grid.head_modes:
            session.head_mode_value(grid.head_modes[0])  # a model without head modes is refused here
    every = grid_cells(grid, training, {ref: s.counts for ref, s in sessions.items()},
                       {ref: s.head_mode for ref, s in sessions.items()}, context)
    out = Path(out)
    store = results_io.Store(out)
    todo = [c for c in every if force or not store.finished(c)]
    bar = _progress(len(todo), progress)

    def record(result: CellResult) -> None:
        store.add(result)
        bar.update(1)
        if not result.ok:
            bar.write(f"cell {result.cell.label}={result.cell.count_text} init {result.cell.init} "
                      f"seed {result.cell.seed} failed: {result.error}")

    try:
        if executor == "local":
            run_local(todo, sessions.__getitem__, record)
        else:
            from .ray_executor import run_ray

            sessions.clear()  # the workers load their own
            run_ray(todo, plan, record, address=address, workers=workers, cpus=cpus_per_cell, gpus=gpus_per_cell)
    finally:
        bar.close()
    done = store.of(every)
    import torch

    from ..bench import report

    env = report.environment(torch.device(device), plan.threads or torch.get_num_threads(), executor=executor)
    text = _grid_text(grid, training, loaded.description, plan, executor, len(every), len(every) - len(todo))
    files = results_io.write(out, done, env, versions(executor), text)
    return SweepResult(out, every, done, files, skipped=len(every) - len(todo))


def _progress(total: int, enabled: bool):
    from ..bench.report import progress_bar  # tqdm's, or none without it (the `plot` extra)

    return progress_bar(total=total, show=enabled and total > 0, desc="sweep cells", unit="cell")


def _grid_text(grid: Grid, training: Training, data: str, plan: Plan, executor: str, total: int,
               skipped: int) -> str:
    lines = [
        f"- models: {', '.join(grid.models)}",
        f"- sites: {'; '.join(f'{s} = {list(c)}' for s, c in grid.sites.items())} "
        f"({'jointly' if grid.joint else 'one at a time'})",
        f"- init strategies: {', '.join(grid.inits)}; seeds: {', '.join(map(str, grid.seeds))}"
        + (f"; head modes: {', '.join(grid.head_modes)}" if grid.head_modes else ""),
        f"- training: {training.steps} steps, lr {training.lr}, batch {training.batch_size}, rows {training.rows}"
        + (f", objective {training.objective}" if training.objective else ""),
        f"- data: {data}; metrics: {', '.join(plan.metrics) if plan.metrics else 'all that apply'}",
        f"- executor: {executor}; {total} cells ({skipped} found finished in the resume log)",
    ]
    return "\n".join(lines)


__all__ = ["sweep", "SweepResult", "EXECUTORS"]
