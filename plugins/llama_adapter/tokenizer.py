"""LLaMA's sentencepiece tokenizer, the Alpaca prompt template and top-p sampling.

Upstream's interface (`llama/tokenizer.py`, `llama/utils.py`), so generation code reads the same:
`n_words`, `bos_id`, `eos_id`, `pad_id` (-1: LLaMA has no pad piece), `encode(s, bos, eos)`,
`decode(ids)`. `shipped_tokenizer()` is the small tokenizer in the package, with LLaMA's special
ids, that the tiny and bench registered models decode with (`scripts/train_tokenizer.py`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable

import torch

from surgery.errors import CheckpointError, ModelConfigError

SHIPPED_TOKENIZER = Path(__file__).resolve().parent / "data" / "tokenizer.model"
SHIPPED_VOCAB = 1000  # its pieces: the vocab_size of the tiny and bench configs


class Tokenizer:
    """A `sentencepiece.SentencePieceProcessor` with upstream LLaMA's interface."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        from sentencepiece import SentencePieceProcessor

        path = Path(model_path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path} (LLaMA's tokenizer.model, which "
                                  "upstream expects next to the 7B/ folder)")
        self.sp_model = SentencePieceProcessor()
        try:
            # load() reports a bad file through its return value or an exception, depending on the
            # sentencepiece version; both become one error here
            ok = self.sp_model.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a sentencepiece model: {e}") from e
        if ok is False:
            raise CheckpointError(f"{path} is not a sentencepiece model")
        self.model_path = path
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for LLaMA: no pad piece

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        ids = self.sp_model.encode(s)
        # a model trained without the control piece would silently emit -1 here: refuse instead
        if bos:
            ids = [self._control("bos", self.bos_id), *ids]
        if eos:
            ids = [*ids, self._control("eos", self.eos_id)]
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.sp_model.decode(list(ids))

    def _control(self, name: str, value: int) -> int:
        if value < 0:
            raise ModelConfigError(f"{self.model_path} has no {name} piece ({name}_id is {value})")
        return value

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.model_path)!r}, n_words={self.n_words}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


@functools.lru_cache(maxsize=1)
def shipped_tokenizer() -> Tokenizer:
    """The package's own tokenizer (read once; it holds no state that decoding changes)."""
    tokenizer = Tokenizer(SHIPPED_TOKENIZER)
    if tokenizer.n_words != SHIPPED_VOCAB:  # a retrained file with another size would misfit every config
        raise ModelConfigError(f"{SHIPPED_TOKENIZER} has {tokenizer.n_words} pieces, the tiny and bench configs "
                               f"expect {SHIPPED_VOCAB}: retrain it with scripts/train_tokenizer.py")
    return tokenizer


# The Alpaca template, character for character as upstream's `format_prompt`: the model was
# fine-tuned on exactly this text, so any change (even whitespace) shifts its outputs.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 (upstream's name)
    """The Alpaca prompt. Only `None` selects the no-input form: an empty string still gets the
    '### Input:' section, as upstream."""
    if input is None:
        return PROMPT_NO_INPUT.format_map({"instruction": instruction})
    return PROMPT_INPUT.format_map({"instruction": instruction, "input": input})


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling with upstream's rule: probs (B, V) -> token ids (B, 1).

    Sorted by probability, a token is dropped when the mass of the tokens ranked above it already
    exceeds `p` (so the top token always survives and p=0 is greedy); the survivors are
    renormalised and one is drawn. `generator` makes the draw reproducible.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (B, V)
    mass_above = torch.cumsum(probs_sort, dim=-1) - probs_sort          # (B, V), exclusive cumsum
    probs_sort = probs_sort.masked_fill(mass_above > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    picked = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (B, 1), sorted rank
    return torch.gather(probs_idx, -1, picked)                           # (B, 1), vocabulary id


__all__ = ["Tokenizer", "shipped_tokenizer", "SHIPPED_TOKENIZER", "SHIPPED_VOCAB", "PROMPT_INPUT", "PROMPT_NO_INPUT",
           "format_prompt", "sample_top_p"]
