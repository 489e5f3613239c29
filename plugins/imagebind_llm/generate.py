"""ImageBind-LLM in `surgery generate`: the model from the official files, the head mode, and the
input files of every modality through ImageBind's own loaders.

The family's description (options, modalities) is in `commands.py`; `surgery generate`
(LLaMA-Adapter V2's plugin, `generation.py`) calls these once a generation runs.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from surgery.errors import ModelInputError
from surgery.images import load_images

NAMES = {"image": "Image", "audio": "Audio", "points": "Point"}  # the model's input names (upstream's)


def load_official(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`loading.load_official` from --checkpoint, --llama-dir/--llama-type, --imagebind and its config."""
    from .loading import load_official as load

    return load(args.checkpoint, args.llama_dir, args.imagebind, llama_type=args.llama_type,
                imagebind=args.imagebind_config, device=device, dtype=dtype, max_seq_len=args.max_seq_len or 512,
                head_mode=args.head_mode)


def prepare(model: nn.Module, args: argparse.Namespace) -> None:
    """--head-mode on the encoder (before --set: a resize keeps it)."""
    if args.head_mode is not None:
        model.image_bind.set_head_mode(args.head_mode)


def read_inputs(model: nn.Module, inputs: dict[str, tuple[list[str], float]], batch: int) -> dict[str, list]:
    """{"image" / "audio" / "points": (one path per prompt, weight)} -> {"Image": [tensor, weight], ...},
    each modality prepared as ImageBind's loaders do, at the encoder's sizes."""
    from surgery_plugins.imagebind.point_loading import load_and_transform_point_cloud_data
    from surgery_plugins.imagebind.transforms import load_and_transform_audio_data

    encoder = model.image_bind
    config = encoder.config.modalities
    like = model.prefix_query.weight
    prepared = {}
    for modality, (paths, weight) in inputs.items():
        name = NAMES[modality]
        model.modality(name)  # an encoder without this modality: one error naming those it has
        if modality == "image":
            x = load_images(paths, config["vision"].input_size[-1], rgb_first=True)  # as ImageBind's loader
        elif modality == "audio":
            mel_bins, frames = config["audio"].input_size
            try:
                x = load_and_transform_audio_data(paths, num_mel_bins=mel_bins, target_length=frames)
            except ModuleNotFoundError as exc:
                raise ModelInputError(f"--audio: {exc}") from None
            except (OSError, RuntimeError) as exc:
                raise ModelInputError(f"--audio {paths[0] if len(set(paths)) == 1 else paths}: not an audio "
                                      f"file torchaudio can decode ({exc})") from None
        else:
            point = config["point"]
            x = load_and_transform_point_cloud_data(paths, num_points=point.input_size[0], min_points=point.num_groups)
        prepared[name] = [x.to(device=like.device, dtype=like.dtype), weight]
    return prepared


__all__ = ["load_official", "prepare", "read_inputs"]
