"""ImageBindModel: six (with ImageBind-LLM's point clouds, seven) modality encoders into one joint space.

    out = model({"vision": images, "text": tokens, "audio": mels})   # {modality: [B, 1024]}
    out = model({"vision": images}, head_mode="all")                  # {"vision": [B, k, 1024]}

Upstream's module tree and key names, so upstream's `imagebind_huge()` state dict loads strictly; an
input of 5 or more dims is S clips per item, averaged after the postprocessor as upstream does. The
point modality is laid out as in ImageBind-LLM's copy (a top-level `point_trunk`).
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from .config import HEAD_MODALITIES, POINT, ConfigError, ImageBindConfig, InputError, check_head_mode
from .heads import make_head, make_postprocessor
from .point_encoder import PointTrunk
from .preprocessors import IMUPreprocessor, PatchPreprocessor, TextPreprocessor
from .trunk import Trunk

CLIP_NDIM = 5  # an input of this many dims or more carries a clip axis (upstream's rule, for every modality)


def make_preprocessor(modality: str, cfg) -> nn.Module:
    if modality == "text":
        return TextPreprocessor(cfg)
    if modality == "imu":
        return IMUPreprocessor(cfg)
    return PatchPreprocessor(modality, cfg)


class ImageBindModel(nn.Module):
    def __init__(self, config: ImageBindConfig | None = None) -> None:
        super().__init__()
        # a copy: the token sites keep the config's counts in step, and must not edit the caller's
        self.config = config = copy.deepcopy(config) if config is not None else ImageBindConfig.named("huge")
        mods = config.modalities
        patched = {m: c for m, c in mods.items() if m != POINT}  # the point encoder is laid out apart (upstream)
        self.modality_preprocessors = nn.ModuleDict({m: make_preprocessor(m, c) for m, c in patched.items()})
        self.modality_trunks = nn.ModuleDict({m: Trunk(c) for m, c in patched.items()})
        self.modality_heads = nn.ModuleDict({m: make_head(m, c, config.out_embed_dim) for m, c in mods.items()})
        self.modality_postprocessors = nn.ModuleDict({
            m: make_postprocessor(m, c, config.text_logit_scale_init, config.max_logit_scale) for m, c in mods.items()})
        if POINT in mods:
            self.point_trunk = PointTrunk(mods[POINT])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.modality_heads)

    def num_cls_tokens(self, modality: str) -> int:
        if self._check_modality(modality) == POINT:
            return self.point_trunk.num_cls_tokens
        return self.modality_preprocessors[modality].num_cls_tokens

    def head_mode(self, modality: str) -> str:
        head = self.modality_heads[self._check_modality(modality)]
        return getattr(head, "mode", "eot")

    def set_head_mode(self, mode: str | Mapping[str, str]) -> None:
        """Set how the heads read CLS tokens: one mode for every CLS modality, or {modality: mode}.

        A change of the model's state like a resize: it goes through `surgery.set_options` (option
        `head_mode`), so it is checked for every modality first (on an error nothing is changed),
        recorded in the recipe, saved with the model, undone with an enclosing `surgery.tokens(...)`."""
        import surgery

        surgery.set_options(self, head_mode=self.check_head_modes(mode))

    def check_head_modes(self, mode: str | Mapping[str, str]) -> dict[str, str]:
        """{modality: mode} for `mode` (one mode: every CLS modality), each one this model can take now."""
        modes = dict(mode) if isinstance(mode, Mapping) else {m: mode for m in self.modalities if m in HEAD_MODALITIES}
        for modality, m in modes.items():
            self._check_modality(modality)
            if modality not in HEAD_MODALITIES:
                raise ConfigError(f"{modality} has no CLS-token head mode: its head reads the end-of-text token")
            check_head_mode(m, modality)
            if m != "first" and self.num_cls_tokens(modality) == 0:
                raise ConfigError(f"{modality}: head mode {m!r} reads the CLS tokens and there are none; "
                                  f"grow num_cls_tokens.{modality} first")
        return modes

    def write_head_modes(self, mode: str | Mapping[str, str]) -> None:
        """The plain setter under `set_head_mode` (checked as it is, not recorded): for building a
        model, and for the `head_mode` option's hook, which journals it."""
        for modality, m in self.check_head_modes(mode).items():
            self.modality_heads[modality].mode = m
            self.config.modalities[modality].head_mode = m

    def _check_modality(self, modality: str) -> str:
        if modality not in self.modality_heads:
            raise InputError(f"unknown modality {modality!r}; this model has {', '.join(self.modalities)}")
        return modality

    def encode(self, modality: str, x: torch.Tensor, head_mode: str | None = None) -> torch.Tensor:
        """One modality's embeddings: [B, out] ([B, k, out] in head mode `all`)."""
        self._check_modality(modality)
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{modality}: expected a tensor, got {type(x).__name__}")
        if modality == POINT:
            features = self.point_trunk(x)  # [B, k, P]: one per CLS token
            return self.modality_postprocessors[POINT](self.modality_heads[POINT](features, head_mode))
        clips = x.shape[:2] if x.ndim >= CLIP_NDIM else None
        if clips is not None:
            x = x.reshape(clips[0] * clips[1], *x.shape[2:])  # [B * S, ...]
        enc = self.modality_preprocessors[modality](x)
        h = self.modality_trunks[modality](enc.tokens, enc.attn_mask)  # [B, N, D]
        head = self.modality_heads[modality]
        if modality == "text":
            if head_mode is not None:
                raise ConfigError("text has no CLS-token head mode: its head reads the end-of-text token")
            e = head(h, enc.eot_index)
        else:
            e = head(h, enc.num_cls_tokens, head_mode)
        e = self.modality_postprocessors[modality](e)  # [B, out] or [B, k, out]
        if clips is not None:
            e = e.reshape(*clips, *e.shape[1:]).mean(dim=1)  # mean over clips, not renormalised (upstream)
        return e

    def forward(self, inputs: Mapping[str, torch.Tensor],
                head_mode: str | Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
        """{modality: input} -> {modality: embedding}. `head_mode` overrides the heads' modes for
        this call (one mode for every CLS modality, or {modality: mode})."""
        if not isinstance(inputs, Mapping):
            raise InputError(f"ImageBindModel takes a dict {{modality: tensor}}, got {type(inputs).__name__}")
        for modality in inputs:  # every name checked before any encoder runs
            self._check_modality(modality)
        if isinstance(head_mode, Mapping):
            for modality, mode in head_mode.items():
                self._check_modality(modality)
                if modality not in HEAD_MODALITIES:
                    raise ConfigError(f"{modality} has no CLS-token head mode: its head reads the end-of-text token")
                check_head_mode(mode, modality)
        elif head_mode is not None:
            check_head_mode(head_mode)
        out = {}
        for modality, x in inputs.items():
            if x is None:
                continue
            mode = head_mode.get(modality) if isinstance(head_mode, Mapping) else head_mode
            out[modality] = self.encode(modality, x, None if modality == "text" else mode)
        return out


__all__ = ["ImageBindModel", "make_preprocessor"]
