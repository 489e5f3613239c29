"""Point-cloud preprocessing of the point modality: farthest-point sampling and kNN grouping, ours
against upstream's code path (Point-BERT's `misc.fps` loop and `dvae.Group`, written out below).

    python benchmarks/point_preprocessing.py [--quick] [--points 8192] [--groups 512] [--group-size 32]
        [--batches 1,4] [--threads N] [--device cpu|cuda] [--rounds 3] [--out DIR]

Per stage (`fps`: the centres; `fps+group`: the whole preprocessing, the centres, then each
one's kNN gathered and centred) and batch: the median of `--rounds` `torch.utils.benchmark.Timer` measurements, ours and
upstream's interleaved (who goes first alternates), and ours / upstream as a speed-up. Before
anything is timed the two are compared: the same centres from the same first point, and the same
groups as sets of points (neighbours at equal distance may be taken in another order or, at the
k-th place, another of the tied points: upstream computes |a|^2 - 2ab + |b|^2 through a matmul,
ours the differences; the count of such groups is printed). Random clouds (seeded), float32.
`--quick`: 2048 points, 128 groups, batch 1 (a few seconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

from surgery_plugins.imagebind.points import farthest_point_sample, group_points


# -- upstream's path, as Point-BERT's misc.py / dvae.py run it (the first centre given, not drawn) --


def upstream_fps(xyz: torch.Tensor, npoint: int, start: torch.Tensor) -> torch.Tensor:
    B, N, _ = xyz.shape
    centroids = torch.zeros(B, npoint, dtype=torch.long, device=xyz.device)
    distance = torch.ones(B, N, device=xyz.device) * 1e10
    farthest = start
    batch_indices = torch.arange(B, dtype=torch.long, device=xyz.device)
    for i in range(npoint):
        centroids[:, i] = farthest
        centroid = xyz[batch_indices, farthest, :].view(B, 1, 3)
        dist = torch.sum((xyz - centroid) ** 2, -1)
        distance = torch.min(distance, dist)
        farthest = torch.max(distance, -1)[1]
    return xyz[batch_indices[:, None], centroids]  # index_points


def upstream_group(xyz: torch.Tensor, num_group: int, group_size: int, start: torch.Tensor):
    B, N, _ = xyz.shape
    center = upstream_fps(xyz, num_group, start)
    sqrdists = -2 * torch.matmul(center, xyz.permute(0, 2, 1))  # square_distance
    sqrdists += torch.sum(center ** 2, -1).view(B, num_group, 1)
    sqrdists += torch.sum(xyz ** 2, -1).view(B, 1, N)
    idx = torch.topk(sqrdists, group_size, dim=-1, largest=False, sorted=False)[1]
    idx = (idx + torch.arange(B, device=xyz.device).view(-1, 1, 1) * N).view(-1)
    neighborhood = xyz.view(B * N, -1)[idx, :].view(B, num_group, group_size, 3)
    return neighborhood - center.unsqueeze(2), center


# -- checks and timing ----------------------------------------------------------------------------------


def check(xyz: torch.Tensor, groups: int, size: int) -> int:
    """Raises if the centres differ; returns how many groups hold other points (ties, see the doc)."""
    start = torch.zeros(xyz.shape[0], dtype=torch.long, device=xyz.device)
    ours, centres = group_points(xyz, groups, size)
    theirs, their_centres = upstream_group(xyz, groups, size, start)
    if not torch.equal(centres, their_centres):
        raise SystemExit("the centres differ from upstream's: nothing is timed")
    as_set = lambda g: g.sort(dim=2).values  # noqa: E731  (sorted per coordinate: order-free)
    return int((as_set(ours) != as_set(theirs)).any(-1).any(-1).sum())


def timed(stmt: str, env: dict, threads: int) -> float:
    return benchmark.Timer(stmt, globals=env, num_threads=threads).blocked_autorange(min_run_time=0.5).median


STAGES = {
    "fps": ("farthest_point_sample(x, G)", "upstream_fps(x, G, s)"),
    "fps+group": ("group_points(x, G, M, s)", "upstream_group(x, G, M, s)"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--points", type=int, default=8192)
    p.add_argument("--groups", type=int, default=512)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.points, args.groups, args.batches, args.rounds = 2048, 128, "1", 2
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    torch.set_num_threads(args.threads)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "device": args.device,
               "torch": torch.__version__, "python": platform.python_version(),
               "date": datetime.date.today().isoformat(), "points": args.points, "groups": args.groups,
               "group_size": args.group_size}
    print(json.dumps(machine))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, args.points, 3, generator=torch.Generator().manual_seed(0)).to(args.device)
        ties = check(x, args.groups, args.group_size)
        env = {"x": x, "G": args.groups, "M": args.group_size, "s": torch.zeros(batch, dtype=torch.long,
               device=args.device), "farthest_point_sample": farthest_point_sample, "group_points": group_points,
               "upstream_fps": upstream_fps, "upstream_group": upstream_group}
        for stage, (ours_stmt, theirs_stmt) in STAGES.items():
            ours, theirs = [], []
            for r in range(args.rounds):  # interleaved, who goes first alternates
                pair = [(ours, ours_stmt), (theirs, theirs_stmt)]
                for times, stmt in (pair if r % 2 == 0 else pair[::-1]):
                    times.append(timed(stmt, env, args.threads))
            row = {"stage": stage, "batch": batch, "ours_ms": 1e3 * statistics.median(ours),
                   "upstream_ms": 1e3 * statistics.median(theirs), "groups_differing_by_ties": ties}
            row["speedup"] = row["upstream_ms"] / row["ours_ms"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print("\n| stage | batch | ours ms | upstream ms | speed-up | groups differing (ties) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['batch']} | {r['ours_ms']:.2f} | {r['upstream_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['groups_differing_by_ties']} of {r['batch'] * args.groups} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "point_preprocessing.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
