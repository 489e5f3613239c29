"""Hugging Face folders: `config.json` + `model.safetensors` (a model), or a PEFT adapter folder.

    model = model_from_folder("dinov2-reg-folder")     # the class its config.json names, random weights
    surgery.load("dinov2-reg-folder", model)           # surgery_checkpoint_layout renames the keys
    surgery.resize(model, num_register_tokens=8)
    model.save_pretrained("resized")                   # transformers' own: the config follows the count

    surgery inspect dinov2-reg-folder                  # the same, from the command line: the layout
    surgery resize dinov2-reg-folder --set num_register_tokens=8 -o resized   # builds and saves it

`config.json` is read as data. Its `model_type` must be one this plugin supports, and the class
is the one its `architectures` names only when that name is in this plugin's table for that
type (else the type's base model): nothing the file names is imported, no remote code is ever
trusted. The weights are read with safetensors (a sharded folder's index may name only
`.safetensors` files in the folder itself). transformers keeps checkpoints under their released
key names (`attention.attention.query`), which its loader renames to the modules' names
(`attention.q_proj`); the layout applies the same renaming, from transformers' own conversion
table for the class, so the keys are the model's. The layout builds its model itself (`build`:
no registered model has a folder's sizes) and writes one back as a folder (`save`: transformers'
`save_pretrained`, into a temporary folder renamed into place). config.json's sizes are data too:
its layer counts and other numbers are checked against the weights before transformers reads them
(`check_config_sizes`), and the models built from it (the key-name skeleton here, the model the
core builds) are built on the meta device first and stopped once larger than the folder's tensors
justify (`surgery.model_source.build_on_meta`).

A PEFT prompt- or prefix-tuning adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
the one tensor `prompt_embeddings`) is a partial checkpoint: its rows go to the `default`
adapter's embedding and the base model keeps its weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from surgery.checkpoint import read_checkpoint
from surgery.checkpoint_io import write_folder_atomically
from surgery.errors import CheckpointError, short_repr
from surgery.layouts import Layout
from surgery.model_source import SIZE_MARGIN, SizeLimit, build_on_meta, large_allowed

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_JSON_BYTES = 16 << 20  # a config or a shard index; more is not one
SHARD_NAME = re.compile(r"^[\w.-]+\.safetensors$")  # a file in the folder itself, nothing else
LAYER_COUNT = re.compile(r"(layers|depths)$")  # config keys that count layers: num_hidden_layers, depths

# model_type -> the classes a folder of that type may be built as (the first: when `architectures`
# names none of them). Names are looked up in this table only, then taken from `transformers`.
CLASSES = {
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification",
                              "Dinov2WithRegistersBackbone"),
    "blip-2": ("Blip2Model", "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval",
               "Blip2VisionModelWithProjection"),
    "instructblip": ("InstructBlipModel", "InstructBlipForConditionalGeneration"),
    "detr": ("DetrModel", "DetrForObjectDetection", "DetrForSegmentation"),
    "conditional_detr": ("ConditionalDetrModel", "ConditionalDetrForObjectDetection",
                         "ConditionalDetrForSegmentation"),
    "vit": ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling"),
    "deit": ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
             "DeiTForMaskedImageModeling"),
}
PEFT_KINDS = ("PROMPT_TUNING", "PREFIX_TUNING")
PEFT_ADAPTER = "default"  # the adapter name PeftModel.from_pretrained gives a loaded adapter


def _json(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is {path.stat().st_size} bytes, more than a config ({MAX_JSON_BYTES})")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def model_class(config: dict, where: Path | str = "config.json") -> type:
    """The transformers class for a config.json's data, chosen from this plugin's table."""
    import transformers

    model_type = config.get("model_type")
    names = CLASSES.get(model_type) if isinstance(model_type, str) else None
    if names is None:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not one the transformers plugin supports; "
                              f"supported: {', '.join(sorted(CLASSES))}")
    named = config.get("architectures")
    named = [a for a in named if a in names] if isinstance(named, list) else []
    return getattr(transformers, named[0] if named else names[0])


def model_config(config: dict, cls: type) -> Any:
    """The class's config from config.json's data (plain values only; `auto_map`, which points at
    remote code, is dropped)."""
    data = {k: v for k, v in config.items() if k != "auto_map"}
    try:
        return cls.config_class.from_dict(data)
    except Exception as exc:  # noqa: BLE001 - transformers validates the values its own way
        raise CheckpointError(f"config.json does not make a {cls.config_class.__name__}: "
                              f"{type(exc).__name__}: {exc}") from exc


def builder(config: dict, cls: type) -> Callable[[], nn.Module]:
    """A function building `cls` from config.json's data, random weights, eval mode, on the current
    default device (each call with a config of its own: a resize changes the model's)."""
    return lambda: cls(model_config(config, cls)).eval()


def model_from_folder(folder: str | Path) -> nn.Module:
    """The model a Hugging Face folder holds, built from its config.json with random weights (eval
    mode), on the current default device; `surgery.load(folder, model)` then gives it the weights."""
    folder = Path(folder)
    config = _json(folder / CONFIG)
    return builder(config, model_class(config, folder / CONFIG))()


def save_folder(model: nn.Module, path: Path) -> None:
    """Write `model` as a Hugging Face folder at `path` (transformers' `save_pretrained`: the
    config at the model's counts), atomically; an existing folder is replaced only when it is
    a folder of files with a config.json."""
    if not callable(getattr(model, "save_pretrained", None)):
        raise CheckpointError(f"cannot write {path} as a Hugging Face folder: a {type(model).__name__} has no "
                              f"save_pretrained (not a transformers model)")
    write_folder_atomically(path, lambda tmp: model.save_pretrained(tmp), marker=CONFIG)


# -- reading the weights ----------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    index = _json(folder / INDEX)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder / INDEX} has no weight_map")
    names = sorted({v for v in weight_map.values()}, key=str)
    bad = [n for n in names if not (isinstance(n, str) and SHARD_NAME.match(n))]
    if bad:
        raise CheckpointError(f"{folder / INDEX} names {bad[0]!r}: shards must be .safetensors files in the folder "
                              f"itself")
    return [folder / n for n in names]


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        tensors, _ = read_checkpoint(file)
        twice = next((k for k in tensors if k in state_dict), None)
        if twice is not None:
            raise CheckpointError(f"{folder}: tensor {twice!r} is in two shards")
        state_dict.update(tensors)
    return state_dict


def model_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """{checkpoint key: the model's key}, renamed as transformers' loader renames them for `model`
    (its conversion table; transformers 4, which keeps module names in files, renames nothing)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return {k: k for k in keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    renamed = {}
    for key in keys:
        new, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if converted is not None:
            raise CheckpointError(f"checkpoint key {key!r} is converted by transformers' loader (not only renamed); "
                                  f"open this folder with from_pretrained instead")
        renamed[key] = new
    return renamed


def check_config_sizes(config: dict, state_dict: dict[str, torch.Tensor], where: Path) -> None:
    """config.json's numbers against the folder's weights, before transformers reads them: its config
    classes already work in proportion to a layer count (DINOv2's stage names), before any module
    exists. A layer count (a key ending in `layers` or `depths`, in any sub-config) is at most the
    tensors the weights hold, as every layer has weights; any other integer at most the elements
    they justify (`SizeLimit`). Within `allowing_large()` (--allow-large) neither is checked."""
    if large_allowed():
        return
    limit = SizeLimit.of(state_dict)
    trust = "nothing was built. If you trust the file, pass --allow-large (allow_large=True)"
    stack: list[tuple[str, Any]] = [("", config)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
            continue
        numbers = value if isinstance(value, list) else [value]
        numbers = [n for n in numbers if isinstance(n, int) and not isinstance(n, bool)]
        if LAYER_COUNT.search(path) and (sum(numbers) > limit.tensors or len(numbers) > limit.tensors):
            raise CheckpointError(f"{where}: {path}={short_repr(value)} asks for more layers than the folder's "
                                  f"weights have tensors ({limit.tensors:,}); {trust}")
        big = next((n for n in numbers if n > limit.elements), None)
        if big is not None:
            raise CheckpointError(f"{where}: {path} holds {big:,}, more than the folder's weights justify (their "
                                  f"{limit.justified:,} elements plus a margin of {SIZE_MARGIN:,}); {trust}")
        if isinstance(value, list):
            stack.extend((path, v) for v in value if isinstance(v, (dict, list)))


def model_layout(folder: Path) -> Layout:
    config = _json(folder / CONFIG)
    cls = model_class(config, folder / CONFIG)
    build = builder(config, cls)
    state_dict = _read_weights(folder)
    check_config_sizes(config, state_dict, folder / CONFIG)
    # only for its key names, on the meta device: stopped once larger than the weights justify
    skeleton = build_on_meta(build, f"a {cls.__name__} as its config.json describes", justified_by=state_dict,
                             where=f"Hugging Face folder {folder}", failed=lambda exc: CheckpointError(
                                 f"{folder / CONFIG} does not build a {cls.__name__}: {type(exc).__name__}: {exc}"))
    names = model_keys(skeleton, list(state_dict))
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if names[key] in renamed:
            raise CheckpointError(f"{folder}: two tensors are renamed to {names[key]!r}")
        renamed[names[key]] = tensor
    return Layout(f"Hugging Face {config['model_type']} folder ({cls.__name__})", renamed, build=build,
                  save=save_folder)


def adapter_layout(folder: Path) -> Layout | None:
    config = _json(folder / ADAPTER_CONFIG)
    if config.get("peft_type") not in PEFT_KINDS:
        return None
    tensors, _ = read_checkpoint(folder / ADAPTER_WEIGHTS)
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: a {config['peft_type']} adapter holds the one tensor "
                              f"'prompt_embeddings', this file has {sorted(tensors)[:5]}")
    key = f"prompt_encoder.{PEFT_ADAPTER}.embedding.weight"
    return Layout(f"PEFT {config['peft_type'].lower()} adapter folder", {key: tensors["prompt_embeddings"]},
                  partial=True)


def recognise(path: Path, state_dict: Any) -> Layout | None:
    """The hook's work: a folder with config.json and model weights, or a PEFT prompt adapter."""
    if state_dict is not None or not path.is_dir():
        return None
    if (path / CONFIG).is_file() and ((path / WEIGHTS).is_file() or (path / INDEX).is_file()):
        if _json(path / CONFIG).get("model_type") not in CLASSES:
            return None  # another plugin's folder, perhaps
        return model_layout(path)
    if (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file():
        return adapter_layout(path)
    return None
