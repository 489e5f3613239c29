"""Sweep metric for timm ViTs (registered by the `timm_vit` plugin): `classify`, top-1 / top-5 on
labelled images, with a cross-entropy training loss so a sweep can train new register tokens on the
task it measures.

Images go through timm's evaluation transform at the model's own input size, channels, mean and
std; labels that are not all integers are ranked in sorted order, as an image folder's classes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgery import hookimpl
from surgery.sweep.data import SweepData, class_indices, open_image

BACKBONE = "timm_vit"


def eval_transform(model: nn.Module):
    """timm's eval transform at the model's input size and channel count."""
    from torchvision import transforms as T

    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(model.patch_embed.img_size)
    channels = model.patch_embed.proj.in_channels
    mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    if channels != len(mean):  # a grey or multispectral model: the config's average for every channel
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
    interpolation = T.InterpolationMode(cfg.get("interpolation", "bicubic") or "bicubic")
    return T.Compose([
        T.Resize(tuple(int(s / crop_pct) for s in size), interpolation=interpolation),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ]), ("L" if channels == 1 else "RGB")


def images(model: nn.Module, records: Sequence[dict[str, Any]]) -> torch.Tensor:
    transform, mode = eval_transform(model)
    like = model.patch_embed.proj.weight
    batch = torch.stack([transform(open_image(r["image"]).convert(mode)) for r in records])
    return batch.to(device=like.device, dtype=like.dtype)


def _split(evaluation, split: str) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """(images, labels, {id(record): row}) of a split, decoded once per worker."""
    def make():
        records = evaluation.data.part(split)
        labels = torch.tensor(class_indices(evaluation.data, records, evaluation.model.num_classes))
        rows = {id(r): i for i, r in enumerate(records)}
        return images(evaluation.model, records), labels.to(evaluation.device), rows
    return evaluation.cached(("timm_vit", split), make)


def accepts(data: SweepData, model: nn.Module) -> str | None:
    if not data.has("image", "label"):
        return "records need an image and a label"
    if getattr(model, "num_classes", 0) == 0:
        return "the model has no classifier head (num_classes=0)"
    try:
        class_indices(data, data.records, model.num_classes)
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return str(exc)
    return None


def classify(evaluation) -> dict[str, float]:
    x, y, _ = _split(evaluation, "eval")
    k = min(5, evaluation.model.num_classes)
    hits1 = hits5 = 0
    for start in range(0, len(y), evaluation.batch_size):
        logits = evaluation.model(x[start:start + evaluation.batch_size])
        top = logits.topk(k, dim=-1).indices
        truth = y[start:start + evaluation.batch_size, None]
        hits1 += int((top[:, :1] == truth).any(-1).sum())
        hits5 += int((top == truth).any(-1).sum())
    values = {"top1": hits1 / len(y)}
    if k == 5:
        values["top5"] = hits5 / len(y)
    return values


def loss(evaluation, records: Sequence[dict[str, Any]]) -> torch.Tensor:
    x, y, row = _split(evaluation, "train")
    index = torch.tensor([row[id(r)] for r in records], device=x.device)
    return F.cross_entropy(evaluation.model(x[index]), y[index])


@hookimpl
def surgery_register_metrics(register):
    register("classify", classify, values=("top1", "top5"), backbones=(BACKBONE,), accepts=accepts, loss=loss,
             needs="records with an image and a label (an image folder, a manifest with image and label "
                   "columns, or the embedded digits)",
             description="classification accuracy: top-1 and top-5 on the eval images")
