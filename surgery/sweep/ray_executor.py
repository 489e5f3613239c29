"""`--executor ray`: the cells of a sweep as Ray tasks, on this machine or on a cluster.

Workers are Ray actors that load the models and the data once, then take cells as they come free
(`ray.util.ActorPool`); results return to this process, which writes the same files as the local
executor. Without `address` a local Ray is started and shut down; with one the sweep joins that
cluster and leaves it running. Ray is an optional extra (cluster setup: docs/sweeps.md).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ..errors import SweepError
from .grid import Cell
from .runner import CellResult, Plan, Session


class SweepWorker:
    """One Ray actor: the sessions (model + data) it has loaded, and the cells it runs on them."""

    def __init__(self, plan: dict[str, Any]) -> None:
        import torch

        self.plan = Plan.from_dict(plan)
        if self.plan.threads:
            torch.set_num_threads(self.plan.threads)
        self.sessions: dict[str, Session] = {}
        self.data = None

    def run(self, cell: dict[str, Any]) -> dict[str, Any]:
        cell_ = Cell.from_dict(cell)
        try:
            session = self.sessions.get(cell_.model)
            if session is None:
                session = self.sessions[cell_.model] = Session(cell_.model, self.plan, self.data)
                self.data = session.data  # the data, loaded once, serves every model
        except Exception as exc:  # noqa: BLE001 - a model that does not load fails its cells, not the worker
            return CellResult(cell_, error=f"{type(exc).__name__}: {' '.join(str(exc).split())}").to_dict()
        return session.run(cell_).to_dict()

    def ready(self) -> bool:
        return True


def _ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise SweepError('--executor ray needs Ray: pip install "token-surgery[ray]" (or pip install "ray[default]")') \
            from None
    return ray


def run_ray(cells: Iterable[Cell], plan: Plan, record: Callable[[CellResult], None], *, address: str | None = None,
            workers: int = 2, cpus: int = 1, gpus: float = 0) -> None:
    """Run the cells on Ray actors (see the module doc); `record` gets each result as it arrives."""
    ray = _ray()
    from ray.util import ActorPool

    cells = list(cells)
    if not cells:
        return
    if workers < 1 or cpus < 1 or gpus < 0:
        raise SweepError(f"--workers and --cpus-per-cell must be >= 1 and --gpus-per-cell >= 0, "
                         f"got {workers}, {cpus}, {gpus}")
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(num_cpus=workers * cpus, num_gpus=None if gpus else 0, include_dashboard=False,
                         logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray"
            raise SweepError(f"cannot start or join {where}: {' '.join(str(exc).split())}") from None
        started = True
    actor = ray.remote(num_cpus=cpus, num_gpus=gpus)(SweepWorker)
    actors = [actor.remote(plan.to_dict()) for _ in range(min(workers, len(cells)))]
    try:
        pool = ActorPool(actors)
        try:
            for result in pool.map_unordered(lambda a, cell: a.run.remote(cell.to_dict()), cells):
                record(CellResult.from_dict(result))
        except ray.exceptions.RayError as exc:  # a worker process died (out of memory, killed, a node lost)
            raise SweepError(f"a Ray worker failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}; "
                             f"the cells finished so far are in the results folder, and a rerun resumes") from None
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


__all__ = ["run_ray", "SweepWorker"]
