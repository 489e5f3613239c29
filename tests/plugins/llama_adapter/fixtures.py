"""Tiny stand-ins for LLaMA-Adapter's external files, built in memory in milliseconds.

* `make_openai_visual_state_dict`: an OpenAI-CLIP-layout visual tower (random weights), with
  the exact key names and shape conventions of `clip.visual.*`.
* `train_tiny_sentencepiece`: a 200-piece sentencepiece model with LLaMA-1's special ids
  (unk 0, bos 1, eos 2, no pad piece so pad_id is -1).

The fixtures in this folder's conftest.py wrap them; import these directly (`from fixtures
import ...`, this folder is on sys.path under pytest) when a test needs other sizes.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

# width 128 -> 2 heads (OpenAI: width // 64); 28 / 14 -> 2x2 patches + class token = 5 tokens
TINY_CLIP = dict(width=128, layers=2, patch_size=14, image_size=28, output_dim=32)

_BLOCK_SHAPES = {  # OpenAI resblock parameter -> shape as a function of width W
    "attn.in_proj_weight": lambda W: (3 * W, W),
    "attn.in_proj_bias": lambda W: (3 * W,),
    "attn.out_proj.weight": lambda W: (W, W),
    "attn.out_proj.bias": lambda W: (W,),
    "ln_1.weight": lambda W: (W,),
    "ln_1.bias": lambda W: (W,),
    "mlp.c_fc.weight": lambda W: (4 * W, W),
    "mlp.c_fc.bias": lambda W: (4 * W,),
    "mlp.c_proj.weight": lambda W: (W, 4 * W),
    "mlp.c_proj.bias": lambda W: (W,),
    "ln_2.weight": lambda W: (W,),
    "ln_2.bias": lambda W: (W,),
}


def openai_visual_shapes(width: int, layers: int, patch_size: int, image_size: int,
                         output_dim: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of OpenAI CLIP's `VisionTransformer` (no prefix)."""
    grid = image_size // patch_size
    shapes = {
        "class_embedding": (width,),
        "positional_embedding": (1 + grid * grid, width),
        "proj": (width, output_dim),
        "conv1.weight": (width, 3, patch_size, patch_size),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for i in range(layers):
        for name, shape in _BLOCK_SHAPES.items():
            shapes[f"transformer.resblocks.{i}.{name}"] = shape(width)
    shapes["ln_post.weight"] = (width,)
    shapes["ln_post.bias"] = (width,)
    return shapes


def make_openai_visual_state_dict(*, width: int = 128, layers: int = 2, patch_size: int = 14,
                                  image_size: int = 28, output_dim: int = 32, prefix: str = "visual.",
                                  seed: int = 0, dtype: torch.dtype = torch.float32,
                                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random OpenAI-layout visual weights. Every tensor gets distinct values (LayerNorm weights
    around 1, biases around 0, matrices at 1/sqrt(fan_in)) so a swapped or transposed key shows up
    in the outputs. `device="meta"` gives shapes only (for ViT-L-sized layout checks)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in openai_visual_shapes(width, layers, patch_size, image_size, output_dim).items():
        if device == "meta" or str(device) == "meta":
            out[prefix + key] = torch.empty(shape, dtype=dtype, device="meta")
            continue
        noise = torch.randn(shape, generator=gen)
        if key.endswith(("ln_pre.weight", "ln_post.weight", "ln_1.weight", "ln_2.weight")):
            value = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            value = 0.1 * noise
        elif key == "conv1.weight":
            value = noise / (3 * patch_size * patch_size) ** 0.5
        elif len(shape) == 2 and key != "positional_embedding":
            fan_in = shape[0] if key == "proj" else shape[1]  # proj is applied as x @ proj
            value = noise / fan_in ** 0.5
        else:  # class_embedding, positional_embedding: OpenAI scales them by width ** -0.5
            value = noise / width ** 0.5
        out[prefix + key] = value.to(dtype=dtype, device=device)
    return out


# Words and punctuation of the Alpaca template plus some captioning vocabulary, so prompts
# round-trip through the tiny model without unknown pieces.
_WORDS = ("below is an instruction that describes a task paired with input provides further context "
          "write response appropriately completes the request what in this image describe picture "
          "cat dog red blue green house tree sky water person running walking small large two of on "
          "Below Write Describe What Instruction Input Response ### : , . ? ! 0 1 2 3").split()
# newlines and headers as the template lays them out (identity normalisation keeps "\n")
_LINES = ("### Instruction:\nDescribe this image.\n\n### Response:",
          "### Instruction:\nWhat is in the picture?\n\n### Input:\na cat, 2 dogs\n\n### Response:")


def tiny_corpus(sentences: int = 500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(sentences)]
    return words + list(_LINES) * 5


def train_tiny_sentencepiece(path: str | Path, vocab_size: int = 200, model_type: str = "bpe") -> Path:
    """Train a sentencepiece model with LLaMA-1's special ids and write it to `path`. Like
    LLaMA's, it keeps text as is (identity normalisation, whitespace kept, digits split), so
    prompts built from the corpus words round-trip exactly."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=buffer, vocab_size=vocab_size,
        model_type=model_type, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True)
    path = Path(path)
    path.write_bytes(buffer.getvalue())
    return path
