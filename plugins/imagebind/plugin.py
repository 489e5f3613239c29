"""Backbone plugin for ImageBind: `num_cls_tokens.<modality>` as token sites, the head modes as the
model option `head_mode`.

Each site (`cls_token` and the CLS rows of its positional table) is applied by the engine from its
declaration; text's is fixed at 0 (causal mask, EOT head: a CountError says so), point's is at
least 1, and so is any site whose head is in `mean` or `all`. The released weights were trained
with one CLS token per modality: more are an experiment until trained (docs/imagebind.md).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from surgery import hookimpl
from surgery.site import Counter, TokenSite, TokenTensor, tensor_key

from .config import CLS_MODALITIES, HEAD_MODES, POINT, POINT_CLS_REASON, TEXT_CLS_REASON, ConfigError
from .metrics import surgery_register_metrics  # noqa: F401 - this backbone's sweep metrics (a hook)
from .layouts import surgery_checkpoint_layout  # noqa: F401 - imagebind_huge.pth, imagebind_w3D.pth (a hook)

BACKBONE = "imagebind"
SITE_PREFIX = "num_cls_tokens."


def is_imagebind(model: nn.Module) -> bool:
    from .model import ImageBindModel

    return isinstance(model, ImageBindModel)


def _pos_owner(pre: nn.Module) -> nn.Module:
    """The module holding the positional table whose first rows are the CLS rows."""
    return pre if pre.modality == "imu" else pre.pos_embedding_helper


def cls_site(model: nn.Module, modality: str) -> TokenSite:
    pre = model.modality_preprocessors[modality]
    pos_owner = _pos_owner(pre)
    table = pos_owner.pos_embed
    num_patches = pre.num_patches if modality == "imu" else pos_owner.num_patches
    reads_cls = model.head_mode(modality) != "first"

    def count_in_state_dict(state_dict, paths) -> int | None:
        cls = state_dict.get(tensor_key(paths, pre, "cls_token"))
        if cls is not None:
            return int(cls.shape[1]) if cls.dim() == 3 else None
        rows = state_dict.get(tensor_key(paths, pos_owner, "pos_embed"))
        if rows is None or rows.dim() != 3 or rows.shape[1] < num_patches:
            return None  # not this modality's layout: the key check names the problem
        return int(rows.shape[1] - num_patches)

    return TokenSite(
        name=SITE_PREFIX + modality,
        count=pre.num_cls_tokens,
        tensors=[
            TokenTensor(pre, "cls_token", axis=1,
                        template=torch.empty(1, 0, table.shape[-1], dtype=table.dtype, device=table.device)),
            TokenTensor(pos_owner, "pos_embed", axis=1, start=0, coupled=True),
        ],
        counters=[Counter(pre, "num_cls_tokens"), Counter(model.config.modalities[modality], "num_cls_tokens")],
        min=1 if reads_cls else 0,
        default_init="normal",
        note=(f"the {modality} head is in mode {model.head_mode(modality)!r}, which reads the CLS tokens; "
              f"set_head_mode('first') to go to 0") if reads_cls else "",
        count_in_state_dict=count_in_state_dict,
        description=f"{modality} CLS tokens: cls_token and the first rows of the positional embedding "
                    f"(trained with 1; more are an experiment until trained)",
    )


def text_site(model: nn.Module) -> TokenSite:
    return TokenSite(name=SITE_PREFIX + "text", count=0, min=0, max=0, note=TEXT_CLS_REASON,
                     description="text has no CLS tokens (fixed at 0)")


def point_site(model: nn.Module) -> TokenSite:
    """The point encoder's CLS tokens and their positional embeddings, two (1, k, D) tensors; the
    state dict's count is read from `cls_token` (the engine's default reading)."""
    enc = model.point_trunk.point_encoder
    return TokenSite(
        name=SITE_PREFIX + POINT,
        count=enc.num_cls_tokens,
        tensors=[TokenTensor(enc, "cls_token", axis=1), TokenTensor(enc, "cls_pos", axis=1, coupled=True)],
        counters=[Counter(enc, "num_cls_tokens"), Counter(model.config.modalities[POINT], "num_cls_tokens")],
        min=1,
        default_init="normal",
        note=POINT_CLS_REASON,
        description="point CLS tokens: cls_token and cls_pos (trained with 1; more are an experiment until trained)",
    )


def modality_site(model: nn.Module, modality: str) -> TokenSite:
    if modality == POINT:
        return point_site(model)
    return cls_site(model, modality) if modality in CLS_MODALITIES else text_site(model)


# -- hooks ---------------------------------------------------------------------------------------


@hookimpl
def surgery_register_backbones(register):
    register(BACKBONE, is_imagebind, description="ImageBind (six modalities into one embedding space): CLS tokens")


@hookimpl
def surgery_token_sites(model, backbone):
    if backbone != BACKBONE:
        return None
    return [modality_site(model, m) for m in model.modalities]


HEAD_MODE_OPTION = "head_mode"


def _head_modes(model: nn.Module) -> dict[str, str]:
    """{modality: mode} of every head that has one (all but text's, which reads the EOT token)."""
    return {m: mode for m in model.modalities if (mode := model.head_mode(m)) in HEAD_MODES}


@hookimpl
def surgery_model_options(model, backbone):
    """The heads' modes are the model's state but not its weights: saved, shown, restored by load."""
    if backbone != BACKBONE:
        return None
    return {HEAD_MODE_OPTION: _head_modes(model)}


@hookimpl
def surgery_apply_options(model, backbone, options, edit):
    """Set head modes (from `surgery.set_options`, a checkpoint, a recipe); every modality and mode
    is checked before anything changes."""
    if backbone != BACKBONE:
        return
    modes = options.get(HEAD_MODE_OPTION)
    if not isinstance(modes, dict) or not all(isinstance(m, str) for m in modes.values()):
        raise ConfigError(f"option {HEAD_MODE_OPTION!r} must map modalities to one of "
                          f"{', '.join(HEAD_MODES)}, got {modes!r:.80}")
    old = _head_modes(model)
    model.check_head_modes(modes)  # every modality and mode first: on an error nothing is changed
    edit.on_undo(lambda: model.write_head_modes(old))  # the modes before, valid again once the counts are back
    model.write_head_modes(modes)


def example_inputs(model: nn.Module, batch: int = 2) -> tuple[dict[str, torch.Tensor]]:
    """Seeded inputs in upstream's shapes for every modality the model has, at its native sizes."""
    gen = torch.Generator().manual_seed(0)
    like = next(model.parameters())
    inputs: dict[str, torch.Tensor] = {}
    for modality, cfg in model.config.modalities.items():
        if modality == "text":
            n, vocab = cfg.context_length, cfg.vocab_size
            ids = torch.randint(1, vocab - 2, (batch, n), generator=gen)
            ends = torch.randint(2, n, (batch,), generator=gen)
            ids[torch.arange(n) > ends[:, None]] = 0           # padding after the end, as the tokenizer does
            ids[torch.arange(batch), ends] = vocab - 1           # EOT: the largest id
            inputs[modality] = ids.to(like.device)
            continue
        if modality == POINT:
            shape = (batch, cfg.input_size[0], 3)  # clouds of (x, y, z)
        elif modality == "vision":
            shape = (batch, cfg.in_chans, *cfg.input_size[1:])  # images
        else:
            shape = (batch, cfg.in_chans, *cfg.input_size)
        inputs[modality] = torch.randn(*shape, generator=gen).to(device=like.device, dtype=like.dtype)
    return (inputs,)


def _factory(size: str, default_device: str = "cpu"):
    def build(*, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              num_cls_tokens: Mapping[str, int] | None = None, head_mode: Any = None,
              modalities: tuple[str, ...] | None = None) -> nn.Module:
        from .config import ImageBindConfig
        from .model import ImageBindModel

        config = ImageBindConfig.named(size, num_cls_tokens=num_cls_tokens, head_mode=head_mode,
                                       modalities=modalities)
        # no device asked for: meta for the released sizes, else the current default device, so that
        # `with torch.device("meta")` builds it without allocating (how its size is counted)
        with torch.device(device or (default_device if default_device == "meta" else torch.get_default_device())):
            model = ImageBindModel(config)
        return (model.to(dtype) if dtype is not None else model).eval()
    return build


MODELS = {
    "imagebind_tiny_test": ("tiny", "cpu", "tiny ImageBind, all six modalities (width 32, 2 blocks) for tests"),
    "imagebind_small": ("small", "cpu", "scaled-down ImageBind (width 256, 4 blocks) for quick benchmarks"),
    "imagebind_huge": ("huge", "meta", "the released imagebind_huge architecture (1.2B parameters), on the meta "
                                       "device unless device=... is given; load weights with load_imagebind"),
    "imagebind_tiny_w3d_test": ("tiny_w3d", "cpu", "tiny ImageBind with ImageBind-LLM's point modality (64 points, "
                                                   "8 groups of 8) for tests"),
    "imagebind_small_w3d": ("small_w3d", "cpu", "scaled-down ImageBind with the point modality (2048 points) for "
                                                "quick benchmarks"),
    "imagebind_huge_w3d": ("huge_w3d", "meta", "ImageBind-LLM's imagebind_w3D architecture (imagebind_huge + the "
                                               "Point-BERT point encoder), on the meta device unless device=... is "
                                               "given; load weights with load_imagebind"),
}


@hookimpl
def surgery_register_models(register):
    for name, (size, device, description) in MODELS.items():
        register(name, _factory(size, device), BACKBONE, description=description, example_inputs=example_inputs,
                 safe_kwargs=("num_cls_tokens", "modalities"))  # counts; a file of some modalities only
