"""ViT and DeiT: the class token, and DeiT's distillation token (declared, fixed).

    ViT:  [cls, patches]          position_embeddings (1, 1 + patches, D)
    DeiT: [cls, dist, patches]    position_embeddings (1, 2 + patches, D)

transformers builds exactly these prefix tokens, always: no ViTConfig or DeiTConfig field makes a
model without the class token or with more of them, the pooler and the heads read positions 0
(and 1), and the positional interpolation assumes them. A resized model would be one no
`from_pretrained` can open. So the sites are declared with their positional rows (`surgery
inspect` shows them) and every change is refused with the reason; for a ViT whose class and
register tokens can change, use timm's (the `timm_vit` plugin).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from surgery.site import TokenSite, TokenTensor

from .common import build, fixed_count, fixed_site, images

BACKBONE = "hf_vit"
CLASS_NOTE = ("transformers' {family} always has exactly one class token (its pooler and head read position 0, "
              "position_embeddings holds its row) and no config without it; timm's ViT (plugin timm_vit) can "
              "change its class and register tokens")
DIST_NOTE = ("transformers' DeiT always has exactly one distillation token: the distillation head reads position 1 "
             "and position_embeddings holds its row; there is no config without it")


def classes() -> tuple[type, ...]:
    import transformers as hf

    return (hf.ViTModel, hf.ViTForImageClassification, hf.ViTForMaskedImageModeling, hf.DeiTModel,
            hf.DeiTForImageClassification, hf.DeiTForImageClassificationWithTeacher, hf.DeiTForMaskedImageModeling)


def _embeddings(model: nn.Module) -> nn.Module:
    base = getattr(model, "deit", None) or getattr(model, "vit", None) or model
    return base.embeddings


def sites(model: nn.Module) -> list[TokenSite]:
    emb = _embeddings(model)
    deit = hasattr(emb, "distillation_token")
    found = [fixed_site("class_token", 1, [TokenTensor(emb, "cls_token", axis=1),
                                           TokenTensor(emb, "position_embeddings", axis=1, start=0, coupled=True)],
                        CLASS_NOTE.format(family="DeiT" if deit else "ViT"),
                        "the class token (and its row of position_embeddings)")]
    if deit:
        found.append(fixed_site("distillation_token", 1,
                                [TokenTensor(emb, "distillation_token", axis=1),
                                 TokenTensor(emb, "position_embeddings", axis=1, start=1, coupled=True)],
                                DIST_NOTE, "DeiT's distillation token (and its row of position_embeddings)"))
    return found


# -- tiny models ------------------------------------------------------------------------------------

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
            patch_size=8, num_labels=3)


def tiny_vit(class_token: int = 1, **kwargs: Any) -> nn.Module:
    """A tiny ViTForImageClassification (random weights); its class token is fixed."""
    import transformers as hf

    fixed_count("class_token", class_token, 1, CLASS_NOTE.format(family="ViT"))
    return build(hf.ViTForImageClassification, hf.ViTConfig(**{**TINY, **kwargs}))


def tiny_deit(class_token: int = 1, distillation_token: int = 1, **kwargs: Any) -> nn.Module:
    """A tiny DeiTForImageClassificationWithTeacher (random weights); both prefix tokens are fixed."""
    import transformers as hf

    fixed_count("class_token", class_token, 1, CLASS_NOTE.format(family="DeiT"))
    fixed_count("distillation_token", distillation_token, 1, DIST_NOTE)
    return build(hf.DeiTForImageClassificationWithTeacher, hf.DeiTConfig(**{**TINY, **kwargs}))


def inputs(model: nn.Module) -> tuple:
    return (images(model, model.config.image_size, model.config.num_channels),)


def forward(model: nn.Module, pixel_values) -> Any:
    return model(pixel_values=pixel_values).logits


MODELS = {
    "hf_vit_tiny": (tiny_vit, inputs, forward, "tiny ViT image classifier (class token fixed)"),
    "hf_deit_tiny": (tiny_deit, inputs, forward, "tiny DeiT with a distillation head (both tokens fixed)"),
}
