"""Sweep metric for LLaMA-Adapter V2 and ImageBind-LLM: `caption`, the negative log-likelihood of
captions given their image (and a few greedy generations saved with the cell, so a count's effect
can be read, not only measured).

Each caption is scored as `prompt + caption + EOS` through the model's training forward (teacher
forcing; the prompt is not scored), the prompt in the Alpaca template as LLaMA-Adapter V2 was
trained. Training minimises the same NLL. Options and data: docs/sweeps.md.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from surgery import hookimpl
from surgery.errors import MetricDataError
from surgery.sweep.data import SweepData, open_image

BACKBONES = ("llama_adapter_v2", "imagebind_llm")
INSTRUCTION = "Generate caption of this image"


def _is_imagebind_llm(model: nn.Module) -> bool:
    return hasattr(model, "image_bind")


def accepts(data: SweepData, model: nn.Module) -> str | None:
    return None if data.has("image", "text") else "records need an image and a text (the caption)"


def tokenizer(evaluation):
    def make():
        own = getattr(evaluation.model, "tokenizer", None)
        if own is not None:
            return own
        path = evaluation.option("tokenizer")
        if not path:
            raise MetricDataError("the caption metric needs a LLaMA tokenizer: the model has none, so give "
                                  "its tokenizer.model (--tokenizer PATH, or options={'tokenizer': PATH})")
        from .tokenizer import Tokenizer

        tok = Tokenizer(path)
        vocab = evaluation.model.config.vocab_size
        if tok.n_words != vocab:
            raise MetricDataError(f"tokenizer {path} has {tok.n_words} pieces, the model's vocabulary {vocab}: "
                                  f"give the model's own tokenizer.model")
        return tok
    return evaluation.cached(("caption", "tokenizer"), make)


def prompt_ids(evaluation) -> list[int]:
    """The prompt's ids: the instruction in the Alpaca template (option template=False: as it is)."""
    from .tokenizer import format_prompt

    instruction = evaluation.option("prompt") or INSTRUCTION
    text = format_prompt(instruction) if evaluation.option("template", True) else instruction
    ids = tokenizer(evaluation).encode(text, bos=True, eos=False)
    limit = evaluation.model.config.max_seq_len
    if len(ids) >= limit:
        raise MetricDataError(f"the caption prompt takes {len(ids)} tokens, and the model reads at most {limit} "
                              f"(max_seq_len); give a shorter one (option prompt, template=False)")
    return ids


def images(model: nn.Module, records: Sequence[dict[str, Any]]) -> torch.Tensor:
    from surgery.images import load_images

    if _is_imagebind_llm(model):
        size, rgb_first = model.image_bind.config.modalities["vision"].input_size[-1], True
    else:
        size, rgb_first = model.config.clip.image_size, False
    like = next(model.parameters())
    return load_images([open_image(r["image"]) for r in records], size, rgb_first=rgb_first).to(like.device)


def _prepared(evaluation, split: str) -> dict[str, Any]:
    """(images, token rows, label rows) of a split: prompt + caption + EOS, the prompt unscored."""
    def make():
        records = evaluation.data.part(split)
        tok, prompt = tokenizer(evaluation), prompt_ids(evaluation)
        limit = evaluation.model.config.max_seq_len
        rows, labels = [], []
        for r in records:
            caption = tok.encode(r["text"], bos=False, eos=True)
            ids = (prompt + caption)[:limit]
            rows.append(ids)
            labels.append(([0] * len(prompt) + caption)[:limit])
        width = max(len(r) for r in rows)
        device = next(evaluation.model.parameters()).device
        pad = lambda rs: torch.tensor([r + [0] * (width - len(r)) for r in rs], device=device)  # noqa: E731
        return {"x": images(evaluation.model, records), "tokens": pad(rows), "labels": pad(labels),
                "row": {id(r): i for i, r in enumerate(records)}, "records": records}
    return evaluation.cached(("caption", split), make)


def caption(evaluation) -> dict[str, float]:
    p = _prepared(evaluation, "eval")
    total, count = 0.0, 0
    for start in range(0, len(p["tokens"]), evaluation.batch_size):
        part = slice(start, start + evaluation.batch_size)
        scored = int((p["labels"][part, 1:] != 0).sum())
        if scored:
            loss, _ = evaluation.model(p["tokens"][part], p["labels"][part], p["x"][part])
            total += float(loss) * scored
            count += scored
    if count == 0:
        raise MetricDataError("no caption token to score: every caption is empty or cut off by max_seq_len")
    nll = total / count
    evaluation.artifacts["generations"] = generations(evaluation, p)
    return {"caption_nll": nll, "caption_ppl": math.exp(nll)}


def generations(evaluation, p: dict[str, Any]) -> list[dict[str, str]]:
    n = min(int(evaluation.option("generations", 3)), len(p["records"]))
    if n <= 0:
        return []
    model, tok = evaluation.model, tokenizer(evaluation)
    prompts = [prompt_ids(evaluation)] * n
    inputs = {"Image": [p["x"][:n], 1]} if _is_imagebind_llm(model) else p["x"][:n]
    ids = model.generate_tokens(inputs, prompts, max_gen_len=int(evaluation.option("max_gen_len", 24)),
                                temperature=0.0, eos_id=tok.eos_id)
    return [{"image": str(r["image"]) if isinstance(r["image"], str) else f"record {i}", "reference": r["text"],
             "generated": tok.decode(g)} for i, (r, g) in enumerate(zip(p["records"], ids))]


def loss(evaluation, records: Sequence[dict[str, Any]]) -> torch.Tensor:
    p = _prepared(evaluation, "train")
    index = torch.tensor([p["row"][id(r)] for r in records], device=p["tokens"].device)
    return evaluation.model(p["tokens"][index], p["labels"][index], p["x"][index])[0]


@hookimpl
def surgery_register_metrics(register):
    register("caption", caption, values=("caption_nll", "caption_ppl"), backbones=BACKBONES, accepts=accepts,
             loss=loss, higher_is_better=False,
             needs="(image, text) pairs and a LLaMA tokenizer (the model's, or option tokenizer)",
             description="caption NLL and perplexity under teacher forcing, plus a few greedy generations per cell")
