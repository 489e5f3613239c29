"""Backbone plugin for ImageBind-LLM: `query_layer`, plus every site of its ImageBind encoder.

`query_layer` is `prefix_query.weight`, one row per adapted layer for the *last* layers, so it is
anchored at the end: shrinking drops the earliest adapted layer. The encoder's sites and head modes
are the imagebind plugin's; this plugin only declares `image_bind` a sub-model (`surgery_submodels`).
The released 7B.pth was trained with one visual token: k > 1 is an experiment until trained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery import hookimpl
from surgery.site import Counter, TokenSite, TokenTensor

from .layouts import surgery_checkpoint_layout  # noqa: F401 - the released 7B.pth (a hook)

BACKBONE = "imagebind_llm"
ENCODER_PATH = "image_bind"  # where upstream keeps the ImageBind model (keys `image_bind.*`)
ENCODER_BACKBONE = "imagebind"


def is_imagebind_llm(model: nn.Module) -> bool:
    from .model import ImageBindLLM

    return isinstance(model, ImageBindLLM)


def query_layer_site(model: nn.Module) -> TokenSite:
    n_layers = len(model.llama.layers)
    return TokenSite(
        name="query_layer",
        count=model.query_layer,
        tensors=[TokenTensor(model.prefix_query, "weight", axis=0, anchor="end")],
        counters=[Counter(model, "query_layer"), Counter(model.prefix_query, "num_embeddings"),
                  Counter(model.config, "query_layer")],
        min=1,
        max=n_layers,
        default_init="normal",
        note=f"adapters go to the last query_layer of the {n_layers} layers",
        description="how many of the last LLaMA layers receive the visual tokens (prefix_query rows)",
    )


# -- hooks ---------------------------------------------------------------------------------------


@hookimpl
def surgery_register_backbones(register):
    register(BACKBONE, is_imagebind_llm,
             description="ImageBind-LLM (ImageBind embeddings, k CLS tokens -> k visual tokens, into LLaMA adapters)")


@hookimpl
def surgery_submodels(model, backbone):
    if backbone != BACKBONE:
        return None
    return [(ENCODER_PATH, ENCODER_BACKBONE)]  # its sites, events and options are the imagebind plugin's


@hookimpl
def surgery_token_sites(model, backbone):
    if backbone != BACKBONE:
        return None
    return [query_layer_site(model)]


@hookimpl
def surgery_before_resize(model, backbone, changes):
    if backbone == BACKBONE:
        model.drop_caches()  # KV-cache buffers kept between forward_inference calls


@hookimpl
def surgery_after_resize(model, backbone, changes):
    if backbone == BACKBONE:
        model.drop_caches()  # also after a rollback or the restore at the end of tokens(...)


def example_inputs(model: nn.Module, batch: int = 2) -> tuple[dict[str, list], torch.Tensor]:
    """Every modality of the encoder (weights 1, 1/2, 1/3, ...) and prompt tokens, seeded."""
    from surgery_plugins.imagebind.plugin import example_inputs as encoder_inputs

    (encoded,) = encoder_inputs(model.image_bind, batch)
    inputs = {modality: [x, 1.0 / (i + 1)] for i, (modality, x) in enumerate(encoded.items())}
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, model.config.vocab_size, (batch, 7), generator=gen)
    return inputs, tokens.to(model.prefix_query.weight.device)


def logits(model: nn.Module, inputs: dict[str, list], tokens: torch.Tensor) -> torch.Tensor:
    """The conformance kit's output: the last position's logits after a prefill, through the
    adapter keys/values path (the one generation uses)."""
    with torch.no_grad():
        visual = model.forward_visual(inputs)
        kv = model.llama.new_kv_caches(tokens.shape[0], model.prefix_query.weight.dtype, tokens.device)
        return model.forward_inference(visual, tokens, 0, adapter_kv=model.adapter_kv(visual), kv_caches=kv)


def _factory(size: str, default_device: str | None):
    def build(*, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              **overrides: Any) -> nn.Module:
        from surgery_plugins.llama_adapter.tokenizer import shipped_tokenizer

        from .config import ImageBindLLMConfig
        from .model import ImageBindLLM

        config = ImageBindLLMConfig.named(size, **overrides)
        # tiny and bench decode with the package's tokenizer (their vocab_size is its size)
        tokenizer = shipped_tokenizer() if size in ("tiny", "bench") else None
        # no device asked for: the size's own (meta for 7b), else the current default device, so
        # that `with torch.device("meta")` builds it without allocating
        with torch.device(device or default_device or torch.get_default_device()):
            model = ImageBindLLM(config, tokenizer)
        return (model.to(dtype) if dtype is not None else model).eval()
    return build


MODELS = {
    "imagebind_llm_tiny": ("tiny", None, "tiny random ImageBind-LLM for tests (dim 64, 4 layers, tiny ImageBind)"),
    "imagebind_llm_bench": ("bench", None, "scaled-down ImageBind-LLM for CPU benchmarks (dim 1024, 16 layers)"),
    "imagebind_llm_7b": ("7b", "meta", "the released ImageBind-LLM 7B architecture, on the meta device unless "
                                       "device=... is given (shapes only; load weights with load_official)"),
}


@hookimpl
def surgery_register_models(register):
    for name, (size, device, description) in MODELS.items():
        register(name, _factory(size, device), BACKBONE, description=description,
                 example_inputs=example_inputs, forward=logits,
                 # what a checkpoint's metadata may set: counts, the encoder's modalities, the form of 7B.pth
                 safe_kwargs=("num_cls_tokens", "query_layer", "modalities", "phase", "legacy_bridge", "lora_rank"))
