"""LLaMA-Adapter V2's released adapter checkpoints, recognised for `surgery inspect`, `resize` and `load`.

    surgery inspect BIAS-7B.pth                                   # llama_adapter_v2_7b, query_len 10, query_layer 31
    surgery resize BIAS-7B.pth --set query_len=4 -o BIAS-7B-q4.pth   # an adapter checkpoint again

An adapter checkpoint (BIAS-7B, LORA-BIAS-7B, CAPTION-7B, LORA-BIAS-7B-v21, or one `save_official`
wrote) is `{'model': {...}, 'config': {...}}`: the visual-query branch, `adapter_query`, the
LLaMA's gates, biases, norms (and LoRA), under the model's own key names, and none of the frozen
LLaMA or CLIP weights. So the layout is `partial`: it fills the adapter of a model whose other
tensors come from elsewhere (`load_official` reads them from Meta's folder and CLIP's file).

What the file is, is read from it as `load_official` reads it (`adapter_hparams`: counts and
branches from the tensors; `check_adapter_keys`: the adapter part complete). The registered model
it fits (`registered_fit`) is the one whose build, with the file's counts and adapter kind
(w_bias, w_lora, lora_rank, w_new_gate, the `safe_kwargs` of this plugin's models), has every
tensor of the file at the file's shape. Written back (`Layout.save`), the file keeps its layout:
`save_official`'s `{'model': adapter, 'config': ...}`, which upstream's `llama.load` reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from surgery import hookimpl
from surgery.errors import CheckpointError, SurgeryError

from .loading import (adapter_config, adapter_hparams, check_adapter_keys, is_adapter_key, read_adapter_checkpoint,
                      save_official)

LAYOUT = "LLaMA-Adapter V2 adapter checkpoint"
MARKERS = ("visual_query.weight", "adapter_query.weight")  # the visual queries: only this layout has both
COUNTS = ("query_len", "query_layer")
VARIANTS = ("w_bias", "w_lora", "lora_rank", "w_new_gate")  # which released adapter (BIAS, LORA-BIAS, ...)


def is_adapter_file(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict looks like an adapter checkpoint: the visual queries, and only keys an
    adapter checkpoint carries (a full state dict, with LLaMA's or CLIP's weights, is not one)."""
    return all(k in state_dict for k in MARKERS) and all(is_adapter_key(k) for k in state_dict)


def registered_fit(shapes: Mapping[str, tuple[int, ...]], config: Any, *, fields: tuple[str, ...] = (),
                   complete: bool = False) -> tuple[str, dict[str, Any]] | None:
    """(name, keyword arguments) of the registered model that `config` (an `AdapterConfig`) is, or None.

    A model of this plugin fits when its build with `config`'s counts and adapter kind has every key
    of `shapes` at that shape (`complete`: and no other key), and agrees on `fields`, the config
    fields no shape shows (v_num_heads, norm_eps, clip). Only the plugin's own models are tried,
    built on the meta device (nothing allocated), those of another width and depth not at all.
    """
    from surgery.plugins import get_host

    from .model import AdapterConfig
    from .plugin import MODELS

    host = get_host()
    for name, (defaults, _) in MODELS.items():
        spec = host.models.get(name)
        base = AdapterConfig.named(defaults["size"])
        if spec is None or (base.dim, base.n_layers) != (config.dim, config.n_layers):
            continue
        kwargs = {k: getattr(config, k) for k in COUNTS}
        kwargs.update({k: getattr(config, k) for k in VARIANTS
                       if getattr(config, k) != getattr(base, k) and (k != "lora_rank" or config.w_lora)})
        candidate = build_if_shapes_fit(spec, kwargs, shapes, complete)
        if candidate is not None and all(getattr(candidate.config, f) == getattr(config, f) for f in fields):
            return name, kwargs
    return None


def build_if_shapes_fit(spec: Any, kwargs: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                        complete: bool) -> nn.Module | None:
    """The registered model `spec` built with `kwargs` on the meta device, when it has every key of
    `shapes` at that shape (`complete`: and no other key); None otherwise, or when the size cannot
    take those counts (a query_layer beyond its layers). Shared by this plugin's and ImageBind-LLM's
    layouts."""
    try:
        with torch.device("meta"):
            candidate = spec.factory(**kwargs)
    except (SurgeryError, ValueError):
        return None
    theirs = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
    if complete and theirs.keys() != shapes.keys():
        return None
    return candidate if all(theirs.get(k) == tuple(s) for k, s in shapes.items()) else None


def n_heads_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    """LLaMA's head count from a layer's gate (1, n_heads, 1, 1); 1 when no gate is there (key
    names do not depend on it, and the key check then names the missing gates)."""
    gate = next((t for k, t in state_dict.items() if k.endswith(".attention.gate") and t.dim() == 4), None)
    return int(gate.shape[1]) if gate is not None else 1


def read_layout(path: Path, state_dict: Mapping[str, torch.Tensor]) -> Any:
    """The `Layout` of an adapter checkpoint (see the module doc); a broken one is a CheckpointError."""
    from surgery.layouts import Layout

    from .clip import ClipVisionConfig
    from .model import LLaMAAdapter

    where = f"{LAYOUT} {path}"
    _, config = read_adapter_checkpoint(path)  # its 'config' entry (v_num_heads, which no tensor shows)
    hp = adapter_hparams(state_dict, config, where)
    n_layers = hp["n_layers_seen"] or hp["query_layer"]
    try:
        arch = adapter_config(hp, ClipVisionConfig(output_dim=hp["clip_dim"]), dim=hp["dim"], n_layers=n_layers,
                              n_heads=n_heads_of(state_dict))
        # the key names of the architecture the tensors describe; CLIP's are none of the file's, so
        # the smallest tower does (a ViT-L/14 takes seconds to initialise, even on the meta device)
        probe = dataclasses.replace(arch, clip=ClipVisionConfig(image_size=14, patch_size=14, width=64, layers=1,
                                                                output_dim=hp["clip_dim"]))
        with torch.device("meta"):
            expected = LLaMAAdapter(probe).state_dict()
    except (SurgeryError, ValueError) as exc:
        raise CheckpointError(f"{where}: its tensors describe no buildable LLaMA-Adapter V2 ({exc})") from exc
    check_adapter_keys(state_dict, expected, "clip.", hp, where)
    fit = registered_fit({k: tuple(v.shape) for k, v in state_dict.items()}, arch,
                         fields=("v_num_heads",) if "v_num_heads" in config else ())
    return Layout(LAYOUT, dict(state_dict), model=fit[0] if fit else None, model_kwargs=fit[1] if fit else {},
                  partial=True, save=write_adapter)


def write_adapter(model: nn.Module, path: Path) -> None:
    """Write `model`'s adapter in this layout (`save_official`), at its current counts."""
    if Path(path).suffix == ".safetensors":
        raise CheckpointError(f"cannot write {path}: a {LAYOUT} is a torch.save file ({{'model': ..., 'config': "
                              f"...}}, what upstream's llama.load reads); give OUT a .pth name")
    save_official(model, path)


@hookimpl
def surgery_checkpoint_layout(path, state_dict):
    if state_dict is None or not is_adapter_file(state_dict):
        return None
    return read_layout(path, state_dict)


__all__ = ["LAYOUT", "build_if_shapes_fit", "is_adapter_file", "n_heads_of", "registered_fit", "read_layout",
           "write_adapter"]
