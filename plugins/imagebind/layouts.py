"""ImageBind's released weights, recognised for `surgery inspect`, `resize` and `load`.

    surgery inspect imagebind_huge.pth          # imagebind_huge, num_cls_tokens 1 for each modality
    surgery inspect imagebind_w3D.pth           # imagebind_huge_w3d (ImageBind-LLM's, with point clouds)
    surgery resize imagebind_huge.pth --set num_cls_tokens.vision=4 -o ib_v4.safetensors

Both files are plain state dicts under the model's own key names (`modality_preprocessors.<m>.*`,
`modality_trunks.<m>.*`, `modality_heads.<m>.*`, `modality_postprocessors.<m>.*`, and for the
point modality `point_trunk.*`), so recognising one is reading which modalities its keys name
(`modality_of`). The registered model it fits is the plugin's config that has those modalities
(the `_w3d` ones when point clouds are there) and, at the CLS-token counts the file holds (read
as `imagebind_huge` reads them: `file_counts`), every key at the file's shape. A file of some
modalities only fits with `modalities=` those; a file missing a key of a modality it has is
broken: a `CheckpointError` names the keys. The file holds the whole model, so the layout is not
partial; `surgery resize` writes `surgery.save`'s safetensors (counts, head modes and recipe
recorded), which this plugin reads back, and `load_imagebind` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from surgery import hookimpl
from surgery.checkpoint_io import listing
from surgery.errors import CheckpointError

from .config import POINT, ImageBindConfig
from .loading import at_counts, file_counts, fit_problems, modality_of, registered_kwargs

LAYOUT = "ImageBind state dict"
LAYOUT_W3D = "ImageBind-LLM's ImageBind state dict (imagebind_w3D, with point clouds)"
FIRST_BLOCK = "modality_trunks.{}.blocks.0.attn.in_proj_weight"  # (3 D, D): a modality's width, read cheaply


def modalities_of(state_dict: Mapping[str, torch.Tensor]) -> set[str] | None:
    """The modalities an ImageBind state dict has weights for; None when a key is not ImageBind's
    or no head is there (then it is not this layout)."""
    found = {modality_of(k) for k in state_dict}
    if not state_dict or None in found or not any(k.startswith("modality_heads.") for k in state_dict):
        return None
    return found


def _candidates(present: set[str], state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(registered name, config) of this plugin's models that have every modality present, those
    with exactly these modalities first; a config whose widths disagree with the file's is left out."""
    from surgery.plugins import get_host

    from .plugin import MODELS

    host = get_host()
    found = []
    for name, (size, _, _) in MODELS.items():
        config = ImageBindConfig.named(size)
        if name not in host.models or not present <= set(config.modalities):
            continue
        widths = {m: state_dict[FIRST_BLOCK.format(m)].shape[-1] for m in present
                  if FIRST_BLOCK.format(m) in state_dict and state_dict[FIRST_BLOCK.format(m)].dim() == 2}
        if all(config.modalities[m].embed_dim == w for m, w in widths.items()):
            found.append((name, size))
    return sorted(found, key=lambda c: set(ImageBindConfig.named(c[1]).modalities) != present)


def read_layout(path: Path, state_dict: Mapping[str, torch.Tensor], present: set[str]) -> Any:
    """The `Layout` of an ImageBind state dict (see the module doc); a broken one is a CheckpointError."""
    from surgery.layouts import Layout

    from .model import ImageBindModel

    name = LAYOUT_W3D if POINT in present else LAYOUT
    where = f"{name} {path}"
    for model_name, size in _candidates(present, state_dict):
        named = ImageBindConfig.named(size)
        config = ImageBindConfig.named(size, modalities=tuple(m for m in named.modalities if m in present))
        with torch.device("meta"):  # shapes only
            probe = ImageBindModel(config)
            model = ImageBindModel(at_counts(config, file_counts(probe, state_dict)))
        problems = fit_problems(model, state_dict)
        if not problems["unexpected keys"] and not problems["shape mismatches"]:
            if problems["missing keys"]:
                missing = problems["missing keys"]
                raise CheckpointError(f"{where} is broken: it has weights of {', '.join(sorted(present))} but lacks "
                                      f"{len(missing)} key(s) of them (model {model_name!r}): {listing(missing)}")
            return Layout(name, dict(state_dict), model=model_name, model_kwargs=registered_kwargs(model, size))
    return Layout(name, dict(state_dict))  # ImageBind's keys at widths no registered model has: --model decides


@hookimpl
def surgery_checkpoint_layout(path, state_dict):
    present = modalities_of(state_dict) if state_dict is not None else None
    if present is None:
        return None
    return read_layout(path, state_dict, present)


__all__ = ["LAYOUT", "LAYOUT_W3D", "modalities_of", "read_layout"]
