"""Load and save ImageBind-LLM checkpoints in the official (upstream) layout.

    model = load_official("7B.pth", "/weights/llama", "imagebind_w3D.pth", llama_type="7B_chinese")
    save_official(model, "edited-7B.pth", imagebind_path="edited-imagebind.pth")

The layout is three things: a LLaMA folder, the released `7B.pth` (the bridge, `prefix_query` and the
LLaMA's bias, gate, LoRA and norm keys) and the ImageBind encoder file; what upstream hard-codes is
read from the tensors. Files are read weights-only with the LLaMA-Adapter plugin's readers, the model
is built on the meta device and takes their tensors (a 7B is never held twice), and every key is
checked (docs/imagebind_llm.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from surgery.checkpoint_io import listing, natural_key, write_atomically
from surgery.errors import CheckpointError
from surgery_plugins.llama_adapter.loading import (LLAMA, default_dtype, is_adapter_key, read_adapter_checkpoint,
                                                   read_base_shards, read_params, shape_error)

ENCODER = "image_bind."  # the encoder's keys; not in 7B.pth (convert_ckpt.py drops them)
RELEASES = {  # upstream's names and where they are published: nothing is downloaded here
    "7B": "https://huggingface.co/Cxxs/ImageBind-LLM/resolve/main/7B.pth",
    "7B-pretrained": "https://huggingface.co/Cxxs/ImageBind-LLM/resolve/main/7B-pretrained.pth",
}
IMAGEBIND_RELEASE = "imagebind_w3D.pth from huggingface.co/ZiyuG/ImageBind_w3D"


def is_official_key(key: str) -> bool:
    """A key 7B.pth carries: everything but the encoder and the frozen LLaMA weights (convert_ckpt.py)."""
    return is_adapter_key(key, clip_prefix=ENCODER)


def checkpoint_hparams(state_dict: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    """The architecture a 7B.pth-style state dict describes, read from its tensors."""

    def need(key: str, ndim: int) -> torch.Tensor:
        t = state_dict.get(key)
        if t is None:
            raise CheckpointError(f"{where} lacks {key}: it is not an ImageBind-LLM checkpoint (expected the "
                                  f"7B.pth key layout: image_bind_proj.*, prefix_query.weight, llama.* ...)")
        if t.dim() != ndim:
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, expected {ndim} dimensions")
        return t

    prefix, proj = need("prefix_query.weight", 2), need("image_bind_proj.weight", 2)
    hp = {"query_layer": int(prefix.shape[0]), "dim": int(prefix.shape[1]), "in_dim": int(proj.shape[1]),
          "legacy_bridge": "image_bind_norm_1.bias" in state_dict}
    if proj.shape[0] != hp["dim"]:
        raise CheckpointError(f"{where}: image_bind_proj maps to {proj.shape[0]} but prefix_query is {hp['dim']} wide")
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"^llama\.layers\.(\d+)\.", k))}
    hp["n_layers_seen"] = max(layers) + 1 if layers else None
    lora_key = re.compile(r"^llama\.layers\.\d+\.(attention|feed_forward)\.lora_\w+_l1\.weight$")
    lora = [k for k in state_dict if lora_key.match(k)]
    biased = any(re.match(r"^llama\.layers\.\d+\..*\.bias$", k) for k in state_dict)
    hp["phase"] = "finetune" if lora or biased else "pretrain"  # upstream: w_bias = w_lora = phase == "finetune"
    ranks = {int(state_dict[k].shape[0]) for k in lora}
    if len(ranks) > 1:
        raise CheckpointError(f"{where}: the LoRA matrices do not share one rank (lora_*_l1 rows: {sorted(ranks)})")
    hp["lora_rank"] = ranks.pop() if ranks else 16
    return hp


def _check_fit(hp: Mapping[str, Any], params: Mapping[str, Any], where: str, folder: Path) -> None:
    if hp["dim"] != params["dim"]:
        raise CheckpointError(f"{where} is for a LLaMA of dim {hp['dim']} (prefix_query width) but {folder} holds "
                              f"dim {params['dim']}: another model size (wrong llama_type?)")
    if hp["n_layers_seen"] is not None and hp["n_layers_seen"] != params["n_layers"]:
        raise CheckpointError(f"{where} has per-layer tensors for {hp['n_layers_seen']} LLaMA layers but "
                              f"{folder}/params.json says n_layers = {params['n_layers']}")
    if not 1 <= hp["query_layer"] <= params["n_layers"]:
        raise CheckpointError(f"{where}: query_layer = {hp['query_layer']} (prefix_query rows) is not within "
                              f"1..{params['n_layers']}")
    if params["dim"] % params["n_heads"]:
        raise CheckpointError(f"{folder}/params.json: dim {params['dim']} is not divisible by "
                              f"n_heads {params['n_heads']}")


def _encoder(imagebind_weights, imagebind, device, dtype, head_mode, allow_random, seed) -> nn.Module:
    """The ImageBind encoder from its file (strict, at the file's counts), or seeded random weights."""
    from surgery_plugins.imagebind.loading import imagebind_huge

    if imagebind_weights is not None:
        return imagebind_huge(imagebind_weights, config=imagebind, head_mode=head_mode, device=device, dtype=dtype)
    if not allow_random:
        raise CheckpointError(f"no ImageBind weights: pass imagebind_weights= the encoder's state dict file "
                              f"({IMAGEBIND_RELEASE}; .pth read weights-only, or .safetensors), or "
                              f"allow_random_imagebind=True for a randomly initialised encoder (tests, benchmarks)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return imagebind_huge(None, config=imagebind, head_mode=head_mode, device=device, dtype=dtype)


def load_official(checkpoint: str | os.PathLike, llama_dir: str | os.PathLike,
                  imagebind_weights: str | os.PathLike | None = None, *, llama_type: str = "7B",
                  imagebind: Any = "huge_w3d", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  max_seq_len: int = 512, max_batch_size: int = 1, head_mode: Any = None,
                  allow_random_imagebind: bool = False, seed: int = 0) -> nn.Module:
    """An `ImageBindLLM` from the official files, in eval mode, on `device` in `dtype`.

    checkpoint         7B.pth (or one written by `save_official`): the bridge, prefix_query and the
                       LLaMA's bias / gate / LoRA / norm tensors; its architecture is read from them
    llama_dir          `<llama_type>/params.json`, `<llama_type>/consolidated.NN.pth`, `tokenizer.model`
    imagebind_weights  the encoder's state dict (imagebind_w3D.pth), loaded strictly into the
                       `imagebind` config (a name of the imagebind plugin, or an ImageBindConfig)
                       at the CLS-token counts it holds; None is an error unless
                       `allow_random_imagebind` (tests, benchmarks: seeded random weights)
    head_mode          the encoder's head modes ("all" feeds k CLS tokens as k visual tokens)
    dtype              every floating tensor is cast to it; default float32 on the CPU, float16 elsewhere

    To change CLS-token counts after loading: `surgery.resize(model, **{"num_cls_tokens.vision": 4})`.
    """
    from surgery_plugins.llama_adapter.tokenizer import Tokenizer

    from .model import ImageBindLLM

    llama_dir = Path(llama_dir)
    if not llama_dir.is_dir():
        raise CheckpointError(f"LLaMA folder {llama_dir} does not exist (expected <llama_dir>/{llama_type}/"
                              f"params.json, consolidated.00.pth and <llama_dir>/tokenizer.model)")
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not Path(checkpoint).exists() and str(checkpoint) in RELEASES:
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; {checkpoint} is the name of an upstream "
                              f"release: download {RELEASES[str(checkpoint)]} and pass the file's path "
                              f"(nothing is downloaded here)")

    # small files first, so that a wrong argument fails before gigabytes are read
    params = read_params(llama_dir, llama_type)
    tokenizer_path = llama_dir / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise CheckpointError(f"LLaMA tokenizer {tokenizer_path} does not exist (the official layout keeps "
                              f"tokenizer.model in llama_dir, next to the {llama_type}/ folder)")
    tokenizer = Tokenizer(tokenizer_path)
    where = f"checkpoint {checkpoint}"
    adapter_sd, _ = read_adapter_checkpoint(checkpoint)
    hp = checkpoint_hparams(adapter_sd, where)
    _check_fit(hp, params, where, llama_dir / llama_type)

    encoder = _encoder(imagebind_weights, imagebind, device, dtype, head_mode, allow_random_imagebind, seed)
    if encoder.config.out_embed_dim != hp["in_dim"]:
        raise CheckpointError(f"the ImageBind encoder gives {encoder.config.out_embed_dim}-d embeddings but {where}'s "
                              f"image_bind_proj takes {hp['in_dim']}: not the encoder it was trained with")
    config = checkpoint_config(
        hp, encoder.config, dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        vocab_size=tokenizer.n_words, multiple_of=params.get("multiple_of", 256),
        norm_eps=params.get("norm_eps", 1e-5),  # upstream defaults
        max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    with torch.device("meta"):  # shapes only: the files' tensors become the parameters below
        model = ImageBindLLM(config, tokenizer)
    model.image_bind, model.config.imagebind = encoder, encoder.config  # the loaded encoder, not a meta copy
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(ENCODER)}
    check_official_keys(adapter_sd, expected, hp, params["n_layers"], where)
    state: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor, source: str) -> None:
        if tensor.shape != expected[key].shape:
            raise shape_error(key, tensor, expected[key], source, tokenizer_path,
                              f"{llama_dir / llama_type / 'params.json'} and {where}")
        # cast and move one tensor at a time: the file's copy is freed as it goes
        state[key] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor

    for key in list(adapter_sd):
        put(key, adapter_sd.pop(key), where)
    base, files = read_base_shards(llama_dir / llama_type, params["n_layers"])
    base_where = f"LLaMA weights {files[0] if len(files) == 1 else llama_dir / llama_type / 'consolidated.*.pth'}"
    for key in list(base):
        tensor = base.pop(key)
        if LLAMA + key not in state:  # the checkpoint's fine-tuned norms replace the base ones
            put(LLAMA + key, tensor, base_where)
    unfilled = [k for k in expected if k not in state]
    if unfilled:
        raise CheckpointError(f"no file provides {len(unfilled)} tensor(s) of the model: {listing(unfilled)}")
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or any(not k.startswith(ENCODER) for k in result.missing_keys):
        raise CheckpointError(f"loading the official files failed: {result}")  # keys were checked: a bug
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left on the meta device after loading: {listing(left)}")
    if isinstance(imagebind, str):  # the registered model it is, recorded as `surgery.build` records it
        _mark_registered(model, config, imagebind)
    return model.to(device).eval()


def checkpoint_config(hp: Mapping[str, Any], imagebind: Any, **llama: Any) -> Any:
    """The `ImageBindLLMConfig` of a 7B.pth whose hyper-parameters are `hp` (`checkpoint_hparams`),
    with encoder config `imagebind` and the LLaMA fields given (params.json's, or those the file shows)."""
    from .config import ImageBindLLMConfig

    return ImageBindLLMConfig(**llama, lora_rank=hp["lora_rank"], phase=hp["phase"],
                              legacy_bridge=hp["legacy_bridge"], query_layer=hp["query_layer"], imagebind=imagebind)


def check_official_keys(state_dict: Mapping[str, torch.Tensor], expected: Iterable[str], hp: Mapping[str, Any],
                        n_layers: int, where: str) -> None:
    """A 7B.pth's keys against the state-dict keys `expected` of the model its tensors describe:
    every key one that 7B.pth carries, and every such key there. `load_official` and the checkpoint
    layout both check so."""
    expected = list(expected)
    known = set(expected)
    shape = (f"{hp['phase']} phase, query_layer={hp['query_layer']}"
             + (", legacy_bridge" if hp["legacy_bridge"] else "") + f", {n_layers} layers")
    unexpected = sorted((k for k in state_dict if k not in known or not is_official_key(k)), key=natural_key)
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} unexpected key(s) for the architecture its tensors "
                              f"describe ({shape}): {listing(unexpected)}")
    missing = [k for k in expected if is_official_key(k) and k not in state_dict]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} key(s) of the architecture its tensors describe "
                              f"({shape}): {listing(missing)}")


def _mark_registered(model: nn.Module, config: Any, imagebind: str) -> None:
    """Record the registered model `model` is (name and safe arguments, as `surgery.build` does),
    when one fits, so that a `surgery.save` file of it names its model for the command line."""
    from surgery.state import mark_built
    from surgery_plugins.imagebind.loading import registered_kwargs

    from .layouts import registered_fit

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fit = registered_fit(shapes, config, imagebind=imagebind,
                         encoder_kwargs=registered_kwargs(model.image_bind, imagebind), complete=True)
    if fit is not None:
        mark_built(model, *fit)


# -- save ----------------------------------------------------------------------------------------------


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What 7B.pth holds of `model` (convert_ckpt.py's subset), as plain contiguous CPU tensors."""
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for k, v in model.state_dict().items() if is_official_key(k)}


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state dict under its own key names (the imagebind_w3D.pth layout)."""
    return {k[len(ENCODER):]: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for k, v in model.state_dict().items() if k.startswith(ENCODER)}


def _write(path: Path, state_dict: dict[str, torch.Tensor], wrap: bool) -> Path:
    """A .safetensors file (a flat state dict), else torch.save of `{'model': ...}` (wrap) or the dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        write_atomically(path, lambda tmp: save_file(state_dict, str(tmp)))
    else:
        write_atomically(path, lambda tmp: torch.save({"model": state_dict} if wrap else state_dict, tmp))
    return path


def save_official(model: nn.Module, path: str | os.PathLike, *, imagebind_path: str | os.PathLike | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write `model` as the released files: `path` as 7B.pth (`{'model': subset}`; a `.safetensors`
    path holds the subset flat) and, with `imagebind_path`, the encoder as imagebind_w3D.pth (its
    state dict, at its current CLS-token counts). `dtype` casts the floating tensors (default: as in
    the model). Only plain tensors and dicts are pickled, so `load_official` (and upstream's
    `llama.load`) reads them weights-only. Each file appears complete or not at all.

    Head modes are not part of the official layout (upstream reads token 0): pass `head_mode=` to
    `load_official`, or use `surgery.save`, which records them."""
    from .model import ImageBindLLM

    if not isinstance(model, ImageBindLLM):
        raise CheckpointError(f"save_official writes an ImageBindLLM, got {type(model).__name__}")
    files = [(Path(path), official_state_dict(model), True)]
    if imagebind_path is not None:
        files.append((Path(imagebind_path), encoder_state_dict(model), False))
    for target, _, _ in files:  # both places checked before either file is written
        if target.is_dir() or not target.parent.is_dir():
            why = "it is a directory" if target.is_dir() else f"folder {target.parent} does not exist"
            raise CheckpointError(f"cannot save to {target}: {why}")
    for target, sd, wrap in files:
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        _write(target, sd, wrap)
    return Path(path)


__all__ = ["load_official", "save_official", "official_state_dict", "encoder_state_dict", "checkpoint_hparams",
           "checkpoint_config", "check_official_keys", "is_official_key", "RELEASES"]
