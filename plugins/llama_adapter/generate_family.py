"""LLaMA-Adapter V2 in `surgery generate`: its model from the official files, its images from files.

The family's description (options, modalities) is in the command module (`commands.py`); these
are the functions `surgery generate` calls once a generation runs (see `generation.py`).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from surgery.errors import ModelInputError


def load_official(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`loading.load_official` from --checkpoint, --llama-dir/--llama-type and --clip."""
    from .loading import load_official as load

    return load(args.checkpoint, args.llama_dir, args.llama_type, args.clip, device=device, dtype=dtype,
                max_seq_len=args.max_seq_len or 512, v_num_heads=args.v_num_heads)


def read_images(paths: list[str], image_size: int, *, rgb_first: bool = False) -> torch.Tensor:
    """Image files -> (B, 3, S, S) through CLIP's preprocessing; a file that is not a decodable image
    is named in one error."""
    from PIL import Image, UnidentifiedImageError

    from surgery.images import load_images

    for path in dict.fromkeys(paths):  # each file checked once, before any is transformed
        try:
            with Image.open(path) as image:
                image.load()
        except FileNotFoundError:
            raise ModelInputError(f"--image {path}: no such file") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ModelInputError(f"--image {path}: not an image Pillow can decode ({exc}); give a PNG, JPEG, "
                                  f"WebP ... file") from None
    return load_images(paths, image_size, rgb_first=rgb_first)


def read_inputs(model: nn.Module, inputs: dict[str, tuple[list[str], float]], batch: int) -> torch.Tensor:
    """{"image": (one path per prompt, weight)} -> the images (B, 3, S, S) at the CLIP tower's size."""
    paths, _ = inputs["image"]
    like = model.clip_proj.weight
    return read_images(paths, model.config.clip.image_size).to(device=like.device, dtype=like.dtype)


__all__ = ["load_official", "read_images", "read_inputs"]
