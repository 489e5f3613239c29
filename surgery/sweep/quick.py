"""`surgery sweep --quick`: the whole loop on an embedded default, in well under two minutes on a CPU.

A tiny timm ViT with one register token is trained on scikit-learn's digits (saved, and reused by
a rerun with the same recipe), then its registers are swept (0, 1, 2, 4, 8; `copy`, `normal`,
`zeros`; new tokens trained 50 steps) for top-1/top-5 and drift: dropping the trained register
costs accuracy, and trained new registers win it back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import SweepError

BASE_MODEL = "vit_tiny_test"
BASE_COUNTS = dict(reg_tokens=1)  # grown on the registered model (its checkpoint needs no build arguments)
BASE_TRAINING = dict(steps=500, lr=3e-3, weight_decay=0.05, batch_size=64, seed=0)

GRID = dict(sites={"reg_tokens": (0, 1, 2, 4, 8)}, inits=("copy", "normal", "zeros"), seeds=(0,),
            metrics=("classify", "drift"), train_steps=50, lr=1e-3, batch_size=64)


def base_checkpoint(out: Path) -> Path:
    """The quick sweep's base model: trained on the digits' train split, saved under `out` (reused
    when a file of the same recipe is there)."""
    import torch

    import surgery
    from ..plugins import get_host
    from .data import digits
    from .metrics import Evaluation
    from .train import fit

    recipe = json.dumps({"model": BASE_MODEL, "counts": BASE_COUNTS, "training": BASE_TRAINING}, sort_keys=True)
    path = Path(out) / f"base_{hashlib.sha256(recipe.encode()).hexdigest()[:10]}.safetensors"
    if path.exists():
        return path
    classify = get_host().metrics.get("classify")
    if classify is None:
        raise SweepError("the quick sweep trains with the timm_vit plugin's 'classify' metric, which is not "
                         "loaded (see `surgery plugins`)")
    from .runner import threads

    data = digits()
    with threads(1), torch.random.fork_rng(devices=[]):  # one thread: the same weights on every machine
        torch.manual_seed(BASE_TRAINING["seed"])
        model = surgery.build(BASE_MODEL)
        surgery.resize(model, init="normal", seed=BASE_TRAINING["seed"], **BASE_COUNTS)
        evaluation = Evaluation(model, "timm_vit", data, torch.device("cpu"))
        fit(model, list(model.parameters()), lambda batch: classify.loss(evaluation, batch), data.part("train"),
            steps=BASE_TRAINING["steps"], lr=BASE_TRAINING["lr"], batch_size=BASE_TRAINING["batch_size"],
            seed=BASE_TRAINING["seed"], weight_decay=BASE_TRAINING["weight_decay"])
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    surgery.save(model, path, metadata={"trained_on": data.description})
    return path


def quick_sweep(out: str | Path = "out/sweep/quick", **overrides: Any):
    """Train (or reuse) the base model, then sweep its registers (`GRID`, with `overrides`)."""
    from .api import sweep

    out = Path(out)
    return sweep(str(base_checkpoint(out)), **{**GRID, **overrides, "out": out})


__all__ = ["quick_sweep", "base_checkpoint", "GRID", "BASE_MODEL", "BASE_COUNTS"]
