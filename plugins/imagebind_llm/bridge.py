"""The bridge from ImageBind's joint space to the LLaMA's width (upstream `LLaMA_adapter.forward_visual`):
`image_bind_proj`, then three residual SwiGLU blocks (RMSNorm, bias-free; with `legacy_bridge`
LayerNorm and biases, as upstream's switch).

Upstream keeps these modules as attributes of the model itself (keys `image_bind_proj.*`,
`image_bind_norm_1.*`, ...), so they are created on the model given. Each token is mapped on its
own, so K visual tokens need nothing but K rows.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from surgery_plugins.llama_adapter.llama import RMSNorm

BLOCKS = (1, 2, 3)
HIDDEN_RATIO = 4  # upstream: 4096 * 4


def bridge_names() -> list[str]:
    """The bridge's module names in upstream's order (the order of its state-dict keys)."""
    names = ["image_bind_proj"]
    for k in BLOCKS:
        names += [f"image_bind_norm_{k}", f"image_bind_f1_{k}", f"image_bind_f2_{k}", f"image_bind_f3_{k}"]
    return names


def add_bridge(owner: nn.Module, in_dim: int, dim: int, legacy: bool = False) -> None:
    """Create the bridge's modules as attributes of `owner` (upstream's key names)."""
    hidden = HIDDEN_RATIO * dim
    owner.image_bind_proj = nn.Linear(in_dim, dim)  # always with a bias (upstream)
    for k in BLOCKS:
        setattr(owner, f"image_bind_norm_{k}", nn.LayerNorm(dim) if legacy else RMSNorm(dim))
        setattr(owner, f"image_bind_f1_{k}", nn.Linear(dim, hidden, bias=legacy))
        setattr(owner, f"image_bind_f2_{k}", nn.Linear(hidden, dim, bias=legacy))
        setattr(owner, f"image_bind_f3_{k}", nn.Linear(dim, hidden, bias=legacy))


def run_bridge(owner: nn.Module, x: Tensor) -> Tensor:
    """(B, K, E) joint-space embeddings -> (B, K, dim), in the bridge's dtype."""
    x = owner.image_bind_proj(x.to(owner.image_bind_proj.weight.dtype))  # (B, K, dim)
    for k in BLOCKS:
        n = getattr(owner, f"image_bind_norm_{k}")(x)
        gate = F.silu(getattr(owner, f"image_bind_f1_{k}")(n))  # (B, K, hidden)
        up = getattr(owner, f"image_bind_f3_{k}")(n)  # (B, K, hidden)
        x = x + getattr(owner, f"image_bind_f2_{k}")(gate * up)  # residual, (B, K, dim)
    return x


__all__ = ["BLOCKS", "add_bridge", "bridge_names", "run_bridge"]
