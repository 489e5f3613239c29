"""Sweeps: measure what a token count does.

    import surgery
    result = surgery.sweep("vit_tiny_test", {"reg_tokens": [0, 1, 2, 4, 8]}, inits=["normal", "zeros"],
                           metrics=["drift"], out="out/sweep")
    result.rows                 # tidy rows: model, site, count, init, seed, ..., metric, value
    surgery sweep --quick       # the same from the command line, on an embedded default

A grid of model x site counts x init strategies x seeds (x head mode), each cell applied to the
same loaded model, its new tokens optionally trained, its metrics measured, on this machine or
on a Ray cluster; results as CSV/JSON, plots and a Markdown summary, resumable. One concept per
module:

    grid.py          the cells of a grid, their keys (what decides a cell's numbers)
    data.py          the user's data (image folders, JSONL/CSV manifests) and the embedded digits
    metrics.py       the metric registry (core + plugins' `surgery_register_metrics`), drift
    train.py         training a cell's new tokens (inside `surgery.trainable`)
    runner.py        a worker's session (model and data loaded once) and the local executor
    ray_executor.py  the cells as Ray tasks (`--executor ray`)
    results.py       the resume log, tidy tables, plots, summary
    api.py           `surgery.sweep(...)`: plan, run, write
    quick.py         `surgery sweep --quick`: a tiny ViT trained on digits, then its registers swept
    cli.py           the `surgery sweep` command

`surgery.sweep` is both this package and the function: calling the package runs `api.sweep`.
Importing it imports no torch (the CLI's `--help` stays instant); the modules above do.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def sweep(*args: Any, **kwargs: Any) -> Any:
    """Run a sweep: see `surgery.sweep.api.sweep`."""
    from .api import sweep as run

    return run(*args, **kwargs)


class _CallableModule(types.ModuleType):
    """`surgery.sweep(...)` calls the function although `surgery.sweep` is this package (the
    import system sets the package as the attribute of `surgery` once any submodule is imported)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["sweep"]
