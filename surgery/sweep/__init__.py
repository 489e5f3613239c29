"""Sweeps: measure what a token count does (docs/sweeps.md).

    result = surgery.sweep("vit_tiny_test", {"reg_tokens": [0, 1, 2, 4, 8]}, inits=["normal", "zeros"],
                           metrics=["drift"], out="out/sweep")
    result.rows                 # tidy rows: model, site, count, init, seed, ..., metric, value

`surgery.sweep` is both this package and the function (calling the package runs `api.sweep`), and
importing it imports no torch, so the CLI's `--help` stays instant; its modules do.
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
