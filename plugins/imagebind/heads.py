"""ImageBind's heads (trunk tokens -> one joint-space embedding) and postprocessors.

Upstream's CLS heads read only token 0; here the selection is the head's `mode` per modality:
`first` (token 0, upstream's), `mean` (of the k CLS tokens) or `all` (each projected on its own,
[B, k, out]: the k visual tokens ImageBind-LLM feeds a language model). Upstream's Sequential
layout is kept (`0` norm, `1` select, `2`/`3` projection), so the key names are upstream's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import POINT, ConfigError, ModalityConfig, check_head_mode


class SelectCls(nn.Module):
    """Which trunk tokens the head reads; `mode` is first | mean | all (see the module doc)."""

    def __init__(self, mode: str = "first") -> None:
        super().__init__()
        self.mode = check_head_mode(mode)

    def forward(self, x: torch.Tensor, num_cls_tokens: int, mode: str | None = None) -> torch.Tensor:
        mode = self.mode if mode is None else mode
        if mode == "first":
            return x[:, 0]                   # [B, D]; with no CLS token, the first patch (upstream)
        if num_cls_tokens == 0:
            raise ConfigError(f"head mode {mode!r} reads the CLS tokens and this modality has none; "
                              f"use head mode 'first' or grow num_cls_tokens")
        return x[:, :num_cls_tokens]         # [B, k, D]


class ClsHead(nn.Sequential):
    """LayerNorm -> select the CLS token(s) -> [dropout] -> bias-free projection to the joint space.

    The norm is applied to the selected tokens only (it is per token, so this is what upstream's
    norm-everything-then-select computes, without normalising hundreds of patch tokens)."""

    def __init__(self, cfg: ModalityConfig, out_dim: int) -> None:
        layers: list[nn.Module] = [nn.LayerNorm(cfg.embed_dim, eps=1e-6), SelectCls(cfg.head_mode)]
        if cfg.head_dropout:
            layers.append(nn.Dropout(cfg.head_dropout))
        layers.append(nn.Linear(cfg.embed_dim, out_dim, bias=False))
        super().__init__(*layers)

    @property
    def mode(self) -> str:
        return self[1].mode

    @mode.setter
    def mode(self, value: str) -> None:
        self[1].mode = check_head_mode(value)

    def forward(self, x: torch.Tensor, num_cls_tokens: int = 1, mode: str | None = None) -> torch.Tensor:
        norm, select, *rest = self
        mode = select.mode if mode is None else check_head_mode(mode)
        x = norm(select(x, num_cls_tokens, mode))  # [B, D] or [B, k, D]
        if mode == "mean":
            x = x.mean(dim=1)                      # [B, D]
        for layer in rest:
            x = layer(x)                           # [B, out] or [B, k, out]
        return x


class PointHead(nn.Sequential):
    """Point: LayerNorm(P, eps 1e-6) -> Dropout -> bias-free projection (upstream's `0`, `1`, `2`).

    Its trunk already gives one P-wide feature per CLS token ([B, k, P]: each CLS token beside the
    max over the groups, projected), so the head selects among those by `mode`, as the CLS heads
    do: `first` feature 0, `mean` of the normalised features, `all`."""

    def __init__(self, cfg: ModalityConfig, out_dim: int) -> None:
        super().__init__(nn.LayerNorm(cfg.point_dim, eps=1e-6), nn.Dropout(cfg.head_dropout),
                         nn.Linear(cfg.point_dim, out_dim, bias=False))
        self.mode = check_head_mode(cfg.head_mode)  # a plain attribute: no module, no key

    def forward(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        norm, dropout, proj = self
        mode = self.mode if mode is None else check_head_mode(mode)
        x = norm(x[:, 0] if mode == "first" else x)  # [B, P] or [B, k, P]
        if mode == "mean":
            x = x.mean(dim=1)                        # [B, P]
        return proj(dropout(x))                      # [B, out] or [B, k, out]


class EotHead(nn.Module):
    """Text: the end-of-text token's features, normalised and projected (upstream `SelectEOSAndProject`)."""

    def __init__(self, cfg: ModalityConfig, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=1e-6), nn.Linear(cfg.embed_dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        return self.proj(x[rows, eot_index.to(x.device)])  # [B, out]


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, p=2)


class LogitScale(nn.Module):
    """x * min(exp(log_logit_scale), max_logit_scale); learned (a parameter) or fixed (a buffer)."""

    def __init__(self, init: float, learnable: bool, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale
        value = torch.tensor(math.log(init), dtype=torch.float32)
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clip(self.log_logit_scale.exp(), max=self.max_logit_scale) * x


def make_head(modality: str, cfg: ModalityConfig, out_dim: int) -> nn.Module:
    if modality == POINT:
        return PointHead(cfg, out_dim)
    return EotHead(cfg, out_dim) if modality == "text" else ClsHead(cfg, out_dim)


def make_postprocessor(modality: str, cfg: ModalityConfig, text_scale: float, max_scale: float) -> nn.Module:
    if modality == "text":
        return nn.Sequential(Normalize(), LogitScale(text_scale, learnable=True, max_logit_scale=max_scale))
    if cfg.logit_scale is None:
        return Normalize()  # vision: no scale, so no key (upstream)
    return nn.Sequential(Normalize(), LogitScale(cfg.logit_scale, learnable=False, max_logit_scale=max_scale))


__all__ = ["SelectCls", "ClsHead", "PointHead", "EotHead", "Normalize", "LogitScale", "make_head", "make_postprocessor"]
