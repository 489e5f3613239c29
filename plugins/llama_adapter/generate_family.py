"""LLaMA-Adapter V2 in `surgery generate`: its model from the official files, its images from files.

The family's description (options, modalities) is in the command module (`commands.py`); these
are the functions `surgery generate` calls once a generation runs (see `generation.py`).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from surgery.images import load_images


def load_official(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`loading.load_official` from --checkpoint, --llama-dir/--llama-type and --clip."""
    from .loading import load_official as load

    return load(args.checkpoint, args.llama_dir, args.llama_type, args.clip, device=device, dtype=dtype,
                max_seq_len=args.max_seq_len or 512, v_num_heads=args.v_num_heads)


def read_inputs(model: nn.Module, inputs: dict[str, tuple[list[str], float]], batch: int) -> torch.Tensor:
    """{"image": (one path per prompt, weight)} -> the images (B, 3, S, S) at the CLIP tower's size."""
    paths, _ = inputs["image"]
    like = model.clip_proj.weight
    return load_images(paths, model.config.clip.image_size).to(device=like.device, dtype=like.dtype)


__all__ = ["load_official", "read_inputs"]
