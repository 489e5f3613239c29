"""Point clouds from files, for the point modality (ImageBind-LLM's `load_and_transform_point_cloud_data`).

    clouds = load_and_transform_point_cloud_data(["chair.ply", "car.npy"])   # (B, 8192, 3)

`.npy`, `.pt` (weights-only), `.ply`, `.xyz`, `.obj`. The encoder was trained on 8192 points centred
inside the unit sphere, while upstream's loader stacks points as they are, so every cloud is
resampled (seeded: a file always gives the same cloud) and normalised unless told not to. Anything
unreadable, misshapen, non-finite or too small is an `InputError` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .config import InputError

NUM_POINTS = 8192  # upstream's clouds (PointTransformer_8192point.yaml `npoints`, the released examples)
MIN_POINTS = 512   # the released encoder's number of groups: fewer points cannot be grouped


# -- one file ------------------------------------------------------------------------------------


def _read_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _read_pt(path: Path) -> np.ndarray:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"point cloud {path}: not a plain tensor file; loading it with weights_only=True was "
                         f"refused ({str(exc).splitlines()[0]:.120})") from None
    if not isinstance(value, torch.Tensor):
        raise InputError(f"point cloud {path}: expected an (N, 3) tensor, the file holds a {type(value).__name__}")
    return value.detach().numpy()


def _read_xyz(path: Path) -> np.ndarray:
    return np.loadtxt(path, usecols=(0, 1, 2), comments="#", ndmin=2, dtype=np.float64)


_OBJ_VERTEX = re.compile(rb"^v[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)", re.MULTILINE)


def _read_obj(path: Path) -> np.ndarray:
    rows = _OBJ_VERTEX.findall(path.read_bytes())  # `v x y z [w]`; vn / vt lines do not match
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _read_ply(path: Path) -> np.ndarray:
    data = path.read_bytes()
    end = re.search(rb"end_header\r?\n", data)
    if not data.startswith(b"ply") or end is None:
        raise InputError(f"point cloud {path}: not a PLY file (no 'ply' ... 'end_header' header)")
    header = data[:end.start()].decode("ascii", errors="replace").splitlines()
    body = data[end.end():]
    fmt, elements = "", []  # elements: [name, count, [(type, name) or ('list', name)]]
    for line in header:
        words = line.split()
        if words[:1] == ["format"] and len(words) >= 2:
            fmt = words[1]
        elif words[:1] == ["element"] and len(words) == 3 and words[2].isdigit():
            elements.append([words[1], int(words[2]), []])
        elif words[:1] == ["property"] and elements and len(words) >= 3:
            elements[-1][2].append(("list", words[-1]) if words[1] == "list" else (words[1], words[2]))
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise InputError(f"point cloud {path}: the PLY header declares no 'element vertex N'")
    _, count, props = elements[names.index("vertex")]
    before = elements[:names.index("vertex")]
    if not {"x", "y", "z"} <= {name for _, name in props}:
        raise InputError(f"point cloud {path}: the PLY vertices have no x, y, z properties")
    if any(kind == "list" or kind not in _PLY_TYPES for kind, _ in props):
        raise InputError(f"point cloud {path}: the PLY vertex properties must be scalars of a PLY type, "
                         f"got {[kind for kind, _ in props]}")
    columns = [name for _, name in props]
    if count == 0:
        raise InputError(f"point cloud {path}: no points (element vertex 0)")
    if fmt == "ascii":  # one line per item of each element, the vertices after the elements before them
        table = np.loadtxt(io.BytesIO(body), skiprows=sum(e[1] for e in before), max_rows=count, ndmin=2,
                           dtype=np.float64)
        if table.shape[0] < count:
            raise InputError(f"point cloud {path}: the header announces {count} vertices, the file holds "
                             f"{table.shape[0]}")
        if table.shape[1] != len(props):
            raise InputError(f"point cloud {path}: vertex lines have {table.shape[1]} values, the header "
                             f"declares {len(props)} properties")
        return table[:, [columns.index(c) for c in "xyz"]]
    order = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(fmt)
    if order is None:
        raise InputError(f"point cloud {path}: unknown PLY format {fmt!r}; allowed: ascii, binary_little_endian, "
                         f"binary_big_endian")
    if any(kind == "list" or kind not in _PLY_TYPES for e in before for kind, _ in e[2]):
        raise InputError(f"point cloud {path}: a binary PLY whose vertices follow an element with list "
                         f"properties cannot be read here; write the vertices first")
    offset = sum(e[1] * np.dtype([(n, order + _PLY_TYPES[k]) for k, n in e[2]]).itemsize for e in before)
    row = np.dtype([(name, order + _PLY_TYPES[kind]) for kind, name in props])
    if offset + count * row.itemsize > len(body):  # the header's count is trusted only as far as the bytes go
        raise InputError(f"point cloud {path}: the header announces {count} vertices of {row.itemsize} bytes, "
                         f"the file is shorter")
    table = np.frombuffer(body, dtype=row, count=count, offset=offset)
    return np.stack([table[c].astype(np.float64) for c in "xyz"], axis=1)


READERS: dict[str, Callable[[Path], np.ndarray]] = {
    ".npy": _read_npy, ".pt": _read_pt, ".ply": _read_ply, ".xyz": _read_xyz, ".obj": _read_obj}


def read_point_cloud(path: str | os.PathLike) -> torch.Tensor:
    """One file's points as they are: (N, 3) float32."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"point cloud {path}: unknown file type {path.suffix!r}; allowed: {', '.join(READERS)}")
    if not path.is_file():
        raise InputError(f"point cloud {path}: no such file")
    try:
        array = reader(path)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, RuntimeError) as exc:  # the parsers' own words, first line only
        detail = (str(exc).splitlines() or [""])[0][:160]
        raise InputError(f"point cloud {path}: unreadable as {path.suffix} ({type(exc).__name__}: {detail})") from None
    if array.dtype.kind not in "fiu" or array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"point cloud {path}: expected an (N, 3) array of x, y, z coordinates, got "
                         f"shape {tuple(array.shape)} of {array.dtype}")
    points = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if points.shape[0] == 0:
        raise InputError(f"point cloud {path}: no points")
    if not bool(torch.isfinite(points).all()):
        raise InputError(f"point cloud {path}: coordinates must be finite (NaN or infinity found)")
    return points


# -- resampling and normalisation ------------------------------------------------------------------


def resample_points(points: torch.Tensor, num_points: int, generator: torch.Generator) -> torch.Tensor:
    """(N, 3) -> (num_points, 3): a random subset in file order, or every point plus random repeats."""
    n = points.shape[0]
    if n > num_points:
        index = torch.randperm(n, generator=generator)[:num_points].sort().values
    elif n < num_points:
        index = torch.cat([torch.arange(n), torch.randint(0, n, (num_points - n,), generator=generator).sort().values])
    else:
        return points
    return points[index]


def normalize_points(points: torch.Tensor) -> torch.Tensor:
    """(N, 3) centred on its mean and scaled so the farthest point is at distance 1 (`pc_normalize`)."""
    centred = points - points.mean(dim=0)
    radius = centred.norm(dim=1).max()
    if radius == 0:
        raise InputError("point cloud: every point is at the same place; it cannot be scaled into the unit sphere")
    return centred / radius


def load_and_transform_point_cloud_data(paths: str | os.PathLike | Sequence[str | os.PathLike],
                                        device: str | torch.device = "cpu", *, num_points: int | None = NUM_POINTS,
                                        min_points: int = MIN_POINTS, normalize: bool = True, seed: int = 0,
                                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Files -> (B, num_points, 3) clouds for the point modality. Each is resampled to `num_points`
    (more points: a random subset in file order; fewer: all of them plus random repeats; drawn from
    `seed`) and, with `normalize`, centred on its mean and scaled into the unit sphere (upstream's
    `pc_normalize`); `num_points=None` keeps each file's points (then they must stack). A file with
    fewer than `min_points` is refused (the model's number of groups; 512 for the released one)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for name, value in (("num_points", num_points), ("min_points", min_points)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"point cloud: {name} must be an integer >= 1, got {value!r}")
    if num_points is not None and num_points < min_points:
        raise InputError(f"point cloud: num_points {num_points} is below min_points {min_points}: the clouds "
                         f"could not be grouped")
    if not paths:
        raise InputError("point cloud: no files given")
    clouds = []
    for path in paths:
        points = read_point_cloud(path)
        if points.shape[0] < min_points:
            raise InputError(f"point cloud {path}: {points.shape[0]} points, fewer than min_points={min_points} "
                             f"(the encoder's number of groups)")
        if num_points is not None:
            # a generator per file: a file gives the same cloud whichever files come with it
            points = resample_points(points, num_points, torch.Generator().manual_seed(seed))
        try:
            clouds.append(normalize_points(points) if normalize else points)
        except InputError as exc:
            raise InputError(f"point cloud {path}: {str(exc).removeprefix('point cloud: ')}") from None
    sizes = sorted({c.shape[0] for c in clouds})
    if len(sizes) > 1:
        raise InputError(f"point cloud: the files hold different numbers of points {sizes}; pass num_points "
                         f"to resample them to one size")
    return torch.stack(clouds).to(device=device, dtype=dtype)


__all__ = ["NUM_POINTS", "MIN_POINTS", "READERS", "read_point_cloud", "resample_points", "normalize_points",
           "load_and_transform_point_cloud_data"]
