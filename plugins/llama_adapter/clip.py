"""The CLIP ViT-L/14 image encoder of LLaMA-Adapter V2, returning every token.

Upstream (`LLaMA_adapter.clip_encode_image`) skips CLIP's CLS-only pooling: `ln_post` and `proj`
apply to all 1 + N tokens, (B, 257, 768) at 224. Built on timm's `VisionTransformer` in the CLIP
layout (as timm's `vit_large_patch14_clip_quickgelu_224`) with `global_pool=''`, so the `timm_vit`
plugin recognises a standalone `ClipVision` too. OpenAI's `visual.*` weights convert both ways
(`convert_openai_visual`, `to_openai_visual`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Mapping

import torch
from torch import nn

from timm.layers import LayerNormFp32
from timm.models.vision_transformer import VisionTransformer

from surgery.errors import CheckpointError, ModelConfigError
# CLIP's preprocessing lives in the core (ImageBind's vision encoder uses it too); re-exported here
from surgery.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_transform, load_images


# where the visual tower sits in the state dicts we meet, most specific first
OPENAI_PREFIXES = ("clip.visual.", "visual.", "")

# -- key mapping (OpenAI name -> timm name) ------------------------------------------------------

_TOP = {
    "class_embedding": "cls_token",
    "positional_embedding": "pos_embed",
    "conv1.weight": "patch_embed.proj.weight",
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
    "proj": "head.weight",
}
_BLOCK = {
    "attn.in_proj_weight": "attn.qkv.weight",  # q, k, v stacked row-wise in both layouts
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
}
_OPENAI_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}


def _find_prefix(sd: Mapping[str, torch.Tensor]) -> str:
    for prefix in OPENAI_PREFIXES[:-1]:
        if any(k.startswith(prefix) for k in sd):
            return prefix
    if any(k in _TOP or _OPENAI_BLOCK.fullmatch(k) for k in sd):
        return ""
    raise CheckpointError(
        "no OpenAI CLIP visual weights found: expected keys such as 'conv1.weight' under one of the "
        f"prefixes {[p for p in OPENAI_PREFIXES if p]} or none; got {_preview(sd)}")


def _visual_items(sd: Mapping[str, torch.Tensor], prefix: str | None) -> tuple[str, dict[str, torch.Tensor]]:
    """The visual tower's entries with the prefix removed. Keys outside the prefix belong to the
    rest of the model (CLIP's text tower, LLaMA, the adapter) and are not ours to judge."""
    prefix = _find_prefix(sd) if prefix is None else prefix
    return prefix, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "(no keys)"


def _openai_keys(layers: int) -> list[str]:
    """Every key an OpenAI visual tower with `layers` resblocks has (without prefix)."""
    blocks = [f"transformer.resblocks.{i}.{k}" for i in range(layers) for k in _BLOCK]
    return [*_TOP, *blocks]


def _layer_count(keys: Iterable[str]) -> int:
    found = [int(m.group(1)) for k in keys if (m := _OPENAI_BLOCK.fullmatch(k))]
    return max(found) + 1 if found else 0


def convert_openai_visual(sd: Mapping[str, torch.Tensor], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """OpenAI CLIP visual weights -> the keys and shapes of `ClipVision` (timm's layout).

    `prefix` is detected when None ('clip.visual.', 'visual.' or none). Every key under the
    prefix must be a visual-tower key and every one of them must be there, or CheckpointError
    lists the missing and unexpected ones (with the prefix, as they appear in `sd`). Tensors are
    reshaped views where possible, so nothing large is copied.
    """
    prefix, items = _visual_items(sd, prefix)
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in items.items():
        block = _OPENAI_BLOCK.fullmatch(key)
        if block and block.group(2) in _BLOCK:
            out[f"blocks.{block.group(1)}.{_BLOCK[block.group(2)]}"] = value
        elif key in _TOP:
            out[_TOP[key]] = value
        else:
            unexpected.append(prefix + key)
    missing = [prefix + k for k in _openai_keys(_layer_count(items)) if k not in items]
    if missing or unexpected:
        raise CheckpointError(
            "not an OpenAI CLIP visual state dict: "
            f"missing {len(missing)} key(s): {_preview(missing)}; "
            f"unexpected {len(unexpected)} key(s): {_preview(unexpected)}")
    out["cls_token"] = out["cls_token"].reshape(1, 1, -1)     # (W,) -> (1, 1, W)
    out["pos_embed"] = out["pos_embed"].unsqueeze(0)           # (1+N, W) -> (1, 1+N, W)
    # OpenAI applies x @ proj with proj (W, D); a Linear computes x @ weight.T, so weight = proj.T
    out["head.weight"] = out["head.weight"].t().contiguous()   # (D, W)
    return out


def to_openai_visual(sd: Mapping[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """The inverse of `convert_openai_visual`: a `ClipVision` state dict in OpenAI's layout (so
    an edited encoder can be written back for upstream code). Unknown keys raise CheckpointError."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        block = _TIMM_BLOCK.fullmatch(key)
        if block and block.group(2) in _BLOCK_INV:
            out[f"{prefix}transformer.resblocks.{block.group(1)}.{_BLOCK_INV[block.group(2)]}"] = value
        elif key in _TOP_INV:
            out[prefix + _TOP_INV[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"keys with no OpenAI CLIP equivalent: {_preview(unknown)} "
                              "(register tokens, for one, do not exist in OpenAI's layout)")
    out[prefix + "class_embedding"] = out[prefix + "class_embedding"].reshape(-1)
    out[prefix + "positional_embedding"] = out[prefix + "positional_embedding"].squeeze(0)
    out[prefix + "proj"] = out[prefix + "proj"].t().contiguous()
    return out


# -- config ---------------------------------------------------------------------------------------


@dataclass
class ClipVisionConfig:
    """OpenAI CLIP visual tower; the defaults are ViT-L/14 at 224 (what LLaMA-Adapter V2 uses)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    # None -> width // 64 (16 for ViT-L), OpenAI's rule. Heads change no shape, so a wrong count
    # would load cleanly and compute garbage; deriving it is the safe default
    heads: int | None = None
    output_dim: int = 768

    def __post_init__(self) -> None:
        if self.heads is None:
            self.heads = max(1, self.width // 64)
        if self.image_size % self.patch_size:
            raise ModelConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ModelConfigError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens out of the encoder: the class token and one per patch (257 for ViT-L/14)."""
        return 1 + self.grid_size ** 2

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str | None = None) -> "ClipVisionConfig":
        """Infer the config from OpenAI visual weights the way OpenAI's `build_model` does
        (shapes only, so meta tensors work): heads are not stored, OpenAI uses width // 64."""
        prefix, items = _visual_items(sd, prefix)
        needed = ("conv1.weight", "positional_embedding", "proj")
        if absent := [prefix + k for k in needed if k not in items]:
            raise CheckpointError(f"cannot infer the CLIP visual config: missing {', '.join(absent)}")
        width, _, patch, _ = items["conv1.weight"].shape       # (W, 3, P, P)
        rows = items["positional_embedding"].shape[0]          # 1 + grid**2
        grid = math.isqrt(rows - 1)
        if grid * grid != rows - 1:
            raise CheckpointError(f"{prefix}positional_embedding has {rows} rows, not 1 + a square grid")
        layers = _layer_count(items)
        if layers == 0:
            raise CheckpointError(f"no {prefix}transformer.resblocks.N.* keys")
        return cls(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                   heads=None, output_dim=items["proj"].shape[1])


# -- the encoder ----------------------------------------------------------------------------------


class ClipVision(VisionTransformer):
    """OpenAI CLIP image encoder on timm's ViT: `forward(images) -> (B, 1+N, output_dim)`."""

    def __init__(self, config: ClipVisionConfig | None = None) -> None:
        config = config or ClipVisionConfig()
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.width,
            depth=config.layers,
            num_heads=config.heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            class_token=True,
            pre_norm=True,  # ln_pre; timm also drops the patch-embed bias with it, as OpenAI has none
            final_norm=True,  # ln_post, applied to every token because nothing is pooled
            global_pool="",
            num_classes=0,  # the head is replaced below
            # OpenAI's LayerNorm computes in fp32 and casts back; in fp16 CLIP (upstream on CUDA)
            # that is what keeps the 24 pre-norms from losing precision
            norm_layer=partial(LayerNormFp32, eps=1e-5),
            act_layer="quick_gelu",  # x * sigmoid(1.702 x), what CLIP was trained with
        )
        self.config = config
        # OpenAI's `proj` has no bias; a bias-free Linear keeps the keys 1:1 with the checkpoint
        self.head = nn.Linear(config.width, config.output_dim, bias=False)
        nn.init.normal_(self.head.weight, std=config.width ** -0.5)  # OpenAI's init scale for proj
        self.num_classes = config.output_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images from clip_transform are fp32; run them in the weights' dtype, as upstream's
        # fp16 CLIP does under autocast (a no-op when autocast is on or the model is fp32)
        x = images.to(self.patch_embed.proj.weight.dtype)  # (B, 3, H, W)
        x = self.forward_features(x)                         # (B, 1+N, W): ln_post on every token
        x = self.head(x)                                     # (B, 1+N, D): x @ proj
        return x

    # -- OpenAI weights --

    def load_openai(self, sd: Mapping[str, torch.Tensor], prefix: str | None = None,
                    assign: bool = False) -> "ClipVision":
        """Load OpenAI CLIP visual weights (strict). Missing/unexpected keys and shape mismatches
        raise CheckpointError before any parameter is touched. Returns self."""
        converted = convert_openai_visual(sd, prefix)
        own = self.state_dict()
        missing = sorted(own.keys() - converted.keys())
        unexpected = sorted(converted.keys() - own.keys())
        if missing or unexpected:  # a different depth than this module's config
            raise CheckpointError(
                f"CLIP visual weights do not fit {self.config}: module keys missing from the checkpoint: "
                f"{_preview(missing)}; checkpoint keys the module lacks: {_preview(unexpected)}")
        wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in converted.items() if v.shape != own[k].shape]
        if wrong:
            raise CheckpointError(f"CLIP visual weights do not fit {self.config}: " + "; ".join(wrong[:8])
                                  + (f" ... (+{len(wrong) - 8} more)" if len(wrong) > 8 else ""))
        self.load_state_dict(converted, strict=True, assign=assign)
        return self

    @classmethod
    def from_openai(cls, sd: Mapping[str, torch.Tensor], prefix: str | None = None, *,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ClipVision":
        """Build with the config inferred from `sd` and load it. The module is created on the meta
        device and takes the checkpoint's tensors (no random init of 300M parameters, no copy):
        parameters share memory with `sd` unless `device`/`dtype` ask for a conversion."""
        config = ClipVisionConfig.from_state_dict(sd, prefix)
        with torch.device("meta"):
            model = cls(config)
        model.load_openai(sd, prefix, assign=True)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model


# -- preprocessing --------------------------------------------------------------------------------


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipVisionConfig",
    "ClipVision",
    "convert_openai_visual",
    "to_openai_visual",
    "clip_transform",
    "load_images",
]
