"""Sweep metrics for ImageBind: zero-shot classification (`zeroshot`) and cross-modal retrieval
(`retrieval`) in the joint embedding space (their values and data: docs/sweeps.md).

Similarity is the cosine of the embeddings (a head in mode `all`: the mean of its k, renormalised);
a rank counts the other candidates scoring strictly higher. Both train with a softmax over those
similarities at temperature 0.07 (upstream's initial text scale).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgery import hookimpl
from surgery.sweep.data import SweepData, open_image

BACKBONE = "imagebind"
MODALITIES = {"image": "vision", "audio": "audio"}  # record field -> ImageBind modality
PROMPTS = {"vision": "a photo of a {}.", "audio": "a sound of a {}."}
TEMPERATURE = 0.07


def data_modality(data: SweepData, model: nn.Module) -> tuple[str, str] | None:
    """(record field, modality) of the first item field the data has and the model encodes."""
    return next(((f, m) for f, m in MODALITIES.items() if data.has(f) and m in model.modalities), None)


def _needs(data: SweepData, model: nn.Module, second: str) -> str | None:
    if "text" not in model.modalities:
        return "the model has no text encoder"
    if data_modality(data, model) is None:
        have = [f for f in MODALITIES if MODALITIES[f] in model.modalities]
        return f"records need one of {', '.join(have) or 'no field this model encodes'}"
    if not data.has(second):
        return f"records need a {second}"
    return None


def tokenizer(evaluation):
    from .tokenizer import BPETokenizer

    context = evaluation.model.config.modalities["text"].context_length
    return evaluation.cached(("imagebind", "tokenizer"), lambda: BPETokenizer(evaluation.option("tokenizer"),
                                                                              context_length=context))


def _items(evaluation, field: str, modality: str, records: Sequence[dict[str, Any]]) -> torch.Tensor:
    from surgery.images import load_images

    from .transforms import load_and_transform_audio_data

    like = next(evaluation.model.parameters())
    if modality == "vision":
        size = evaluation.model.config.modalities["vision"].input_size[-1]
        x = load_images([open_image(r[field]) for r in records], size, rgb_first=True)
    else:
        x = load_and_transform_audio_data([r[field] for r in records])
    return x.to(device=like.device, dtype=like.dtype)


def embed(model: nn.Module, modality: str, x: torch.Tensor) -> torch.Tensor:
    """Unit embeddings (B, E); a head in mode `all` gives (B, k, E): their mean, renormalised."""
    e = model.encode(modality, x)
    return F.normalize(e.float().mean(1) if e.dim() == 3 else e.float(), dim=-1)


def _prepared(evaluation, split: str, second: str) -> dict[str, Any]:
    """The split's items and texts (or labels), decoded and tokenized once per worker."""
    def make():
        field, modality = data_modality(evaluation.data, evaluation.model)
        records = evaluation.data.part(split)
        prepared = {"modality": modality, "x": _items(evaluation, field, modality, records),
                    "row": {id(r): i for i, r in enumerate(records)}}
        device = prepared["x"].device
        if second == "label":
            classes = evaluation.data.classes
            template = evaluation.option("prompt") or PROMPTS[modality]
            prepared["prompts"] = tokenizer(evaluation)([template.format(c) for c in classes]).to(device)
            prepared["y"] = torch.tensor([classes.index(str(r["label"])) for r in records], device=device)
        else:
            prepared["texts"] = tokenizer(evaluation)([r["text"] for r in records]).to(device)
        return prepared
    return evaluation.cached(("imagebind", split, second), make)


def _embed_rows(evaluation, modality: str, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([embed(evaluation.model, modality, chunk) for chunk in evaluation.batches(x)])


def topk_hits(scores: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of rows whose true column is among the k highest (others strictly higher counted)."""
    true_score = scores.gather(1, truth[:, None])
    rank = (scores > true_score).sum(1)
    return float((rank < k).float().mean())


def zeroshot(evaluation) -> dict[str, float]:
    p = _prepared(evaluation, "eval", "label")
    items = _embed_rows(evaluation, p["modality"], p["x"])
    classes = embed(evaluation.model, "text", p["prompts"])
    scores = items @ classes.T
    values = {"zeroshot_top1": topk_hits(scores, p["y"], 1)}
    if classes.shape[0] >= 5:
        values["zeroshot_top5"] = topk_hits(scores, p["y"], 5)
    return values


def retrieval(evaluation) -> dict[str, float]:
    p = _prepared(evaluation, "eval", "text")
    items = _embed_rows(evaluation, p["modality"], p["x"])
    texts = torch.cat([embed(evaluation.model, "text", chunk) for chunk in evaluation.batches(p["texts"])])
    scores = items @ texts.T
    truth = torch.arange(len(items), device=scores.device)
    return {"recall@1_x2t": topk_hits(scores, truth, 1), "recall@5_x2t": topk_hits(scores, truth, 5),
            "recall@1_t2x": topk_hits(scores.T, truth, 1), "recall@5_t2x": topk_hits(scores.T, truth, 5)}


def _batch(evaluation, records, second: str):
    p = _prepared(evaluation, "train", second)
    index = torch.tensor([p["row"][id(r)] for r in records], device=p["x"].device)
    return p, index


def zeroshot_loss(evaluation, records) -> torch.Tensor:
    p, index = _batch(evaluation, records, "label")
    items = embed(evaluation.model, p["modality"], p["x"][index])
    classes = embed(evaluation.model, "text", p["prompts"])
    return F.cross_entropy(items @ classes.T / TEMPERATURE, p["y"][index])


def retrieval_loss(evaluation, records) -> torch.Tensor:
    p, index = _batch(evaluation, records, "text")
    items = embed(evaluation.model, p["modality"], p["x"][index])
    texts = embed(evaluation.model, "text", p["texts"][index])
    logits = items @ texts.T / TEMPERATURE
    truth = torch.arange(len(index), device=logits.device)
    return (F.cross_entropy(logits, truth) + F.cross_entropy(logits.T, truth)) / 2


@hookimpl
def surgery_register_metrics(register):
    register("zeroshot", zeroshot, values=("zeroshot_top1", "zeroshot_top5"), backbones=(BACKBONE,),
             accepts=lambda data, model: _needs(data, model, "label"), loss=zeroshot_loss,
             needs="records with an image (or audio) and a label, a model with that modality and text, and "
                   "ImageBind's BPE vocabulary (option tokenizer)",
             description="zero-shot classification against a text prompt per class: top-1 and top-5")
    register("retrieval", retrieval, values=("recall@1_x2t", "recall@5_x2t", "recall@1_t2x", "recall@5_t2x"),
             backbones=(BACKBONE,), accepts=lambda data, model: _needs(data, model, "text"), loss=retrieval_loss,
             needs="(image or audio, text) pairs, a model with that modality and text, and ImageBind's BPE "
                   "vocabulary (option tokenizer)",
             description="cross-modal retrieval Recall@1/5, item to text and text to item")
