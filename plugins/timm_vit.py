"""Backbone plugin for timm Vision Transformers: the class token and the register tokens.

Works on real `timm` models of the ViT family that share its prefix-token layout:
`VisionTransformer` (and subclasses that keep its `_pos_embed`) and `Eva`. The prefix tokens
are `[cls_token?, reg_token x R]`, followed by the patch tokens. Two layouts of `pos_embed`:

* default: `pos_embed` has a row for every prefix token, in the same order, before the patch
  rows; those rows are coupled to the tokens and resized with them;
* `no_embed_class=True` (DINOv2-style, and every register model timm ships): `pos_embed` covers
  the patches only and is never touched.

Counters timm reads, all kept in step: `num_prefix_tokens` on the model *and on every submodule
that holds one* (PatchDropout, Eva's attention layers skip RoPE for prefix tokens),
`num_reg_tokens`, `has_class_token`, and the reconstruction arguments timm records in
`model._model_args` (so a model re-created from them has the same counts).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from surgery import hookimpl
from surgery.site import Counter, TokenSite, TokenTensor

from .timm_metrics import surgery_register_metrics  # noqa: F401 - this backbone's sweep metrics (a hook)

BACKBONE = "timm_vit"


def _families() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva


def is_timm_vit(model: nn.Module) -> bool:
    """A timm ViT whose prefix tokens are exactly [cls?, reg...] (subclasses adding their own
    prefix tokens, like DeiT's distillation token, override `_pos_embed` and are not matched)."""
    for family in _families():
        if isinstance(model, family):
            return type(model)._pos_embed is family._pos_embed
    return False


# -- sites ---------------------------------------------------------------------------------------


def _counts(model: nn.Module) -> tuple[int, int]:
    cls = 0 if model.cls_token is None else model.cls_token.shape[1]
    reg = 0 if model.reg_token is None else model.reg_token.shape[1]
    return cls, reg


def _template(model: nn.Module) -> torch.Tensor:
    """A zero-token stand-in for an absent cls_token / reg_token: (1, 0, D), the model's dtype."""
    like = model.patch_embed.proj.weight
    return torch.empty(1, 0, model.embed_dim, dtype=like.dtype, device=like.device)


def _prefix_counters(model: nn.Module, prefix: Callable[[int], int]) -> list[Counter]:
    """`num_prefix_tokens` wherever timm keeps a copy: the model, PatchDropout, Eva attention, ..."""
    return [Counter(m, "num_prefix_tokens", prefix) for m in model.modules()
            if type(getattr(m, "num_prefix_tokens", None)) is int]


def _model_args_counter(model: nn.Module, key: str, value: Callable[[int], Any]) -> list[Counter]:
    args = model.__dict__.get("_model_args")
    return [Counter(args, key, value)] if isinstance(args, dict) else []


def _coupled_pos_rows(model: nn.Module, start: int) -> list[TokenTensor]:
    if model.pos_embed is None or model.no_embed_class:
        return []
    return [TokenTensor(model, "pos_embed", axis=1, start=start, coupled=True)]


def class_token_site(model: nn.Module) -> TokenSite:
    cls, reg = _counts(model)
    extra = model.num_prefix_tokens - cls - reg  # prefix tokens no site owns (none in the matched families)
    pools_on_token = getattr(model, "global_pool", None) == "token" and getattr(model, "attn_pool", None) is None
    return TokenSite(
        name="class_token",
        count=cls,
        tensors=[TokenTensor(model, "cls_token", axis=1, template=_template(model)), *_coupled_pos_rows(model, 0)],
        counters=[
            *_prefix_counters(model, lambda n: n + reg + extra),
            *([Counter(model, "has_class_token", bool)] if hasattr(model, "has_class_token") else []),
            *_model_args_counter(model, "class_token", bool),
        ],
        min=1 if pools_on_token else 0,
        max=1,
        default_init="normal",
        note="global_pool='token' reads the class token; reset_classifier(global_pool='avg') first"
        if pools_on_token else "",
        description="the class token (and its positional-embedding row when pos_embed covers prefix tokens)",
    )


def reg_tokens_site(model: nn.Module) -> TokenSite:
    cls, reg = _counts(model)
    extra = model.num_prefix_tokens - cls - reg
    eva = type(model).__name__ == "Eva"
    counters = [*_prefix_counters(model, lambda n: cls + n + extra),
                *_model_args_counter(model, "num_reg_tokens" if eva else "reg_tokens", int)]
    if hasattr(model, "num_reg_tokens"):
        counters.append(Counter(model, "num_reg_tokens"))
    return TokenSite(
        name="reg_tokens",
        count=reg,
        tensors=[TokenTensor(model, "reg_token", axis=1, template=_template(model)), *_coupled_pos_rows(model, cls)],
        counters=counters,
        min=0,
        max=None,
        default_init="normal",
        description="register tokens after the class token (and their positional-embedding rows, if any)",
    )


# -- hooks ---------------------------------------------------------------------------------------


@hookimpl
def surgery_register_backbones(register):
    register(BACKBONE, is_timm_vit, description="timm VisionTransformer / Eva: class token and register tokens")


@hookimpl
def surgery_token_sites(model, backbone):
    if backbone != BACKBONE:
        return None
    return [class_token_site(model), reg_tokens_site(model)]


def _images(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor]:
    size = model.patch_embed.img_size
    like = model.patch_embed.proj.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.patch_embed.proj.in_channels, *size, generator=gen)
    return (x.to(device=like.device, dtype=like.dtype),)


def _create(name: str, **defaults: Any) -> Callable[..., nn.Module]:
    def factory(**kwargs: Any) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **{**defaults, **kwargs}).eval()
    return factory


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
MODELS = {
    # tiny configs for tests and the demo (random weights, milliseconds per forward)
    "vit_tiny_test": ("vit_tiny_patch16_224", dict(TINY), "tiny ViT, class token, pos_embed covers prefix rows"),
    "vit_tiny_reg_test": ("vit_tiny_patch16_224", dict(TINY, reg_tokens=2, no_embed_class=True, global_pool="avg"),
                          "tiny ViT with 2 registers, no_embed_class (DINOv2 layout)"),
    "vit_tiny_avg_test": ("vit_tiny_patch16_224", dict(TINY, global_pool="avg"),
                          "tiny ViT with average pooling (the class token can be removed)"),
    "eva_tiny_test": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=14, embed_dim=32, depth=2,
                                                    num_heads=2, num_classes=10),
                      "tiny EVA-02 (RoPE skips the prefix tokens)"),
    # released architectures (random weights: nothing is downloaded)
    "vit_base_patch16_224": ("vit_base_patch16_224", {}, "ViT-B/16 at 224"),
    "vit_small_patch14_reg4_dinov2": ("vit_small_patch14_reg4_dinov2", {}, "DINOv2 ViT-S/14 with 4 registers"),
}


@hookimpl
def surgery_register_models(register):
    for name, (arch, defaults, description) in MODELS.items():
        register(name, _create(arch, **defaults), BACKBONE, description=description, example_inputs=_images)
