"""Backbone plugin for Hugging Face `transformers` (and `peft`) models: their learned-token counts.

| backbone | models | sites |
|---|---|---|
| `hf_dinov2_registers` | Dinov2WithRegisters: Model/classifier/Backbone | `num_register_tokens` (`class_token` fixed) |
| `hf_blip2` | BLIP-2 (4 classes) and InstructBLIP (2) with query tokens | `num_query_tokens` |
| `hf_detr` | DETR / Conditional DETR: Model, ForObjectDetection, ForSegmentation | `num_queries` |
| `hf_vit` | ViT / DeiT models | `class_token`, `distillation_token`: fixed |
| `hf_peft_prompt` | PeftModel with prompt- or prefix-tuning adapters | `num_virtual_tokens` |

One family per file (`dinov2.py`, `blip2.py`, `detr.py`, `vit.py`, `peft_prompts.py`); Hugging
Face folders are read by `folders.py` (the `surgery_checkpoint_layout` hook). transformers and
peft are optional (`pip install "token-surgery[transformers]"`): without transformers this module
raises `PluginUnavailableError` on import, so `surgery plugins` lists the plugin as unavailable
with what to install and every other plugin loads as usual; without peft, the PEFT backbone and
its models are not registered. Nothing here imports transformers until a model is built or
identified as one of its own (a detect first checks the model's module name).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from types import ModuleType
from typing import Callable

from torch import nn

from surgery import hookimpl
from surgery.errors import PluginUnavailableError

INSTALL = 'pip install "token-surgery[transformers]"'
MIN_TRANSFORMERS = (4, 40)


def _version(name: str) -> tuple[int, ...]:
    parts = []
    for piece in importlib.metadata.version(name).split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _installed(name: str) -> bool:
    """Whether `name` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder refusing it; sys.modules[name] = None
        return False


def _require_transformers() -> None:
    """Unavailable (not failed) without transformers, or with one older than this plugin reads."""
    if not _installed("transformers"):
        raise PluginUnavailableError(f"the transformers plugin needs the optional dependency transformers, which is "
                                     f"not installed: {INSTALL}")
    if _version("transformers") < MIN_TRANSFORMERS:
        raise PluginUnavailableError(f"the transformers plugin needs transformers >= "
                                     f"{'.'.join(map(str, MIN_TRANSFORMERS))}, found "
                                     f"{importlib.metadata.version('transformers')}: {INSTALL}")


_require_transformers()
HAS_PEFT = _installed("peft")

from . import blip2, detr, dinov2, folders, peft_prompts, vit  # noqa: E402 - after the dependency check

# backbone -> (its family's module, the module-name prefixes of its models' classes)
FAMILIES: dict[str, tuple[ModuleType, tuple[str, ...]]] = {
    dinov2.BACKBONE: (dinov2, ("transformers.models.dinov2_with_registers.",)),
    blip2.BACKBONE: (blip2, ("transformers.models.blip_2.", "transformers.models.instructblip.")),
    detr.BACKBONE: (detr, ("transformers.models.detr.", "transformers.models.conditional_detr.")),
    vit.BACKBONE: (vit, ("transformers.models.vit.", "transformers.models.deit.")),
}
DESCRIPTIONS = {
    dinov2.BACKBONE: "transformers DINOv2 with registers: num_register_tokens",
    blip2.BACKBONE: "transformers BLIP-2 / InstructBLIP: the Q-Former's num_query_tokens",
    detr.BACKBONE: "transformers DETR / Conditional DETR: the decoder's num_queries",
    vit.BACKBONE: "transformers ViT / DeiT: class and distillation tokens (fixed)",
    peft_prompts.BACKBONE: "PEFT prompt / prefix tuning: num_virtual_tokens per adapter",
}
COUNT_KWARGS = {dinov2.BACKBONE: ("num_register_tokens",), blip2.BACKBONE: ("num_query_tokens",),
                detr.BACKBONE: ("num_queries",), vit.BACKBONE: (), peft_prompts.BACKBONE: ("num_virtual_tokens",)}


def _detector(family: ModuleType, prefixes: tuple[str, ...]) -> Callable[[nn.Module], bool]:
    def detect(model: nn.Module) -> bool:
        # the module name first: no transformers import for a model of another library
        return type(model).__module__.startswith(prefixes) and type(model) in family.classes()
    return detect


def is_peft_prompt_model(model: nn.Module) -> bool:
    return HAS_PEFT and type(model).__module__.startswith("peft.") and peft_prompts.is_prompt_model(model)


@hookimpl
def surgery_register_backbones(register):
    for backbone, (family, prefixes) in FAMILIES.items():
        register(backbone, _detector(family, prefixes), description=DESCRIPTIONS[backbone])
    if HAS_PEFT:
        register(peft_prompts.BACKBONE, is_peft_prompt_model, description=DESCRIPTIONS[peft_prompts.BACKBONE])


@hookimpl
def surgery_register_models(register):
    families = [(b, f) for b, (f, _) in FAMILIES.items()]
    families += [(peft_prompts.BACKBONE, peft_prompts)] if HAS_PEFT else []
    for backbone, family in families:
        for name, (factory, inputs, forward, description) in family.MODELS.items():
            register(name, factory, backbone, description=description, example_inputs=inputs, forward=forward,
                     safe_kwargs=COUNT_KWARGS[backbone])


@hookimpl
def surgery_token_sites(model, backbone):
    if backbone == peft_prompts.BACKBONE:
        return peft_prompts.sites(model)
    if backbone in FAMILIES:
        return FAMILIES[backbone][0].sites(model)
    return None


@hookimpl
def surgery_apply_count(model, backbone, change):
    if backbone == peft_prompts.BACKBONE:
        return peft_prompts.apply_count(model, change)
    return None


@hookimpl
def surgery_checkpoint_layout(path, state_dict):
    return folders.recognise(path, state_dict)
