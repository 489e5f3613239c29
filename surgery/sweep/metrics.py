"""Metrics: what a sweep measures in every cell. One registry: the core's `drift` (how far the outputs
moved from the baseline on the model's registered example inputs), plus those plugins register for
their backbones (`surgery_register_metrics`).

Each metric states the data it needs and refuses data it cannot use before any cell runs, with a
`MetricDataError` naming what is missing. The metrics and their values: docs/sweeps.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MetricDataError, SweepError
from ..plugins import MetricSpec, ModelSpec, get_host
from .data import SweepData


@dataclass
class Evaluation:
    """What a metric sees in one cell: the cell's model, the data, and the worker's caches.

    `records` are the eval records; `cached(key, make)` keeps what is costly to rebuild for every
    cell (decoded images, tokenized class prompts) for the worker's lifetime; `artifacts` collects
    what a metric saves for the cell besides numbers (a few generations), written next to the results.
    """

    model: nn.Module
    backbone: str
    data: SweepData
    device: torch.device
    batch_size: int = 64
    options: Mapping[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None
    baseline: Any = None  # the baseline model's probe outputs (drift)
    cache: dict = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.cached(("records", "eval"), lambda: self.data.part("eval"))

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def batches(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        for i in range(0, len(items), self.batch_size):
            yield items[i:i + self.batch_size]

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


# -- drift: the core's metric, for any model -------------------------------------------------------


def probe(model: nn.Module, spec: ModelSpec | None) -> list[torch.Tensor]:
    """The model's outputs on its registered example inputs, as a list of float tensors (a dict's
    values in key order). Deterministic: the plugins seed their example inputs."""
    if spec is None or spec.example_inputs is None:
        raise SweepError("drift needs the model's registered example inputs; build the model by name "
                         "(surgery models) or from a checkpoint that names one")
    with torch.no_grad():
        inputs = spec.example_inputs(model)
        out = spec.forward(model, *inputs) if spec.forward is not None else model(*inputs)
    return [t.detach().float() for t in _tensors(out)]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    raise SweepError(f"the model's forward returned a {type(out).__name__}; drift compares tensors")


def _has_logits(model: nn.Module, outputs: Sequence[torch.Tensor]) -> bool:
    return len(outputs) == 1 and outputs[0].dim() >= 2 and getattr(model, "num_classes", 1) != 0


def drift(evaluation: Evaluation) -> dict[str, float]:
    base = evaluation.baseline
    if base is None:
        raise SweepError("drift needs the baseline outputs; the runner computes them before any cell")
    now = probe(evaluation.model, evaluation.spec)
    if [tuple(t.shape) for t in now] != [tuple(t.shape) for t in base]:
        raise SweepError(f"the outputs changed shape ({[list(t.shape) for t in base]} -> "
                         f"{[list(t.shape) for t in now]}); drift compares outputs of the same shape")
    flat_now = torch.cat([t.reshape(t.shape[0], -1) for t in now], dim=1)
    flat_base = torch.cat([t.reshape(t.shape[0], -1) for t in base], dim=1)
    values = {
        "drift_cosine": float(1 - F.cosine_similarity(flat_now, flat_base, dim=1).mean()),
        "drift_maxdiff": float((flat_now - flat_base).abs().max()),
    }
    if _has_logits(evaluation.model, now):
        logp_base = F.log_softmax(base[0].double(), dim=-1)  # double: a small KL is a difference of close terms
        logp_now = F.log_softmax(now[0].double(), dim=-1)
        kl = (logp_base.exp() * (logp_base - logp_now)).sum(-1)
        values["drift_kl"] = float(kl.mean())
    return values


DRIFT = MetricSpec(
    name="drift", compute=drift, plugin="surgery", values=("drift_cosine", "drift_maxdiff", "drift_kl"),
    needs="no data: the model's registered example inputs", higher_is_better=False,
    description="how far the outputs moved from the baseline's on the same inputs (cosine, max |diff|, KL of logits)")
CORE_METRICS: dict[str, MetricSpec] = {DRIFT.name: DRIFT}


# -- the registry ----------------------------------------------------------------------------------


def registry() -> dict[str, MetricSpec]:
    """Every metric: the core's, then the plugins' (`surgery plugins` shows who registered which)."""
    return {**CORE_METRICS, **get_host().metrics}


def available(backbone: str) -> dict[str, MetricSpec]:
    return {n: m for n, m in registry().items() if m.backbones is None or backbone in m.backbones}


def refusal(spec: MetricSpec, data: SweepData, model: nn.Module) -> str | None:
    """Why `spec` cannot use `data` on `model` (None when it can)."""
    if spec.accepts is None:
        return None
    return spec.accepts(data, model)


def choose(names: Sequence[str] | None, backbone: str, data: SweepData, model: nn.Module) -> list[MetricSpec]:
    """The metrics to measure: those named (each must apply to the backbone and accept the data), or
    by default every metric of the backbone that accepts the data (drift always)."""
    everything = registry()
    mine = available(backbone)
    if names is None:
        return [m for m in mine.values() if refusal(m, data, model) is None]
    chosen = []
    for name in dict.fromkeys(names):
        if name not in everything:
            raise SweepError(f"unknown metric {name!r}; metrics for a {backbone!r} model: {', '.join(mine)}")
        if name not in mine:
            raise SweepError(f"metric {name!r} (plugin {everything[name].plugin!r}) is for "
                             f"{', '.join(everything[name].backbones or ())} models, not {backbone!r}; "
                             f"metrics for this model: {', '.join(mine)}")
        problem = refusal(mine[name], data, model)
        if problem:
            raise MetricDataError(f"metric {name!r} cannot use data {data.name!r}: {problem}; it needs "
                                  f"{mine[name].needs} (the data has fields: {data.describe_fields()})")
        chosen.append(mine[name])
    return chosen


def objective(name: str | None, metrics: Sequence[MetricSpec]) -> MetricSpec | None:
    """The metric whose loss trains the new tokens: the one named, else the first chosen with a loss."""
    if name is None:
        return next((m for m in metrics if m.loss is not None), None)
    found = next((m for m in metrics if m.name == name), None)
    if found is None or found.loss is None:
        trainers = [m.name for m in metrics if m.loss is not None]
        raise SweepError(f"objective {name!r} is not one of the chosen metrics with a training loss; "
                         f"those are: {', '.join(trainers) or 'none'}")
    return found


def measure(metrics: Sequence[MetricSpec], evaluation: Evaluation) -> dict[str, float]:
    """Every metric's values, checked: numbers, and only the names the metric declared."""
    values: dict[str, float] = {}
    for spec in metrics:
        with torch.no_grad():
            got = spec.compute(evaluation)
        extra = sorted(set(got) - set(spec.values))
        if extra:
            raise SweepError(f"metric {spec.name!r} (plugin {spec.plugin!r}) returned {extra}, which it did not "
                             f"declare; declared: {', '.join(spec.values)}")
        values.update({k: float(v) for k, v in got.items()})
    return values


__all__ = ["Evaluation", "CORE_METRICS", "DRIFT", "registry", "available", "choose", "objective", "measure",
           "probe", "refusal"]
