"""The optional kNN cache of ImageBind-LLM (upstream's `knn=True`): joint-space embeddings pulled
toward stored prototypes p with similarities s, from a faiss index file the user gives (never
downloaded; faiss is an optional extra):

    r = softmax(s * cache_t) @ p;  r = r / |r|;  x' = (1 - cache_weight) * x + cache_weight * r;  x' / |x'|

Each embedding (each visual token of each row) is mixed with its own prototypes; upstream's batched
matmul mixes every row's into every row, so this is upstream's result at batch 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from surgery.errors import CheckpointError, ModelConfigError

INSTALL_HINT = "the kNN cache needs faiss, an optional extra: pip install faiss-cpu"


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ModelConfigError(f"{INSTALL_HINT} ({exc})") from exc
    return faiss


class KnnCache:
    """A faiss index of prototypes in ImageBind's joint space, read from a file."""

    def __init__(self, index: Any, path: Path) -> None:
        self.index, self.path = index, path

    def __deepcopy__(self, memo: dict) -> "KnnCache":
        return self  # read-only data: a copied model shares it (faiss objects cannot be deep-copied)

    def __reduce__(self) -> tuple:
        return (KnnCache.from_file, (self.path, self.dim))  # a pickled model reads the file again

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def from_file(cls, path: str | os.PathLike, dim: int) -> "KnnCache":
        """Read a faiss index file (faiss's own format, not a pickle) whose vectors are `dim` wide."""
        faiss = import_faiss()
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"kNN index {path} does not exist (a faiss index file of {dim}-d "
                                  f"ImageBind embeddings; upstream's is knn.index, nothing is downloaded here)")
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, ValueError, TypeError) as exc:  # faiss reports a bad file as RuntimeError
            raise CheckpointError(f"kNN index {path} is not a faiss index file: {str(exc).splitlines()[0]}") from exc
        if index.d != dim:
            raise CheckpointError(f"kNN index {path} holds {index.d}-d vectors; the model's ImageBind "
                                  f"embeddings are {dim}-d")
        if index.ntotal == 0:
            raise CheckpointError(f"kNN index {path} is empty: it holds no prototypes")
        try:
            index.reconstruct(0)
        except RuntimeError as exc:
            raise CheckpointError(f"kNN index {path} ({type(index).__name__}) cannot give back its stored "
                                  f"vectors (reconstruct), which the cache mixes in; use a flat index, or "
                                  f"make its direct map") from exc
        return cls(index, path)

    def check(self, cache_size: Any, cache_t: Any, cache_weight: Any) -> None:
        """The mixing arguments, checked before anything runs."""
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or not 1 <= cache_size <= self.size:
            raise ModelConfigError(f"cache_size must be an integer within 1..{self.size} (the prototypes in "
                                   f"{self.path}), got {cache_size!r}")
        if not _finite(cache_t):
            raise ModelConfigError(f"cache_t must be a finite number, got {cache_t!r}")
        if not _finite(cache_weight) or not 0.0 <= cache_weight <= 1.0:
            raise ModelConfigError(f"cache_weight must be a number within 0..1, got {cache_weight!r}")

    def mix(self, feats: Tensor, cache_size: int = 10, cache_t: float = 20.0, cache_weight: float = 0.5) -> Tensor:
        """feats (..., E) -> (..., E): each embedding mixed with its nearest prototypes, unit length."""
        self.check(cache_size, cache_t, cache_weight)
        shape = feats.shape
        x = feats.detach().reshape(-1, shape[-1]).float()  # (N, E)
        sims, ids = self.index.search(x.cpu().contiguous().numpy(), cache_size)  # (N, S) each
        protos = self.index.reconstruct_batch(ids.reshape(-1))  # (N * S, E)
        sims = torch.from_numpy(sims).to(x.device)  # (N, S)
        protos = torch.from_numpy(protos).to(x.device).view(x.shape[0], cache_size, -1)  # (N, S, E)
        weights = (sims * cache_t).softmax(dim=-1)  # (N, S)
        retrieved = torch.bmm(weights.unsqueeze(1), protos).squeeze(1)  # (N, E)
        retrieved = retrieved / retrieved.norm(dim=-1, keepdim=True)
        mixed = (1 - cache_weight) * feats.reshape(-1, shape[-1]).float() + cache_weight * retrieved
        mixed = mixed / mixed.norm(dim=-1, keepdim=True)
        return mixed.view(shape).to(feats.dtype)


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


__all__ = ["KnnCache", "import_faiss", "INSTALL_HINT"]
