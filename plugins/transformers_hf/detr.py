"""DETR and Conditional DETR: the decoder's object queries (`num_queries`).

    query_position_embeddings: nn.Embedding(N, d_model)  -> N decoder slots -> N (class, box) predictions

`num_queries` is the embedding's rows, its `num_embeddings`, and `config.num_queries` (the
segmentation head reads it to shape its masks). Each query is a learned slot the Hungarian
matching trained to specialise (by region and size): fewer queries keep those slots and predict at
most that many objects; new ones start from the init strategy and predict nothing useful until
trained (docs/transformers.md).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from surgery.site import TokenSite

from .common import build, config_counters, embedding_rows, images, tensors_of

BACKBONE = "hf_detr"
MIN_NOTE = "every prediction comes from a query: with none the model detects nothing"


def classes() -> tuple[type, ...]:
    import transformers as hf

    return (hf.DetrModel, hf.DetrForObjectDetection, hf.DetrForSegmentation, hf.ConditionalDetrModel,
            hf.ConditionalDetrForObjectDetection, hf.ConditionalDetrForSegmentation)


def _queries(model: nn.Module) -> nn.Embedding:
    for name, module in model.named_modules():
        if name.endswith("query_position_embeddings") and isinstance(module, nn.Embedding):
            return module
    raise AttributeError(f"{type(model).__name__} has no query_position_embeddings")


def sites(model: nn.Module) -> list[TokenSite]:
    queries = _queries(model)
    rows, num_embeddings = embedding_rows(queries)
    return [TokenSite(
        name="num_queries",
        count=queries.num_embeddings,
        tensors=[rows],
        counters=[num_embeddings, *config_counters(model, "num_queries")],
        min=1, max=None, default_init="normal", note=MIN_NOTE,
        description="the decoder's object queries (query_position_embeddings rows); config.num_queries",
    )]


# -- tiny models ------------------------------------------------------------------------------------

TINY = dict(d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=3, use_timm_backbone=False,
            use_pretrained_backbone=False)
IMAGE_SIZE = 32


def tiny_config(num_queries: int = 5, conditional: bool = False) -> Any:
    """A tiny DETR config with a tiny ResNet backbone (built by transformers, nothing downloaded)."""
    import transformers as hf

    backbone = hf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8, 8, 16], depths=[1, 1, 1, 1],
                               out_features=["stage4"])
    config_cls = hf.ConditionalDetrConfig if conditional else hf.DetrConfig
    return config_cls(**TINY, num_queries=num_queries, backbone_config=backbone)


def tiny(num_queries: int = 5) -> nn.Module:
    """A tiny DetrForObjectDetection (random weights)."""
    import transformers as hf

    return build(hf.DetrForObjectDetection, tiny_config(num_queries))


def inputs(model: nn.Module) -> tuple:
    return (images(model, IMAGE_SIZE, model.config.backbone_config.num_channels),)


def forward(model: nn.Module, pixel_values) -> tuple:
    """Class logits, boxes and the decoder's last hidden state (one row per query)."""
    return tensors_of(model(pixel_values=pixel_values), ("logits", "pred_boxes", "last_hidden_state"))


MODELS = {"hf_detr_tiny": (tiny, inputs, forward, "tiny DETR object detector (ResNet backbone), 5 queries")}
