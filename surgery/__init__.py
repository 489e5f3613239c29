"""token-surgery: change how many learned tokens a built model uses, and see what it does.

    import surgery
    surgery.sites(model)                         # the model's token sites and their counts
    surgery.resize(model, reg_tokens=4)          # atomic; init/shrink strategies; optimizer= follows
    with surgery.tokens(model, reg_tokens=0):    # temporary, bit-exact restore
        ...
    surgery.save(model, "edited.safetensors")    # weights + counts + options + recipe; surgery.load replays

Backbones come from plugins (`surgery plugins` lists them). Names are imported lazily, so
`import surgery` stays cheap for the CLI and the pytest plugin.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "sites": "engine", "counts": "engine", "resize": "engine", "tokens": "engine", "recipe": "engine",
    "Recipe": "engine", "build": "engine", "backbone_of": "engine", "set_options": "engine",
    "save": "checkpoint", "load": "checkpoint", "load_state_dict": "checkpoint", "read_checkpoint": "checkpoint_io",
    "TokenSite": "site", "TokenTensor": "site", "Counter": "site",
    "hookimpl": "hookspecs",
    "get_host": "plugins",
    "trainable": "sweep.train",
}
_MODULES = ("errors", "engine", "checkpoint", "checkpoint_io", "site", "strategies", "hookspecs", "plugins", "edit",
            "optim", "rows", "options", "recipes", "transaction", "sweep")

__all__ = sorted([*_EXPORTS, *_MODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
