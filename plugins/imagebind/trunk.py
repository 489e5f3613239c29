"""ImageBind's transformer trunks: pre-norm blocks with `nn.MultiheadAttention`'s parameters.

Upstream's parameter names and arithmetic (`SimpleTransformer` of `BlockWithMasking`; `bias_kv` for
audio, depth, thermal and imu), but run batch-first through `F.scaled_dot_product_attention`: no
(L, B, D) transposes around every block, and the device's fused attention kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from .config import ModalityConfig


class MultiheadAttention(nn.Module):
    """Self-attention with `nn.MultiheadAttention`'s parameters and numerics, batch-first.

    `bias_k` / `bias_v` (1, 1, D) are one extra key and value every query attends to, appended
    after the projections (and an attention mask gets a zero column for them), as torch does.
    """

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:  # torch's MultiheadAttention init
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        H, hd = self.num_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)   # [B, N, 3C]
        q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)   # 3 x [B, H, N, hd]
        if self.bias_k is not None:
            bk = self.bias_k.view(1, H, 1, hd).expand(B, H, 1, hd)  # [B, H, 1, hd]
            bv = self.bias_v.view(1, H, 1, hd).expand(B, H, 1, hd)
            k = torch.cat([k, bk], dim=2)                            # [B, H, N + 1, hd]
            v = torch.cat([v, bv], dim=2)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))                 # [N, N + 1]: the extra key is always seen
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, hd]
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))    # [B, N, C]


class Block(nn.Module):
    """Pre-norm transformer block (upstream `BlockWithMasking`): LayerNorm eps 1e-6, MLP ratio 4, GELU."""

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool, drop_path: float) -> None:
        super().__init__()
        self.attn = MultiheadAttention(dim, num_heads, add_bias_kv)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=4 * dim, act_layer=nn.GELU)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm_1(x), attn_mask))  # [B, N, D]
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class Trunk(nn.Module):
    """`pre_transformer_layer` (LayerNorm for vision, else identity), then the blocks."""

    def __init__(self, cfg: ModalityConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6) if cfg.pre_transformer_ln
                                                   else nn.Identity())
        rates = torch.linspace(0, cfg.drop_path, cfg.num_blocks, device="cpu").tolist()  # grows with depth
        self.blocks = nn.Sequential(*(Block(dim, cfg.num_heads, cfg.add_bias_kv, r) for r in rates))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():  # upstream's "jax" init: xavier-uniform Linear weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens)  # [B, N, D]
        for block in self.blocks:
            x = block(x, attn_mask)
        return x


__all__ = ["MultiheadAttention", "Block", "Trunk"]
