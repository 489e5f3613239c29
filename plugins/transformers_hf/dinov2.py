"""DINOv2 with registers (`Dinov2WithRegistersModel`, `...ForImageClassification`, `...Backbone`).

    embeddings: [cls, reg x R, patches]     position_embeddings: (1, 1 + patches, D), no register rows

`num_register_tokens` is the register count: `embeddings.register_tokens` (1, R, D), the config's
`num_register_tokens` (the classifier and the Backbone read it to skip the prefix tokens) and the
Backbone's own copy. The registers have no positional rows. The class token is fixed: the pooler,
the classifier and the positional table's first row all belong to it, and transformers has no
DINOv2 without one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from surgery.site import TokenSite, TokenTensor

from .common import (
    build,
    config_counters,
    fixed_count,
    fixed_site,
    images,
    module_counters,
    tensors_of,
)

BACKBONE = "hf_dinov2_registers"
CLASS_NOTE = ("transformers' DINOv2 always has one class token: the pooler and classifier read position 0 and "
              "position_embeddings holds its row; there is no config without it")


def classes() -> tuple[type, ...]:
    from transformers import (
        Dinov2WithRegistersBackbone,
        Dinov2WithRegistersForImageClassification,
        Dinov2WithRegistersModel,
    )

    return Dinov2WithRegistersModel, Dinov2WithRegistersForImageClassification, Dinov2WithRegistersBackbone


def _embeddings(model: nn.Module) -> nn.Module:
    base = getattr(model, "dinov2_with_registers", model)
    return base.embeddings


def sites(model: nn.Module) -> list[TokenSite]:
    emb = _embeddings(model)
    registers = emb.register_tokens.shape[1]
    return [
        fixed_site("class_token", 1, [TokenTensor(emb, "cls_token", axis=1),
                                      TokenTensor(emb, "position_embeddings", axis=1, start=0, coupled=True)],
                   CLASS_NOTE, "the class token (and its row of position_embeddings)"),
        TokenSite(
            name="num_register_tokens",
            count=registers,
            tensors=[TokenTensor(emb, "register_tokens", axis=1)],
            counters=[*config_counters(model, "num_register_tokens"), *module_counters(model, "num_register_tokens")],
            min=0, max=None, default_init="normal",
            description="register tokens after the class token (no positional rows); config.num_register_tokens",
        ),
    ]


# -- tiny models ------------------------------------------------------------------------------------

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16,
            patch_size=8, num_labels=3)


def tiny_config(num_register_tokens: int = 2, **kwargs: Any) -> Any:
    from transformers import Dinov2WithRegistersConfig

    return Dinov2WithRegistersConfig(**{**TINY, **kwargs}, num_register_tokens=num_register_tokens)


def tiny(num_register_tokens: int = 2, class_token: int = 1, **kwargs: Any) -> nn.Module:
    """A tiny Dinov2WithRegistersForImageClassification (random weights); `class_token` is fixed at 1."""
    fixed_count("class_token", class_token, 1, CLASS_NOTE)
    return build(classes()[1], tiny_config(num_register_tokens, **kwargs))


def inputs(model: nn.Module) -> tuple:
    return (images(model, model.config.image_size, model.config.num_channels),)


def forward(model: nn.Module, pixel_values) -> tuple:
    """Logits and every layer's hidden states."""
    return tensors_of(model(pixel_values=pixel_values, output_hidden_states=True), ("logits", "hidden_states"))


MODELS = {"hf_dinov2_reg_tiny": (tiny, inputs, forward, "tiny DINOv2 with 2 registers, image classifier")}
