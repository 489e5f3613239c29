"""ImageBind-LLM's point-cloud trunk: a Point-BERT transformer over farthest-point-sampled groups.

    trunk = PointTrunk(config.modalities["point"])     # the model's `point_trunk`
    features = trunk(points)                           # [B, N, 3] -> [B, k, 512], one per CLS token

Upstream's `PointTransformerBind` (LLaMA-Adapter's `imagebind_LLM/ImageBind/models/pointbert`) with
its module tree, so `imagebind_w3D.pth`'s `point_trunk.*` keys load strictly. k CLS tokens (upstream:
1) give k features, each `[CLS_i, max over groups] @ pc_projection`: at k = 1, upstream's output.
The architecture in full: docs/imagebind.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from .config import InputError, ModalityConfig
from .points import first_centres, group_points


class PointwiseConv(nn.Conv1d):
    """A kernel-1 `Conv1d` (upstream's parameters: weight (out, in, 1)) applied to channel-last
    points [..., in] as the matmul it is, without transposing the groups to (B, C, n) and back."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.squeeze(-1), self.bias)


def _conv_stage(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    # upstream's Sequential(Conv1d, BatchNorm1d, ReLU, Conv1d): keys .0, .1 (with running stats), .3
    return nn.Sequential(PointwiseConv(c_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         PointwiseConv(hidden, c_out))


class GroupEncoder(nn.Module):
    """Mini-PointNet: [B, G, M, 3] centred groups -> [B, G, group_dim], one feature per group."""

    def __init__(self, group_dim: int) -> None:
        super().__init__()
        self.group_dim = group_dim
        self.first_conv = _conv_stage(3, 128, 256)
        self.second_conv = _conv_stage(512, 512, group_dim)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        B, G, M, _ = groups.shape
        x = self.first_conv(groups.reshape(B * G * M, 3)).view(B * G, M, -1)   # [BG, M, 256]; BatchNorm on rows
        pooled = x.amax(dim=1, keepdim=True)                                    # [BG, 1, 256]
        x = torch.cat([pooled.expand(-1, M, -1), x], dim=-1)                    # [BG, M, 512]: group, then point
        x = self.second_conv(x.reshape(B * G * M, -1)).view(B * G, M, -1)       # [BG, M, group_dim]
        return x.amax(dim=1).view(B, G, -1)                                     # [B, G, group_dim]


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free `qkv` and a biased `proj` (upstream's keys)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)      # [B, H, N, hd], scale hd ** -0.5 as upstream
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class PointBlock(nn.Module):
    """Pre-norm block. Attributes in upstream's order (norm1, norm2, mlp, attn) so the state dict
    lists the keys in the order of upstream's."""

    def __init__(self, dim: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=4 * dim, act_layer=nn.GELU)
        self.attn = Attention(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PositionedBlocks(nn.Module):
    """The blocks (`blocks.blocks.N` in upstream's keys), the positions added before each one."""

    def __init__(self, cfg: ModalityConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, cfg.drop_path, cfg.num_blocks, device="cpu").tolist()  # grows with depth
        self.blocks = nn.ModuleList(PointBlock(cfg.embed_dim, cfg.num_heads, r) for r in rates)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointEncoder(nn.Module):
    """[B, N, 3] points -> [B, k, 2D]: each CLS token's final features beside the max over groups."""

    def __init__(self, cfg: ModalityConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.num_groups, self.group_size = cfg.num_groups, cfg.group_size
        self.num_cls_tokens = cfg.num_cls_tokens      # what the forward reads; the site keeps it in step
        self.fps_seed = cfg.fps_seed
        self.encoder = GroupEncoder(cfg.group_dim)
        self.reduce_dim = nn.Linear(cfg.group_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, cfg.num_cls_tokens, dim))
        self.cls_pos = nn.Parameter(torch.randn(1, cfg.num_cls_tokens, dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = PositionedBlocks(cfg)
        self.norm = nn.LayerNorm(dim)

    def check(self, points: torch.Tensor) -> None:
        """Refuse what cannot be encoded, before any work."""
        if not isinstance(points, torch.Tensor):
            raise InputError(f"point: expected a tensor of point clouds (B, N, 3), got {type(points).__name__}")
        if not points.is_floating_point():
            raise InputError(f"point: expected floating-point coordinates, got {points.dtype}")
        if points.ndim != 3 or points.shape[-1] != 3:
            shape = "(" + ", ".join(str(s) for s in points.shape) + ")"
            raise InputError(f"point: expected point clouds of shape (B, N, 3) (x, y, z per point), got {shape}")
        need = max(self.num_groups, self.group_size)
        if points.shape[1] < need:
            raise InputError(f"point: a cloud of {points.shape[1]} points cannot make {self.num_groups} groups of "
                             f"{self.group_size} points; at least {need} points are needed")
        if not bool(torch.isfinite(points).all()):
            raise InputError("point: coordinates must be finite (the cloud holds NaN or infinity)")

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        self.check(points)
        like = self.reduce_dim.weight
        points = points.to(like.device)
        groups, centres = group_points(points, self.num_groups, self.group_size,
                                       first_centres(points, self.fps_seed))          # float32
        tokens = self.reduce_dim(self.encoder(groups.to(like.dtype)))                  # [B, G, D]
        B, k = tokens.shape[0], self.num_cls_tokens
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)               # [B, k + G, D]
        pos = torch.cat([self.cls_pos.expand(B, -1, -1), self.pos_embed(centres.to(like.dtype))], dim=1)
        x = self.norm(self.blocks(x, pos))
        pooled = x[:, k:].amax(dim=1, keepdim=True)                                    # [B, 1, D]
        return torch.cat([x[:, :k], pooled.expand(-1, k, -1)], dim=-1)                 # [B, k, 2D]


class PointTrunk(nn.Module):
    """Upstream's `PointTransformerBind`: the encoder and `pc_projection` (2D, P)."""

    def __init__(self, cfg: ModalityConfig) -> None:
        super().__init__()
        self.pc_projection = nn.Parameter(torch.empty(2 * cfg.embed_dim, cfg.point_dim))
        nn.init.normal_(self.pc_projection, std=cfg.point_dim ** -0.5)
        self.point_encoder = PointEncoder(cfg)

    @property
    def num_cls_tokens(self) -> int:
        return self.point_encoder.num_cls_tokens

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.point_encoder(points) @ self.pc_projection    # [B, k, P]


__all__ = ["PointwiseConv", "GroupEncoder", "Attention", "PointBlock", "PositionedBlocks", "PointEncoder",
           "PointTrunk"]
