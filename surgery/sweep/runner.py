"""Running cells: a `Session` holds one model and the data, loaded once, and runs cells on them;
`run_local` runs a list of cells in this process (the default executor).

Each cell applies its head mode and counts inside a journal and a `surgery.tokens(...)` block, trains,
measures, and puts everything back bit for bit (trained rows too), so cells run in any order. Every
random draw comes from the cell's seed; a cell that raises is returned with its error.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..edit import Edit
from ..errors import SweepError
from ..plugins import get_host
from . import metrics as metric_registry
from .data import SweepData, load_data
from .grid import NO_INIT, Cell, Training
from .metrics import Evaluation
from .train import train_tokens

HEAD_MODE_OPTION = "head_mode"


@dataclass(frozen=True)
class Plan:
    """What every worker needs to load the same model and data and measure the same things."""

    data: str | None = None  # None: the embedded digits
    eval_fraction: float = 0.2
    metrics: tuple[str, ...] | None = None  # None: every metric of the backbone that accepts the data
    training: Training = field(default_factory=Training)
    options: Mapping[str, Any] = field(default_factory=dict)  # metric options (tokenizer, prompt, ...)
    device: str = "cpu"
    threads: int | None = None  # torch threads per cell (None: torch's default)
    eval_batch_size: int = 64
    shrink: str = "truncate"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        return cls(**{**d, "training": Training(**d["training"]),
                      "metrics": None if d["metrics"] is None else tuple(d["metrics"])})


@dataclass
class CellResult:
    cell: Cell
    values: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    losses: list[float] = field(default_factory=list)  # the training loss per step
    artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.cell.key, "cell": self.cell.to_dict(), "values": self.values, "seconds": self.seconds,
                "error": self.error, "losses": self.losses, "artifacts": self.artifacts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CellResult":
        return cls(Cell.from_dict(d["cell"]), dict(d["values"]), d["seconds"], d["error"], list(d.get("losses") or []),
                   dict(d.get("artifacts") or {}))


def looks_like_file(ref: str) -> bool:
    return os.path.isfile(ref) or os.sep in ref or "/" in ref or os.path.splitext(ref)[1] in (
        ".safetensors", ".pth", ".pt", ".bin")


BUILD_SEED = 0  # a registered model's random weights: the same in every worker and every run


def load_model(ref: str, device: str) -> tuple[nn.Module, str]:
    """A registered model name (random weights, drawn from BUILD_SEED) or a checkpoint file (its
    metadata names the model)."""
    import surgery
    from ..cli import open_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        if looks_like_file(ref):
            model, _, name, _ = open_checkpoint(ref, None)  # refuses a missing or unsafe file
        else:
            model, name = surgery.build(ref), ref
    return model.to(device).eval(), name


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """torch's thread count fixed while the block runs (the same count gives the same numbers)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Session:
    """One model and the data, loaded once, and the cells run on them."""

    def __init__(self, model_ref: str, plan: Plan, data: SweepData | None = None) -> None:
        import surgery
        from ..options import model_options

        self.ref, self.plan = model_ref, plan
        self.device = torch.device(plan.device)
        self.model, self.name = load_model(model_ref, plan.device)
        self.spec = get_host().models.get(self.name)
        self.backbone = surgery.backbone_of(self.model)
        self.data = data if data is not None else load_data(plan.data, eval_fraction=plan.eval_fraction)
        self.metrics = metric_registry.choose(plan.metrics, self.backbone, self.data, self.model)
        self.objective = metric_registry.objective(plan.training.objective, self.metrics)
        if plan.training.steps and self.objective is None:
            raise SweepError(f"--train-steps needs a metric with a training loss among the chosen ones "
                             f"({', '.join(m.name for m in self.metrics)}); add one with --metrics")
        self.counts = surgery.counts(self.model)
        self.options = model_options(self.model)
        self.cache: dict = {}
        with threads(plan.threads):
            needs_baseline = any(m is metric_registry.DRIFT for m in self.metrics)
            self.baseline = metric_registry.probe(self.model, self.spec) if needs_baseline else None

    @property
    def head_mode(self) -> str | None:
        """The model's own head mode (one mode for all heads), None when it has none or they differ."""
        value = self.options.get(HEAD_MODE_OPTION)
        if isinstance(value, dict):
            modes = set(value.values())
            return modes.pop() if len(modes) == 1 else None
        return value

    def head_mode_value(self, mode: str) -> Any:
        if HEAD_MODE_OPTION not in self.options:
            raise SweepError(f"model {self.ref!r} has no head mode to sweep (its options: "
                             f"{', '.join(self.options) or 'none'})")
        current = self.options[HEAD_MODE_OPTION]
        return {k: mode for k in current} if isinstance(current, dict) else mode

    def evaluation(self) -> Evaluation:
        return Evaluation(self.model, self.backbone, self.data, self.device, self.plan.eval_batch_size,
                          self.plan.options, self.spec, self.baseline, self.cache)

    @contextlib.contextmanager
    def _cell_state(self, cell: Cell) -> Iterator[None]:
        """The cell's head mode and counts, put back on the way out (trained rows too)."""
        import surgery
        from ..options import apply_options
        from .train import chosen_rows

        first, later = Edit(), Edit()
        requested = {HEAD_MODE_OPTION: self.head_mode_value(cell.head_mode)} if cell.head_mode else {}
        try:
            # a mode valid only at the new counts (ImageBind's `all` needs a CLS token) is set after them
            left = apply_options(self.model, requested, first, only_valid=True) if requested else {}
            init = "restore" if cell.init == NO_INIT else cell.init
            with surgery.tokens(self.model, init=init, shrink=self.plan.shrink, seed=cell.seed, **cell.counts):
                try:
                    if left:
                        apply_options(self.model, left, later)
                    trained = (chosen_rows(self.model, list(cell.counts), cell.training.rows)
                               if cell.training.steps else [])
                    saved = [(e.param, e.param.detach().clone()) for e in trained]
                    try:
                        yield
                    finally:
                        with torch.no_grad():
                            for param, value in saved:
                                param.copy_(value)
                finally:
                    later.rollback()
        finally:
            first.rollback()

    def run(self, cell: Cell) -> CellResult:
        """Run one cell; its error, if any, is in the result (the model is put back either way)."""
        start = time.perf_counter()
        evaluation = self.evaluation()
        result = CellResult(cell)
        try:
            # the cell's own random stream, the caller's left as it was
            with threads(self.plan.threads), torch.random.fork_rng(devices=[]), self._cell_state(cell):
                torch.manual_seed(cell.seed)
                if cell.training.steps:
                    result.losses = train_tokens(evaluation, self.objective, list(cell.counts), cell.training,
                                                 cell.seed)
                result.values = metric_registry.measure(self.metrics, evaluation)
                result.artifacts = evaluation.artifacts
        except Exception as exc:  # noqa: BLE001 - recorded with the cell; the other cells go on
            result.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        result.seconds = time.perf_counter() - start
        return result


def run_local(cells: Iterable[Cell], sessions: Callable[[str], Session],
              record: Callable[[CellResult], None]) -> None:
    """Run the cells one after the other in this process, each on its model's session."""
    for cell in cells:
        record(sessions(cell.model).run(cell))


__all__ = ["Plan", "Session", "CellResult", "load_model", "run_local", "threads", "HEAD_MODE_OPTION"]
