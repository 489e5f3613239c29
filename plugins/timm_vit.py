"""Backbone plugin for timm Vision Transformers: class, register and distillation tokens.

Works on real `timm` models whose prefix tokens sit before the patch tokens:

| family | tokens | what can change |
|---|---|---|
| `VisionTransformer` (and subclasses that keep its `_pos_embed`), `Eva` | `[cls?, reg x R]` | both |
| `NaFlexVit` (tokens in `model.embeds`, positions cover patches only) | `[cls?, reg x R]` | both |
| `VisionTransformerRelPos` (relative positions, `RelPosMlp`) | `[cls?]` | the class token |
| `VisionTransformerDistilled` (DeiT) | `[cls, dist]` | nothing: timm builds exactly one of each |
| `Beit` | `[cls]` | nothing: timm has no Beit without its class token |

What cannot change is still declared (`surgery inspect` shows it), with a constraint whose note
says why and what to do instead. A model inside a wrapper (`torch.compile`, `DataParallel` /
`DistributedDataParallel`, timm's `features_only`) is recognised and refused with the way to
reach the model itself. Two layouts of a ViT's `pos_embed`:

* default: `pos_embed` has a row for every prefix token, in the same order, before the patch
  rows; those rows are coupled to the tokens and resized with them;
* `no_embed_class=True` (DINOv2-style, and every register model timm ships): `pos_embed` covers
  the patches only and is never touched.

Counters timm reads, all kept in step: `num_prefix_tokens` on the model *and on every submodule
that holds one* (PatchDropout, Eva's attention layers skip RoPE for prefix tokens, NaFlexVit's
embeddings), `num_reg_tokens`, `has_class_token`, Eva's `cls_embed`, the `RelPosMlp` tables'
`prefix_tokens`, the PRR attention pool's `pool` (`'token'` with a class token, `'avg'` without:
what timm builds), and the reconstruction arguments timm records in `model._model_args` (so a
model re-created from them has the same counts).

Models by name: the registered ones below (tiny test configs, two released architectures), and
any timm model of these families by its timm name, `timm/<name>` or plain, resolved through
`surgery_resolve_model` (`timm_names`): built with random weights, its released weights read
only from the Hugging Face cache already on the machine.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from surgery import hookimpl
from surgery.errors import PLUGIN_FAILURES, BackboneError, ModelConfigError, describe_error
from surgery.site import Counter, TokenSite, TokenTensor

from .timm_metrics import surgery_register_metrics  # noqa: F401 - this backbone's sweep metrics (a hook)
from .timm_names import hub_weights, timm_arch

BACKBONE = "timm_vit"


# -- which models -------------------------------------------------------------------------------


def _family(model: nn.Module) -> str | None:
    """Which of the families above `model` is ("vit", "eva", "naflex", "relpos", "distilled",
    "beit"), None for anything else. Subclasses that place their prefix tokens themselves are left
    to other plugins, except the ViT subclasses keeping `VisionTransformer._pos_embed`."""
    from timm.models.beit import Beit
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.eva import Eva
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    kind = type(model)
    if kind is VisionTransformerDistilled:
        return "distilled"
    if isinstance(model, VisionTransformer) and kind._pos_embed is VisionTransformer._pos_embed:
        return "vit"
    if isinstance(model, Eva) and kind._pos_embed is Eva._pos_embed:
        return "eva"
    exact = {NaFlexVit: "naflex", VisionTransformerRelPos: "relpos", Beit: "beit"}
    return exact.get(kind)


# Wrappers that hold the model itself, by type name (importing torch._dynamo to check would cost
# every detect a second): the attribute holding it, what to do once it is resized.
WRAPPERS = {
    "OptimizedModule": ("_orig_mod", "a torch.compile'd model", "compile it again after resizing"),
    "DataParallel": ("module", "a DataParallel model", "wrap it again after resizing (it replicates the old shapes)"),
    "DistributedDataParallel": ("module", "a DistributedDataParallel model",
                                "wrap it again after resizing (its gradient buckets hold the old shapes)"),
    "FeatureGetterNet": ("model", "a features_only model (timm's FeatureGetterNet)",
                         "its features follow (it calls model.forward_intermediates)"),
}


def _wrapped(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(the timm ViT inside, what to tell the user) for a wrapper around a model of a family above."""
    known = WRAPPERS.get(type(model).__name__)
    if known is None:
        return None
    attr, what, then = known
    inner = model._modules.get(attr)
    if inner is None or _family(inner) is None:
        return None
    return inner, (f"{what} wraps a timm {type(inner).__name__}: pass the model itself, model.{attr}, which "
                   f"shares the wrapper's parameters, and resize that; {then}")


def is_timm_vit(model: nn.Module) -> bool:
    """A timm model of the families above, or one wrapped (refused with a hint by the sites hook)."""
    return _family(model) is not None or _wrapped(model) is not None


# -- shared pieces of a declaration ---------------------------------------------------------------


def _like(model: nn.Module) -> torch.Tensor:
    """A tensor with the dtype and device of the model's token embeddings (not the patch
    projection: MobileCLIP's and ViTamin's hybrid stems have none, `proj` is Identity)."""
    for name in ("cls_token", "reg_token", "pos_embed"):
        tensor = getattr(model, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor
    return next(model.parameters())


def _template(model: nn.Module) -> torch.Tensor:
    """A zero-token stand-in for an absent cls_token / reg_token: (1, 0, D), the model's dtype."""
    like = _like(model)
    return torch.empty(1, 0, model.embed_dim, dtype=like.dtype, device=like.device)


def _counts(holder: nn.Module) -> tuple[int, int]:
    cls, reg = getattr(holder, "cls_token", None), getattr(holder, "reg_token", None)
    return 0 if cls is None else cls.shape[1], 0 if reg is None else reg.shape[1]


def _prefix_counters(model: nn.Module, prefix: Callable[[int], int]) -> list[Counter]:
    """`num_prefix_tokens` wherever timm keeps a copy: the model, PatchDropout, Eva attention, ..."""
    return [Counter(m, "num_prefix_tokens", prefix) for m in model.modules()
            if type(getattr(m, "num_prefix_tokens", None)) is int]


def _attr_counters(model: nn.Module, attr: str, value: Callable[[int], Any] | None = None,
                   holders: tuple[nn.Module, ...] = ()) -> list[Counter]:
    """`attr` on the model (and `holders`) where it is there."""
    return [Counter(m, attr, value) for m in (model, *holders) if hasattr(m, attr)]


def _model_args_counter(model: nn.Module, key: str, value: Callable[[int], Any]) -> list[Counter]:
    args = model.__dict__.get("_model_args")
    return [Counter(args, key, value)] if isinstance(args, dict) else []


def _coupled_pos_rows(model: nn.Module, start: int) -> list[TokenTensor]:
    if getattr(model, "pos_embed", None) is None or getattr(model, "no_embed_class", False):
        return []
    return [TokenTensor(model, "pos_embed", axis=1, start=start, coupled=True)]


def _fixed(name: str, count: int, tensors: list[TokenTensor], note: str, description: str) -> TokenSite:
    """A site timm cannot build at another count: declared (shown), every change refused with `note`."""
    return TokenSite(name=name, count=count, tensors=tensors, min=count, max=count, note=note,
                     description=description)


# -- the class token ------------------------------------------------------------------------------

CLS_DESCRIPTION = "the class token (and its positional-embedding row when pos_embed covers prefix tokens)"


def _head_rule(model: nn.Module, cls: int) -> tuple[int, int, str, list[Counter]]:
    """(min, max, note, counters) the head puts on the class token. Token pooling reads it; the PRR
    attention pool reads it when there is one and averages otherwise, as timm builds it (a counter
    on its `pool`); an attention pool this plugin does not know may read it: it stays as it is."""
    from timm.layers import AttentionPoolLatent
    from timm.layers.attention_pool import AttentionPoolPrr

    pool = getattr(model, "attn_pool", None)
    if pool is None and getattr(model, "global_pool", None) == "token":
        return 1, 1, "global_pool='token' reads the class token; reset_classifier(global_pool='avg') first", []
    if isinstance(pool, AttentionPoolPrr):
        return 0, 1, "", [Counter(pool, "pool", lambda n: "token" if n else "avg")]
    if pool is None or isinstance(pool, AttentionPoolLatent):
        return 0, 1, "", []
    return cls, cls, (f"the head's attention pool ({type(pool).__name__}) is not one this plugin knows, so it "
                      f"may read the class token; reset_classifier(global_pool='avg') first"), []


def class_token_site(model: nn.Module, holder: nn.Module | None = None) -> TokenSite:
    """ViT, Eva, NaFlexVit (tokens in `holder`, the embeddings module)."""
    holder = model if holder is None else holder
    cls, reg = _counts(holder)
    extra = model.num_prefix_tokens - cls - reg  # prefix tokens no site owns (none in these families)
    low, high, note, pool_counters = _head_rule(model, cls)
    return TokenSite(
        name="class_token",
        count=cls,
        tensors=[TokenTensor(holder, "cls_token", axis=1, template=_template(model)), *_coupled_pos_rows(model, 0)],
        counters=[
            *_prefix_counters(model, lambda n: n + reg + extra),
            *_attr_counters(model, "has_class_token", bool, (holder,) if holder is not model else ()),
            *_attr_counters(model, "cls_embed", lambda n: bool(n) and reg == 0),  # Eva: class token, no registers
            *pool_counters,
            *_model_args_counter(model, "class_token", bool),
        ],
        min=low, max=high, default_init="normal", note=note, description=CLS_DESCRIPTION,
    )


def reg_tokens_site(model: nn.Module, holder: nn.Module | None = None) -> TokenSite:
    holder = model if holder is None else holder
    cls, reg = _counts(holder)
    extra = model.num_prefix_tokens - cls - reg
    eva = type(model).__name__ == "Eva"
    return TokenSite(
        name="reg_tokens",
        count=reg,
        tensors=[TokenTensor(holder, "reg_token", axis=1, template=_template(model)), *_coupled_pos_rows(model, cls)],
        counters=[
            *_prefix_counters(model, lambda n: cls + n + extra),
            *_attr_counters(model, "num_reg_tokens", None, (holder,) if holder is not model else ()),
            *_attr_counters(model, "cls_embed", lambda n: cls > 0 and n == 0),
            *_model_args_counter(model, "num_reg_tokens" if eva else "reg_tokens", int),
        ],
        min=0, max=None, default_init="normal",
        description="register tokens after the class token (and their positional-embedding rows, if any)",
    )


def relpos_class_token_site(model: nn.Module) -> TokenSite:
    """VisionTransformerRelPos: a `RelPosMlp` pads its bias for `prefix_tokens` (a counter); a
    `RelPosBias` table has learned rows for the class token, which timm makes only at build time."""
    from timm.layers.pos_embed_rel import RelPosMlp

    cls, _ = _counts(model)
    tables = [m for m in model.modules() if type(getattr(m, "prefix_tokens", None)) is int]
    learned = [type(m).__name__ for m in tables if not isinstance(m, RelPosMlp)]
    if learned:
        return _fixed("class_token", cls, [TokenTensor(model, "cls_token", axis=1, template=_template(model))],
                      f"its relative-position tables ({learned[0]}) hold learned rows for the class token, which "
                      f"timm creates only when it builds the model: build it with class_token=... instead",
                      CLS_DESCRIPTION)
    low, high, note, _ = _head_rule(model, cls)
    return TokenSite(
        name="class_token",
        count=cls,
        tensors=[TokenTensor(model, "cls_token", axis=1, template=_template(model))],
        counters=[*_prefix_counters(model, lambda n: n), *[Counter(m, "prefix_tokens") for m in tables],
                  *_model_args_counter(model, "class_token", bool)],
        min=low, max=high, default_init="normal", note=note, description=CLS_DESCRIPTION,
    )


DISTILLED_NOTE = ("timm's VisionTransformerDistilled (DeiT) always has one class and one distillation token: its "
                  "heads read positions 0 and 1; for a model without them, build the non-distilled DeiT "
                  "(deit_*_patch16_224) and load these weights without dist_token and head_dist")
BEIT_NOTE = ("timm's Beit always has exactly one class token (its relative-position tables hold learned rows for "
             "it) and cannot be built without it")


def distilled_sites(model: nn.Module) -> list[TokenSite]:
    return [
        _fixed("class_token", 1, [TokenTensor(model, "cls_token", axis=1), *_coupled_pos_rows(model, 0)],
               DISTILLED_NOTE, CLS_DESCRIPTION),
        _fixed("dist_token", 1, [TokenTensor(model, "dist_token", axis=1), *_coupled_pos_rows(model, 1)],
               DISTILLED_NOTE, "the distillation token, read by head_dist (and its positional-embedding row)"),
    ]


def beit_sites(model: nn.Module) -> list[TokenSite]:
    return [_fixed("class_token", 1, [TokenTensor(model, "cls_token", axis=1), *_coupled_pos_rows(model, 0)],
                   BEIT_NOTE, CLS_DESCRIPTION)]


# -- hooks ---------------------------------------------------------------------------------------


@hookimpl
def surgery_register_backbones(register):
    register(BACKBONE, is_timm_vit, description="timm VisionTransformer / Eva / NaFlexVit / RelPos / DeiT "
                                                "distilled / Beit: class, register and distillation tokens")


@hookimpl
def surgery_token_sites(model, backbone):
    if backbone != BACKBONE:
        return None
    family = _family(model)
    if family in ("vit", "eva"):
        return [class_token_site(model), reg_tokens_site(model)]
    if family == "naflex":
        return [class_token_site(model, model.embeds), reg_tokens_site(model, model.embeds)]
    if family == "relpos":
        return [relpos_class_token_site(model)]
    if family == "distilled":
        return distilled_sites(model)
    if family == "beit":
        return beit_sites(model)
    _, hint = _wrapped(model)
    raise BackboneError(hint)


def _images(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor]:
    size = model.patch_embed.img_size
    like = _like(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_chans, *size, generator=gen)
    return (x.to(device=like.device, dtype=like.dtype),)


# timm keywords that download or open a file (`checkpoint_path` is unpickled by some timm versions
# with weights_only=False): never passed on, so no timm version can open a file through us
FILE_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
COUNT_KWARGS = ("class_token", "reg_tokens")  # what a checkpoint's metadata may set (`safe_kwargs`)


def _create(name: str, **defaults: Any) -> Callable[..., nn.Module]:
    """A factory taking timm's keywords, and the counts by site name (`class_token=0, reg_tokens=4`)."""
    def factory(**kwargs: Any) -> nn.Module:
        import timm

        opening = [k for k in FILE_KWARGS if k in kwargs]
        if opening:
            raise ModelConfigError(f"timm model {name!r}: {', '.join(opening)} would make timm download or open "
                                   f"a file; models are built with random weights: load weights with surgery.load")
        return timm.create_model(name, pretrained=False, **_timm_kwargs(name, {**defaults, **kwargs})).eval()
    return factory


def _timm_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Counts as timm spells them: `class_token` is a bool, and Eva calls its registers `num_reg_tokens`."""
    import timm.models

    if "class_token" in kwargs:
        kwargs["class_token"] = bool(kwargs["class_token"])
    if "reg_tokens" in kwargs and timm.models.model_entrypoint(name).__module__ == "timm.models.eva":
        kwargs["num_reg_tokens"] = kwargs.pop("reg_tokens")
    return kwargs


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
        # released weights fit only a model of timm's own configuration (not the tiny ones)
        register(name, _create(arch, **defaults), BACKBONE, description=description, example_inputs=_images,
                 safe_kwargs=COUNT_KWARGS, released_weights=None if defaults else partial(hub_weights, arch))


FAMILIES = ("VisionTransformer (and subclasses keeping its _pos_embed), Eva, NaFlexVit, VisionTransformerRelPos, "
            "VisionTransformerDistilled, Beit")


@hookimpl
def surgery_resolve_model(name, register):
    """Any timm model of the families above by its timm name (`timm/<name>` or plain, `.tag` optional),
    built with random weights; its released weights from the Hugging Face cache (`timm_names`)."""
    arch = timm_arch(name)  # None: not a timm name; timm/<unknown>: a BackboneError
    if arch is None:
        return
    factory = _create(arch)
    try:
        with torch.device("meta"):  # which class timm builds, without allocating
            kind = factory()
    except PLUGIN_FAILURES as exc:
        raise ModelConfigError(f"timm model {arch!r} cannot be built: {describe_error(exc)}") from exc
    if _family(kind) is None:
        raise BackboneError(f"timm model {arch!r} is a {type(kind).__name__}, not of a family the {BACKBONE} plugin "
                            f"has token sites for: {FAMILIES}")
    register(name, factory, BACKBONE, description=f"timm {arch} ({type(kind).__name__}), random weights",
             example_inputs=_images, safe_kwargs=COUNT_KWARGS, released_weights=partial(hub_weights, arch))
