"""Images from files for the vision backbones: CLIP's preprocessing, shared by every plugin whose
model was trained with it (LLaMA-Adapter V2's CLIP ViT-L/14, ImageBind's vision encoder).

    load_images(["dog.jpg", pil_image], image_size=224)   # (B, 3, 224, 224) fp32

Bicubic resize of the short side, center crop, RGB, [0, 1], OpenAI CLIP's mean and std. Pillow and
torchvision are imported on first use only.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch

from .errors import ModelInputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[str, "os.PathLike[str]", "PIL.Image.Image"]  # noqa: F821


def _to_rgb(image):
    # a named function, not a lambda, so the transform pickles into DataLoader workers
    return image.convert("RGB")


def clip_transform(image_size: int = 224):
    """CLIP's preprocessing: bicubic resize of the short side, center crop, RGB, [0, 1], normalize."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])


def load_images(images: ImageLike | Sequence[ImageLike], image_size: int = 224, *,
                rgb_first: bool = False) -> torch.Tensor:
    """Paths and/or PIL images -> a (B, 3, S, S) fp32 batch through `clip_transform`. Every file is
    checked to decode before any is transformed: a missing or undecodable one is a ModelInputError
    naming it."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if not images:
        raise ModelInputError("load_images needs at least one image (a path or a PIL image)")
    for path in dict.fromkeys(i for i in images if not isinstance(i, Image.Image)):
        _check_decodes(path)
    transform = clip_transform(image_size)
    batch = []
    for item in images:
        if isinstance(item, Image.Image):
            batch.append(transform(item.convert("RGB") if rgb_first else item))
            continue
        with Image.open(item) as image:  # closes the file; the transform reads the pixels first
            batch.append(transform(image.convert("RGB") if rgb_first else image))
    return torch.stack(batch)  # (B, 3, S, S)


def _check_decodes(path: str | os.PathLike) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise ModelInputError(f"image {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ModelInputError(f"image {path}: not an image Pillow can decode ({exc}); give a PNG, JPEG, "
                              f"WebP ... file") from None


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ImageLike", "clip_transform", "load_images"]
