"""Load ImageBind weights in the official layout (`imagebind_huge.pth`), at any CLS-token counts.

    model = imagebind_huge(".checkpoints/imagebind_huge.pth", num_cls_tokens={"vision": 4}, init="copy")
    load_imagebind(model, path_or_state_dict)                     # into a built model, at its counts

The file is read weights-only. `imagebind_huge` builds on the meta device and takes the file's
tensors as its parameters (4.8 GB are never held twice), then changes the counts through the engine,
so the recipe shows the growth and `surgery.tokens` can undo it. Keys of modalities the model lacks
are skipped; any other difference is a `CheckpointError` naming the keys.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from surgery.checkpoint_io import listing, read_checkpoint
from surgery.errors import CheckpointError

from .config import ALL_MODALITIES, HEAD_MODALITIES, POINT, ImageBindConfig

URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"  # upstream's release (nothing is downloaded here)
GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
POINT_TRUNK = "point_trunk"  # ImageBind-LLM's point encoder sits at the top level: point_trunk.*


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a file (weights-only / safetensors) or a mapping (copied, never changed)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (the released file: {URL})")
    return read_checkpoint(path)[0]


def modality_of(key: str) -> str | None:
    """The modality an official key belongs to ('<group>.<modality>.*', or 'point_trunk.*'), or
    None for a key that is not ImageBind's."""
    group, _, rest = key.partition(".")
    modality = POINT if group == POINT_TRUNK else rest.partition(".")[0]
    return modality if (group in GROUPS or group == POINT_TRUNK) and modality in ALL_MODALITIES else None


def split_modalities(state_dict: Mapping[str, torch.Tensor], modalities: tuple[str, ...]
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the entries of `modalities`, the other modalities present). A key outside upstream's four
    groups, or of no known modality, means this is not an ImageBind checkpoint."""
    foreign, kept, skipped = [], {}, set()
    for key, value in state_dict.items():
        modality = modality_of(key)
        if modality is None:
            foreign.append(key)
        elif modality in modalities:
            kept[key] = value
        else:
            skipped.add(modality)
    if foreign:
        raise CheckpointError(f"not an ImageBind checkpoint: {len(foreign)} of its {len(state_dict)} keys are not "
                              f"'<{'|'.join(GROUPS)}>.<modality>.*' or '{POINT_TRUNK}.*' ({listing(foreign)})")
    if not kept:
        raise CheckpointError(f"the checkpoint has none of the model's modalities ({', '.join(modalities)}); "
                              f"it has {', '.join(sorted(skipped)) or 'no weights'}")
    return kept, sorted(skipped)


def fit_problems(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """{"missing keys": [...], "unexpected keys": [...], "shape mismatches": [...]} of loading an
    official state dict into `model` strictly (empty lists: it fits)."""
    expected = model.state_dict()
    return {"missing keys": [k for k in expected if k not in state_dict],
            "unexpected keys": [k for k in state_dict if k not in expected],
            "shape mismatches": [f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
                                 for k, v in state_dict.items()
                                 if k in expected and tuple(v.shape) != tuple(expected[k].shape)]}


def _check_fit(model: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    problems = [f"{label} ({len(keys)}): {listing(keys)}" for label, keys in fit_problems(model, state_dict).items()
                if keys]
    if problems:
        raise CheckpointError(f"{where} does not fit this ImageBind configuration: " + "; ".join(problems))


def imagebind_huge(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = None, *,
                   config: str | ImageBindConfig = "huge", num_cls_tokens: Mapping[str, int] | None = None,
                   head_mode: str | Mapping[str, str] | None = None, modalities: tuple[str, ...] | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   init: str | Mapping[str, str] = "restore", seed: int = 0) -> nn.Module:
    """The released model (random weights without `checkpoint`), in eval mode.

    `num_cls_tokens` ({modality: k}) is applied after loading, through the engine, growing with
    `init` (default: the site's `normal`, matched to the trained token; `copy`, `mean`, `zeros`,
    `interpolate` also work) or shrinking with `truncate`."""
    import surgery

    from .model import ImageBindModel

    if isinstance(config, ImageBindConfig):
        base = copy.deepcopy(config)
        if modalities is not None:
            base.modalities = {m: c for m, c in base.modalities.items() if m in modalities}
            base.__post_init__()
    else:
        base = ImageBindConfig.named(config, modalities=modalities)
    modes = {m: c.head_mode for m, c in base.modalities.items() if m in HEAD_MODALITIES}
    if head_mode is not None:
        modes.update(head_mode if isinstance(head_mode, Mapping) else {m: head_mode for m in modes})
    if checkpoint is None:
        with torch.device(device):
            model = ImageBindModel(base)
        model = model.to(dtype) if dtype is not None else model
    else:
        state_dict = read_state_dict(checkpoint)
        where = "the state dict" if isinstance(checkpoint, Mapping) else f"checkpoint {checkpoint}"
        with torch.device("meta"):
            probe = ImageBindModel(base)
        state_dict, _ = split_modalities(state_dict, probe.modalities)
        counts = file_counts(probe, state_dict)
        with torch.device("meta"):
            model = ImageBindModel(at_counts(base, counts))
        _check_fit(model, state_dict, where)
        model.load_state_dict(state_dict, strict=True, assign=True)  # the file's tensors become the parameters
        model = model.to(device=device, dtype=dtype)
    model.eval()
    if isinstance(config, str):  # a registered model's config: recorded as `surgery.build` records it
        _mark_registered(model, config)
    if num_cls_tokens:
        surgery.resize(model, **{f"num_cls_tokens.{m}": k for m, k in num_cls_tokens.items()}, init=init, seed=seed)
    model.write_head_modes(modes)  # part of building the model: not a change to record
    return model


def file_counts(probe: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """{modality: CLS-token count} of an official state dict of `probe`'s modalities (text, which has
    none, left out), read as the token sites read them (`surgery.checkpoint.state_dict_counts`)."""
    from surgery.checkpoint import state_dict_counts

    found = state_dict_counts(probe, state_dict)
    return {name.rpartition(".")[2]: k for name, k in found.items() if name.rpartition(".")[2] != "text"}


def at_counts(config: ImageBindConfig, counts: Mapping[str, int]) -> ImageBindConfig:
    """A copy of `config` with these CLS-token counts, every head in mode 'first' (any count takes
    it; the modes asked for are set once the counts are final)."""
    fitted = ImageBindConfig(out_embed_dim=config.out_embed_dim, modalities=copy.deepcopy(config.modalities),
                             text_logit_scale_init=config.text_logit_scale_init,
                             max_logit_scale=config.max_logit_scale)
    for modality, k in counts.items():
        fitted.modalities[modality].num_cls_tokens = k
        fitted.modalities[modality].head_mode = "first"
    return fitted


def registered_kwargs(model: nn.Module, size: str) -> dict[str, Any]:
    """The keyword arguments (the plugin's `safe_kwargs`) with which the registered model of config
    `size` builds `model`'s architecture: its CLS-token counts where they differ from the config's,
    and its modalities when they are a subset."""
    named = ImageBindConfig.named(size)
    counts = {m: model.num_cls_tokens(m) for m in model.modalities
              if m != "text" and model.num_cls_tokens(m) != named.modalities[m].num_cls_tokens}
    kwargs: dict[str, Any] = {"num_cls_tokens": counts} if counts else {}
    if tuple(model.modalities) != tuple(named.modalities):
        kwargs["modalities"] = list(model.modalities)
    return kwargs


def _mark_registered(model: nn.Module, size: str) -> None:
    """Record the registered model of config `size` and its arguments on `model` (`surgery.build`'s
    record), so that a `surgery.save` file of it names its model for the command line."""
    from surgery.state import mark_built

    from .plugin import MODELS

    name = next((n for n, (s, _, _) in MODELS.items() if s == size), None)
    if name is not None:
        mark_built(model, name, registered_kwargs(model, size))


def load_imagebind(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                   mismatch: str = "model", init: str | Mapping[str, str] = "restore", shrink: str = "truncate",
                   seed: int = 0) -> Any:
    """Load official-layout weights into a built `ImageBindModel` (any counts, any modality subset),
    atomically: on any error the model is exactly as it was. `mismatch="model"` resizes the model to
    the file's counts, `"checkpoint"` fits the file's tokens to the model's (`init`, `shrink`).
    Returns `surgery.checkpoint.LoadResult`."""
    import surgery

    from .model import ImageBindModel

    if not isinstance(model, ImageBindModel):
        raise CheckpointError(f"load_imagebind loads into an ImageBindModel, got {type(model).__name__}")
    state_dict, _ = split_modalities(read_state_dict(source), model.modalities)
    return surgery.load_state_dict(model, state_dict, mismatch=mismatch, init=init, shrink=shrink, seed=seed)


__all__ = ["imagebind_huge", "load_imagebind", "read_state_dict", "split_modalities", "modality_of", "fit_problems",
           "file_counts", "at_counts", "registered_kwargs", "URL"]
