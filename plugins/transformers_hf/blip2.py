"""BLIP-2 and InstructBLIP: the Q-Former's learned queries (`num_query_tokens`).

    query_tokens (1, Q, D_qformer) -> Q-Former (cross-attends to the image) -> Q outputs
    -> language_projection -> Q image embeddings, scattered into the prompt at its Q image tokens

`num_query_tokens` is `model.query_tokens` (the queries have no positional rows) and
`config.num_query_tokens`, which `generate()` without a prompt reads to write Q image tokens, and
the image-text matching head reads to find where the text starts. A prompt, though, is made
outside the model: it must carry exactly Q image tokens (`config.image_token_index`), or the
image embeddings do not fit it. `image_prompt(model, text_ids)` writes one for the model's count
now, and `sync_processor(processor, model)` sets a `Blip2Processor` / `InstructBlipProcessor`
to it, so prompts follow a resize.

A Q-Former trained with 32 queries has used all 32 together; see docs/transformers.md for what
keeping 8 of them, or adding new ones, means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.errors import ModelInputError
from surgery.site import TokenSite, TokenTensor

from .common import build, config_counters, images, seeded, tensors_of

BACKBONE = "hf_blip2"
MIN_NOTE = "with no queries the Q-Former gives the language model no image at all"


def classes() -> tuple[type, ...]:
    import transformers as hf

    return (hf.Blip2Model, hf.Blip2ForConditionalGeneration, hf.Blip2ForImageTextRetrieval,
            hf.Blip2VisionModelWithProjection, hf.InstructBlipModel, hf.InstructBlipForConditionalGeneration)


def sites(model: nn.Module) -> list[TokenSite]:
    return [TokenSite(
        name="num_query_tokens",
        count=model.query_tokens.shape[1],
        tensors=[TokenTensor(model, "query_tokens", axis=1)],
        counters=config_counters(model, "num_query_tokens"),
        min=1, max=None, default_init="normal", note=MIN_NOTE,
        description="the Q-Former's learned queries (= image tokens in the prompt); config.num_query_tokens",
    )]


# -- prompts at the model's count -------------------------------------------------------------------


def image_prompt(model: nn.Module, text_ids: torch.Tensor) -> torch.Tensor:
    """`text_ids` (B, T) with the model's current number of image tokens in front: (B, Q + T)."""
    token = model.config.image_token_index
    if token is None:
        raise ModelInputError(f"{type(model).__name__}: config.image_token_index is None, so prompts carry no image "
                              f"tokens; set it to the tokenizer's image token id")
    if not isinstance(text_ids, torch.Tensor) or text_ids.dim() != 2:
        raise ModelInputError(f"text_ids must be a (batch, length) tensor of token ids, got "
                              f"{getattr(text_ids, 'shape', type(text_ids).__name__)}")
    count = model.config.num_query_tokens
    images = torch.full((text_ids.shape[0], count), token, dtype=text_ids.dtype, device=text_ids.device)
    return torch.cat([images, text_ids], dim=1)


def sync_processor(processor: Any, model: nn.Module) -> Any:
    """Set a BLIP-2 / InstructBLIP processor's `num_query_tokens` to the model's count (after a resize,
    or inside `surgery.tokens(...)`), so the prompts it writes carry that many image tokens."""
    if not hasattr(processor, "num_query_tokens"):
        raise ModelInputError(f"{type(processor).__name__} has no num_query_tokens: not a BLIP-2 / InstructBLIP "
                              f"processor")
    processor.num_query_tokens = model.config.num_query_tokens
    return processor


# -- tiny models ------------------------------------------------------------------------------------

VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
              patch_size=8)
QFORMER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=40,
               max_position_embeddings=32)
VOCAB, IMAGE_TOKEN, BOS = 60, 59, 1  # the tiny language models' vocabulary and special tokens
OPT = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
           max_position_embeddings=64, word_embed_proj_dim=16, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
T5 = dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
          decoder_start_token_id=0, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)


def tiny_config(num_query_tokens: int = 4, language: str = "opt", instruct: bool = False) -> Any:
    """A tiny BLIP-2 (or InstructBLIP) config with an OPT (decoder-only) or T5 (encoder-decoder) language model."""
    import transformers as hf

    text = hf.OPTConfig(**OPT) if language == "opt" else hf.T5Config(**T5)
    config_cls = hf.InstructBlipConfig if instruct else hf.Blip2Config
    return config_cls(vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(),
                      num_query_tokens=num_query_tokens, image_token_index=IMAGE_TOKEN)


def tiny(num_query_tokens: int = 4, language: str = "opt") -> nn.Module:
    """A tiny Blip2ForConditionalGeneration (random weights)."""
    import transformers as hf

    return build(hf.Blip2ForConditionalGeneration, tiny_config(num_query_tokens, language))


def tiny_instruct(num_query_tokens: int = 4) -> nn.Module:
    """A tiny InstructBlipForConditionalGeneration with an OPT language model (random weights)."""
    import transformers as hf

    return build(hf.InstructBlipForConditionalGeneration, tiny_config(num_query_tokens, instruct=True))


def inputs(model: nn.Module) -> tuple:
    """Images and the prompt's text (no image tokens: those depend on the count, see `forward`)."""
    return images(model, model.config.vision_config.image_size), seeded(2, 5, high=IMAGE_TOKEN - 3) + 3


def instruct_inputs(model: nn.Module) -> tuple:
    """Images, the prompt's text, and the instruction the Q-Former reads."""
    return (*inputs(model), seeded(2, 4, high=QFORMER["vocab_size"] - 1) + 1)


def forward(model: nn.Module, pixel_values, text_ids) -> tuple:
    """Logits and the Q-Former's output, for a prompt written at the model's count."""
    out = model(pixel_values=pixel_values, input_ids=image_prompt(model, text_ids))
    return out.logits, out.qformer_outputs.last_hidden_state


def instruct_forward(model: nn.Module, pixel_values, text_ids, instruction) -> tuple:
    out = model(pixel_values=pixel_values, input_ids=image_prompt(model, text_ids), qformer_input_ids=instruction)
    return tensors_of(out, ("logits",)) + (out.qformer_outputs.last_hidden_state,)


MODELS = {
    "hf_blip2_tiny": (tiny, inputs, forward, "tiny BLIP-2 (OPT language model), 4 Q-Former queries"),
    "hf_instructblip_tiny": (tiny_instruct, instruct_inputs, instruct_forward,
                             "tiny InstructBLIP (OPT language model), 4 Q-Former queries"),
}
