"""Point-cloud geometry of the Point-BERT encoder: farthest-point centres and their kNN groups.

    groups, centres = group_points(points, 512, 32)              # [B, 512, 32, 3] around [B, 512, 3]
    groups, centres = group_points(points, 512, 32, start=first_centres(points, seed=7))  # upstream's random start

Upstream's centres exactly (Point-BERT's `misc.fps` and `dvae.Group`), but upstream draws the first
centre at random on every call, so one cloud gives another embedding each time: here it is point 0
unless a start is given. Geometry runs in float32 whatever the model's dtype, so half-precision
distances cannot reorder neighbours.
"""

from __future__ import annotations

import torch


def first_centres(points: torch.Tensor, seed: int | None = None) -> torch.Tensor | None:
    """The first centre of each cloud: None (point 0, deterministic) without a seed; with one, a
    uniformly random point per cloud, as upstream draws it, from a generator seeded with `seed`."""
    if seed is None:
        return None
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same starts on every device
    return torch.randint(0, points.shape[1], (points.shape[0],), generator=gen).to(points.device)


def farthest_point_sample(points: torch.Tensor, num_samples: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N, 3] -> [B, num_samples] indices of farthest-point-sampled centres, `start` [B] first
    (default: point 0). Distances are float32 squared differences summed (x + y) + z, as upstream's
    `sum(-1)` adds them, so the same centres are chosen."""
    B, N, _ = points.shape
    flat = points.float().reshape(B * N, 3)
    # [B, 3, N], each coordinate one contiguous row: a broadcast over an innermost axis of 3 is several times slower
    planes = flat.view(B, N, 3).transpose(1, 2).contiguous()
    offsets = torch.arange(B, device=points.device) * N          # where each cloud starts in `flat`
    chosen = torch.empty(num_samples, B, dtype=torch.long, device=points.device)  # row i: the i-th centres
    if start is None:
        chosen[0].zero_()
    else:
        chosen[0].copy_(start)
    nearest = torch.full((B, N), float("inf"), device=points.device)  # squared distance to the closest centre
    diff = torch.empty_like(planes)                                   # [B, 3, N]
    dist = torch.empty(B, N, device=points.device)
    for i in range(num_samples - 1):
        centre = flat.index_select(0, chosen[i] + offsets)            # [B, 3]
        torch.sub(planes, centre.unsqueeze(2), out=diff).square_()
        torch.add(diff[:, 0], diff[:, 1], out=dist).add_(diff[:, 2])  # [B, N]
        torch.minimum(nearest, dist, out=nearest)
        torch.argmax(nearest, dim=1, out=chosen[i + 1])               # the first of equal maxima
    return chosen.t()                                                 # [B, num_samples]


def gather_points(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """points [B, N, C], index [B, ...] into N -> [B, ..., C]."""
    B, N, C = points.shape
    offsets = (torch.arange(B, device=points.device) * N).view(B, *([1] * (index.dim() - 1)))
    rows = points.reshape(B * N, C).index_select(0, (index + offsets).reshape(-1))
    return rows.view(*index.shape, C)


def knn_indices(points: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N, 3] points, [B, G, 3] centres -> [B, G, k] indices of each centre's k nearest points,
    nearest first. Distances are computed directly (not through |a|^2 - 2ab + |b|^2), so the
    same neighbours are found on every device."""
    dist = torch.cdist(centres.float(), points.float(), compute_mode="donot_use_mm_for_euclid_dist")  # [B, G, N]
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(points: torch.Tensor, num_groups: int, group_size: int,
                 start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, 3] -> (neighbourhoods [B, G, M, 3] relative to their centres, centres [B, G, 3]),
    float32. `start`: see `farthest_point_sample`."""
    xyz = points.float()
    centres = gather_points(xyz, farthest_point_sample(xyz, num_groups, start))  # [B, G, 3]
    neighbours = gather_points(xyz, knn_indices(xyz, centres, group_size))       # [B, G, M, 3]
    return neighbours - centres.unsqueeze(2), centres


__all__ = ["first_centres", "farthest_point_sample", "gather_points", "knn_indices", "group_points"]
