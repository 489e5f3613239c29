"""Sweep throughput and overhead on the quick grid (docs/performance.md, "Sweeps").

    python benchmarks/sweep_overhead.py                      # the quick grid, 100 training steps per cell
    python benchmarks/sweep_overhead.py --counts 0,2,8 --inits copy,normal --no-ray

1. Cells per minute of the quick grid (its base model trained once beforehand), local executor
   against Ray (two workers of one CPU, a local Ray started and stopped by the sweep; its start-up
   is part of the Ray time, and shown on its own too).
2. The sweep machinery's overhead per cell against a hand-written loop doing the same work: the
   same model loaded once, the same images decoded once, and per cell `surgery.tokens(...)`,
   `surgery.trainable(...)`, an AdamW loop over the same batches, top-1 and the drift's forward.
   Per cell: `Session.run` (what a sweep adds around the work: seeds, journals, the snapshot of the
   trained rows, the metric registry) against the hand loop's cell; end to end: the whole
   `surgery.sweep` call (planning, the resume log, tables, plots, summary) against the hand loop
   including its own setup. Target: at most 10% per cell on cells of a second or more.

Both at one torch thread, so the numbers are the same work. Prints a Markdown table and writes
results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import surgery
from surgery.sweep import quick
from surgery.sweep.data import digits
from surgery.sweep.grid import Grid, Training, cells
from surgery.sweep.runner import Plan, Session, load_model
from surgery.sweep.train import batches
from surgery_plugins import timm_metrics


class HandLoop:
    """The same work written by hand: the model and the images loaded once (`setup` seconds), then
    `cell(cell)` runs one cell; evaluation in batches of 64, as the metric's."""

    def __init__(self, checkpoint: str, training: Training) -> None:
        start = time.perf_counter()
        self.model, _ = load_model(checkpoint, "cpu")
        self.training = training
        data = digits()
        self.train, evaluation = data.part("train"), data.part("eval")
        self.x_train = timm_metrics.images(self.model, self.train)
        self.x_eval = timm_metrics.images(self.model, evaluation)
        self.y_train = torch.tensor([int(r["label"]) for r in self.train])
        self.y_eval = torch.tensor([int(r["label"]) for r in evaluation])
        self.row = {id(r): i for i, r in enumerate(self.train)}
        self.probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.baseline = self.model(self.probe)
        self.setup = time.perf_counter() - start

    def cell(self, cell) -> float:
        start = time.perf_counter()
        model, training = self.model, self.training
        torch.manual_seed(cell.seed)
        init = "restore" if cell.init == "none" else cell.init
        with surgery.tokens(model, init=init, seed=cell.seed, **cell.counts):
            with surgery.trainable(model, sites=list(cell.counts)) as params:
                if params and cell.training.steps:
                    opt = torch.optim.AdamW(params, lr=training.lr, weight_decay=0.0)
                    model.train()
                    for batch in batches(self.train, training.batch_size, training.steps, cell.seed):
                        index = torch.tensor([self.row[id(r)] for r in batch])
                        opt.zero_grad()
                        torch.nn.functional.cross_entropy(model(self.x_train[index]), self.y_train[index]).backward()
                        opt.step()
                    model.eval()
            with torch.no_grad():
                hits = sum(int((model(self.x_eval[i:i + 64]).argmax(-1) == self.y_eval[i:i + 64]).sum())
                           for i in range(0, len(self.y_eval), 64))
                drift = float((model(self.probe) - self.baseline).abs().max())
        assert 0 <= hits <= len(self.y_eval) and drift >= 0
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="0,1,2,4,8", help="register counts (default: the quick grid's)")
    parser.add_argument("--inits", default="copy,normal,zeros", help="init strategies (default: the quick grid's)")
    parser.add_argument("--train-steps", type=int, default=100, help="training steps per cell (default 100)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    parser.add_argument("--out", default="out/bench/sweep", help="results folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    counts = tuple(int(c) for c in args.counts.split(","))
    inits = tuple(args.inits.split(","))
    checkpoint = str(quick.base_checkpoint(out).resolve())  # trained once, not timed
    grid = dict(sites={"reg_tokens": counts}, inits=inits, seeds=(0,), metrics=("classify", "drift"),
                train_steps=args.train_steps, lr=1e-3, batch_size=64, threads_per_cell=1, progress=False, force=True)

    timings = {}
    start = time.perf_counter()
    local = surgery.sweep(checkpoint, out=out / "local", **grid)
    timings["local"] = time.perf_counter() - start
    n = len(local.cells)
    if not args.no_ray:
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        timings["ray_start"] = time.perf_counter() - start
        on_ray = surgery.sweep(checkpoint, executor="ray", workers=2, out=out / "ray", **grid)
        ray.shutdown()
        timings["ray"] = time.perf_counter() - start
        assert {r.cell.key: r.values for r in on_ray.results} == {r.cell.key: r.values for r in local.results}

    training = Training(args.train_steps, 1e-3, 64)
    plan = Plan(metrics=("classify", "drift"), training=training, threads=1)
    session = Session(checkpoint, plan)
    grid_cells = cells(Grid((checkpoint,), {"reg_tokens": counts}, inits), training,
                       {checkpoint: session.counts}, context="bench")
    by_hand = HandLoop(checkpoint, training)
    machinery, hand = [], []
    for cell in grid_cells:  # interleaved, the best of 3 each: the machine's drift hits both alike
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            assert session.run(cell).ok
            runs.append(time.perf_counter() - start)
        machinery.append(min(runs))
        hand.append(min(by_hand.cell(cell) for _ in range(3)))
    setup = by_hand.setup

    long = [i for i, t in enumerate(hand) if t >= 1.0]
    overhead_long = (sum(machinery[i] for i in long) / sum(hand[i] for i in long) - 1) if long else None
    results = {
        "cells": n, "train_steps": args.train_steps, "counts": counts, "inits": inits,
        "local_s": timings["local"], "local_cells_per_min": 60 * n / timings["local"],
        "ray_s": timings.get("ray"), "ray_start_s": timings.get("ray_start"),
        "ray_cells_per_min": 60 * n / timings["ray"] if "ray" in timings else None,
        "session_cell_s": sum(machinery) / len(machinery), "hand_cell_s": sum(hand) / len(hand),
        "overhead_per_cell": sum(machinery) / sum(hand) - 1, "overhead_cells_over_1s": overhead_long,
        "cells_over_1s": len(long), "hand_total_s": setup + sum(hand),
        "end_to_end_overhead": timings["local"] / (setup + sum(hand)) - 1,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    print("| measure | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {fmt(value) if isinstance(value, float) else value} |")


if __name__ == "__main__":
    main()
