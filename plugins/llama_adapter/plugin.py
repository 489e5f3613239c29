"""Backbone plugin for LLaMA-Adapter V2 multimodal: `query_len` and `query_layer` as token sites.

Both are the axes of `adapter_query.weight` seen as (query_layer, query_len, dim) (`query_len` also
`visual_query.weight`'s rows), applied by the engine from the declarations alone. `query_layer` is
anchored at the end (adapters go to the last L layers, each with its gate already). The resize events
drop the per-image adapter keys/values and KV cache. On the released checkpoints other counts are an
experiment (docs/llama_adapter.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery import hookimpl
from surgery.site import Counter, TokenSite, TokenTensor, tensor_key

from .metrics import surgery_register_metrics  # noqa: F401 - the caption metric (a hook; ImageBind-LLM's too)
from .layouts import surgery_checkpoint_layout  # noqa: F401 - the released adapter checkpoints (a hook)

BACKBONE = "llama_adapter_v2"


def is_llama_adapter(model: nn.Module) -> bool:
    from .model import LLaMAAdapter

    return isinstance(model, LLaMAAdapter)


def _config_counter(model: nn.Module, field: str, value=None) -> list[Counter]:
    config = getattr(model, "config", None)
    return [Counter(config, field, value)] if config is not None and hasattr(config, field) else []


def query_len_site(model: nn.Module) -> TokenSite:
    L, Q = model.query_layer, model.query_len
    D = model.adapter_query.weight.shape[-1]

    def count_in_state_dict(state_dict, paths) -> int | None:
        rows = state_dict.get(tensor_key(paths, model.visual_query, "weight"))
        return None if rows is None else int(rows.shape[0])

    return TokenSite(
        name="query_len",
        count=Q,
        tensors=[
            TokenTensor(model.visual_query, "weight", axis=0),
            TokenTensor(model.adapter_query, "weight", axis=1, view=(L, Q, D)),
        ],
        counters=[
            Counter(model, "query_len"),
            Counter(model.visual_query, "num_embeddings"),
            Counter(model.adapter_query, "num_embeddings", lambda q: L * q),
            *_config_counter(model, "query_len"),
        ],
        min=1,
        default_init="normal",
        count_in_state_dict=count_in_state_dict,
        description="learned visual queries (visual_query rows, the Q axis of adapter_query seen as (L, Q, dim))",
    )


def query_layer_site(model: nn.Module) -> TokenSite:
    L, Q = model.query_layer, model.query_len
    D = model.adapter_query.weight.shape[-1]
    n_layers = len(model.llama.layers)

    def count_in_state_dict(state_dict, paths) -> int | None:
        queries = state_dict.get(tensor_key(paths, model.visual_query, "weight"))
        table = state_dict.get(tensor_key(paths, model.adapter_query, "weight"))
        if queries is None or table is None or queries.shape[0] == 0 or table.shape[0] % queries.shape[0]:
            return None
        return int(table.shape[0] // queries.shape[0])

    return TokenSite(
        name="query_layer",
        count=L,
        tensors=[TokenTensor(model.adapter_query, "weight", axis=0, view=(L, Q, D), anchor="end")],
        counters=[
            Counter(model, "query_layer"),
            Counter(model.adapter_query, "num_embeddings", lambda n: n * Q),
            *_config_counter(model, "query_layer"),
        ],
        min=1,
        max=n_layers,
        default_init="normal",
        note=f"adapters go to the last query_layer of the {n_layers} layers",
        count_in_state_dict=count_in_state_dict,
        description="how many of the last LLaMA layers receive adapter tokens (the L axis of adapter_query)",
    )


# -- hooks ---------------------------------------------------------------------------------------


@hookimpl
def surgery_register_backbones(register):
    register(BACKBONE, is_llama_adapter,
             description="LLaMA-Adapter V2 multimodal (CLIP visual queries + per-layer adapters)")


@hookimpl
def surgery_token_sites(model, backbone):
    if backbone != BACKBONE:
        return None
    return [query_len_site(model), query_layer_site(model)]


@hookimpl
def surgery_before_resize(model, backbone, changes):
    if backbone == BACKBONE:
        model.drop_caches()  # adapter K/V and KV-cache buffers are sized for the old counts


@hookimpl
def surgery_after_resize(model, backbone, changes):
    if backbone == BACKBONE:
        model.drop_caches()  # also after a rollback or the restore at the end of tokens(...)


def _images(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) for a training-style forward: the conformance kit compares its loss/logits."""
    size = model.config.clip.image_size
    like = model.visual_query.weight
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device=like.device, dtype=like.dtype)
    tokens = torch.randint(3, model.config.vocab_size, (batch, 7), generator=gen).to(like.device)
    return images, tokens


def _logits(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        visual = model.forward_visual(images)
        return model.forward_inference(visual, tokens, 0)


def _factory(*, shipped_tokenizer: bool = False, **defaults: Any):
    def build(**kwargs: Any) -> nn.Module:
        from .model import AdapterConfig, LLaMAAdapter
        from .tokenizer import shipped_tokenizer as tokenizer

        # no device asked for: the size's own (meta for 7b), else the current default device, so that
        # `with torch.device("meta")` builds it without allocating (how its size is counted)
        device = kwargs.pop("device", defaults.get("device") or torch.get_default_device())
        options = {k: v for k, v in {**defaults, **kwargs}.items() if k != "device"}
        with torch.device(device):
            return LLaMAAdapter(AdapterConfig.named(**options), tokenizer() if shipped_tokenizer else None).eval()
    return build


MODELS = {  # tiny and bench decode with the package's tokenizer (their vocab_size is its size)
    "llama_adapter_v2_tiny": (dict(size="tiny", shipped_tokenizer=True),
                              "tiny random LLaMA-Adapter V2 for tests (dim 64, 4 layers)"),
    "llama_adapter_v2_bench": (dict(size="bench", shipped_tokenizer=True),
                               "scaled-down config for CPU benchmarks (dim 1024, 16 layers)"),
    "llama_adapter_v2_7b": (dict(size="7b", device="meta"),
                            "the released 7B architecture, on the meta device (shapes only; load weights with "
                            "load_official)"),
}


@hookimpl
def surgery_register_models(register):
    for name, (defaults, description) in MODELS.items():
        register(name, _factory(**defaults), BACKBONE, description=description,
                 example_inputs=_images, forward=_logits,
                 # the counts, and which released adapter (BIAS, LORA-BIAS): what an adapter file's keys say
                 safe_kwargs=("query_len", "query_layer", "w_bias", "w_lora", "lora_rank", "w_new_gate"))
