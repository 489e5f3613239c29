"""ImageBind-LLM's released `7B.pth`, recognised for `surgery inspect`, `resize` and `load`.

    surgery inspect 7B.pth                              # imagebind_llm_7b, query_layer 32
    surgery resize 7B.pth --set query_layer=16 -o 7B-q16.pth   # a 7B.pth again

The released checkpoint is `{'model': {...}}` with the keys upstream's `convert_ckpt.py` keeps:
the bridge (`image_bind_proj.*`, `image_bind_norm_*`, `image_bind_f*_*`), `prefix_query.weight`
and the LLaMA's bias, gate, LoRA and norm tensors, under the model's own key names. Neither the
frozen LLaMA (Meta's folder) nor the ImageBind encoder (`imagebind_w3D.pth`, which the imagebind
plugin recognises on its own) is in it, so the layout is `partial`: the encoder's sites
(`num_cls_tokens.*`) show the registered model's counts, and their tensors are not the file's.

What the file is, is read from it as `load_official` reads it (`checkpoint_hparams`: query_layer,
phase, bridge form, LoRA rank from the tensors; `check_official_keys`: nothing missing). The
registered model it fits (`registered_fit`) is the one whose build with the file's query_layer and
form (phase, legacy_bridge, lora_rank: this plugin's `safe_kwargs`) has every tensor of the file at
the file's shape. Written back (`Layout.save`), the file keeps its layout: `save_official`'s
`{'model': ...}` (a `.safetensors` OUT holds the same tensors flat).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from surgery import hookimpl
from surgery.errors import CheckpointError, SurgeryError
from surgery_plugins.llama_adapter.layouts import build_if_shapes_fit, n_heads_of

from .loading import check_official_keys, checkpoint_config, checkpoint_hparams, is_official_key, save_official

LAYOUT = "ImageBind-LLM checkpoint (7B.pth)"
MARKERS = ("prefix_query.weight", "image_bind_proj.weight")
VARIANTS = ("phase", "legacy_bridge", "lora_rank")  # which form of the model (finetune / pretrain, the bridge)


def is_checkpoint_file(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict looks like 7B.pth: prefix_query and the bridge, and only keys 7B.pth carries
    (a full state dict, with the encoder's or the frozen LLaMA's weights, is not one)."""
    return all(k in state_dict for k in MARKERS) and all(is_official_key(k) for k in state_dict)


def registered_fit(shapes: Mapping[str, tuple[int, ...]], config: Any, *, imagebind: str | None = None,
                   encoder_kwargs: Mapping[str, Any] | None = None,
                   complete: bool = False) -> tuple[str, dict[str, Any]] | None:
    """(name, keyword arguments) of the registered model that `config` (an `ImageBindLLMConfig`) is, or None.

    A model of this plugin fits when its build with `config`'s query_layer and form (and the
    encoder's counts and modalities, `encoder_kwargs`) has every key of `shapes` at that shape
    (`complete`: and no other key), the same norm_eps, and (when `imagebind` names one) the same
    encoder config. Built on the meta device; those of another width and depth are not built at all.
    """
    from surgery.plugins import get_host

    from .config import ImageBindLLMConfig
    from .plugin import MODELS

    host = get_host()
    for name, (size, _, _) in MODELS.items():
        spec = host.models.get(name)
        base = ImageBindLLMConfig.named(size)
        if spec is None or (base.dim, base.n_layers) != (config.dim, config.n_layers) or \
                imagebind is not None and base.imagebind != imagebind:
            continue
        kwargs = {"query_layer": config.query_layer, **(encoder_kwargs or {})}
        kwargs.update({k: getattr(config, k) for k in VARIANTS
                       if getattr(config, k) != getattr(base, k) and (k != "lora_rank" or config.phase == "finetune")})
        candidate = build_if_shapes_fit(spec, kwargs, shapes, complete)
        if candidate is not None and (not complete or candidate.config.norm_eps == config.norm_eps):
            return name, kwargs
    return None


def read_layout(path: Path, state_dict: Mapping[str, torch.Tensor]) -> Any:
    """The `Layout` of a 7B.pth (see the module doc); a broken one is a CheckpointError."""
    from surgery.layouts import Layout
    from surgery_plugins.imagebind.config import ImageBindConfig

    from .model import ImageBindLLM

    where = f"{LAYOUT} {path}"
    hp = checkpoint_hparams(state_dict, where)
    n_layers = hp["n_layers_seen"] or hp["query_layer"]
    # the key names of the architecture the tensors describe: the encoder's are none of the file's,
    # so the smallest one does, at the bridge's input width
    encoder = dataclasses.replace(ImageBindConfig.named("tiny", modalities=("vision",)), out_embed_dim=hp["in_dim"])
    try:
        arch = checkpoint_config(hp, encoder, dim=hp["dim"], n_layers=n_layers,
                                 n_heads=n_heads_of(state_dict))
        with torch.device("meta"):
            expected = ImageBindLLM(arch).state_dict()
    except (SurgeryError, ValueError) as exc:
        raise CheckpointError(f"{where}: its tensors describe no buildable ImageBind-LLM ({exc})") from exc
    check_official_keys(state_dict, expected, hp, n_layers, where)
    fit = registered_fit({k: tuple(v.shape) for k, v in state_dict.items()}, arch)
    return Layout(LAYOUT, dict(state_dict), model=fit[0] if fit else None, model_kwargs=fit[1] if fit else {},
                  partial=True, save=write_checkpoint)


def write_checkpoint(model: nn.Module, path: Path) -> None:
    """Write `model` in this layout (`save_official`: 7B.pth's keys, at the model's current counts)."""
    if Path(path).suffix not in (".pth", ".pt", ".safetensors"):
        raise CheckpointError(f"cannot write {path}: an {LAYOUT} is a torch.save file (.pth, .pt) or, flat, "
                              f".safetensors; give OUT one of those suffixes")
    save_official(model, path)


@hookimpl
def surgery_checkpoint_layout(path, state_dict):
    if state_dict is None or not is_checkpoint_file(state_dict):
        return None
    return read_layout(path, state_dict)


__all__ = ["LAYOUT", "is_checkpoint_file", "registered_fit", "read_layout", "write_checkpoint"]
