"""ImageBind's text tokenizer: CLIP's byte-level BPE, compatible with upstream's `SimpleTokenizer`.

    tok = BPETokenizer("bpe_simple_vocab_16e6.txt.gz")   # or BPETokenizer() to find an installed copy
    ids = tok(["a dog", "a car"])                          # (2, 77): [SOT, tokens..., EOT, 0...]

EOT is the largest id, which the text head's `argmax` relies on, and a text longer than the context
keeps its EOT (upstream since PR #142). Needs `regex` (CLIP's `\\p{L}` pattern); without `ftfy`, text
that needs its repairs (mojibake, curly quotes) tokenizes differently from upstream.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from surgery.errors import CheckpointError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49408 ids = 512 byte symbols + merges + 2 specials
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation: specials, English contractions, letter runs, single digits, other symbol runs
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Byte -> a printable unicode character: printable Latin-1 bytes stand for themselves, the
    others (controls, space, ...) get the code points from 256 on, in byte order. The mapping's
    order is the vocabulary's: the printable bytes first, then the others."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def default_vocab_path() -> Path:
    """The vocabulary file of an installed `imagebind` or `open_clip` package, if there is one."""
    for package, name in (("imagebind", f"bpe/{VOCAB_FILE}"), ("open_clip", VOCAB_FILE)):
        try:
            path = Path(str(importlib.resources.files(package).joinpath(name)))
        except (ModuleNotFoundError, TypeError):
            continue
        if path.is_file():
            return path
    raise CheckpointError(f"no BPE vocabulary given and none found in an installed imagebind or open_clip package; "
                          f"pass the path of {VOCAB_FILE} (in upstream's repository under imagebind/bpe/)")


def _clean(text: str) -> str:
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ModuleNotFoundError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split())  # every run of whitespace -> one space


class BPETokenizer:
    def __init__(self, vocab_path: str | os.PathLike | None = None, context_length: int = 77) -> None:
        try:
            import regex
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError("the ImageBind tokenizer needs the 'regex' package (pip install regex) for "
                                      "CLIP's unicode-class pattern") from exc
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        if not path.is_file():
            raise CheckpointError(f"BPE vocabulary {path} does not exist (expected {VOCAB_FILE})")
        try:
            lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not a gzip-compressed BPE merges file: {exc}") from exc
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()][:MAX_MERGES]  # line 0: a header
        bad = [" ".join(m) for m in merges if len(m) != 2]
        if bad:
            raise CheckpointError(f"{path}: merge lines must hold two symbols, got {bad[:3]}")
        symbols = list(byte_symbols().values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self.context_length = context_length
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.specials = {SOT: self.sot_id, EOT: self.eot_id}
        self.vocab_size = len(vocab)
        self.vocab_path = path
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._merge)

    def _merge(self, word: str) -> tuple[str, ...]:
        """A pre-token's symbols after applying the merges, lowest rank first, until none applies."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, MAX_MERGES + 1))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # every occurrence, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` (no SOT/EOT added). A literal `<|startoftext|>` or `<|endoftext|>` in
        the text (any case) is that special token's id, as upstream's tokenizer gives it."""
        symbols = byte_symbols()
        ids = []
        for piece in self.pattern.findall(_clean(text).lower()):
            if piece in self.specials:  # the pattern matches them whole; BPE would split them
                ids.append(self.specials[piece])
                continue
            word = "".join(symbols[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        to_byte = {c: b for b, c in byte_symbols().items()}
        text = "".join(self.decoder[int(i)] for i in ids)  # specials and "</w>" are printable symbols
        return bytearray(to_byte[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """(N, context) ids for N texts ((context,) for a single str), zero-padded; EOT always kept."""
        n = context_length or self.context_length
        if n < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {n}")
        single = isinstance(texts, str)
        rows = [texts] if single else list(texts)
        out = torch.zeros(len(rows), n, dtype=torch.long)
        for i, text in enumerate(rows):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            ids = [self.sot_id, *self.encode(text)][: n - 1] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out[0] if single else out


__all__ = ["BPETokenizer", "byte_symbols", "default_vocab_path", "VOCAB_FILE", "PATTERN"]
