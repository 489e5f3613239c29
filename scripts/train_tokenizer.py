"""Train the sentencepiece tokenizer shipped with the LLaMA-Adapter plugin.

    python scripts/train_tokenizer.py                       # rewrites plugins/llama_adapter/data/tokenizer.model
    python scripts/train_tokenizer.py --out /tmp/tok.model  # anywhere else (the test retrains it this way)

The tiny and bench registered models of LLaMA-Adapter V2 and ImageBind-LLM decode with it, so
that a model with random weights still writes text. It is trained on the repository's own corpus
(plugins/llama_adapter/data/corpus.txt, original sentences in the Alpaca style about images,
tokens and models) with LLaMA-1's conventions: BPE, unk 0, bos 1, eos 2, no pad piece (-1), text
kept as it is (identity normalisation, whitespace kept, a dummy prefix), digits split, unknown
characters as bytes (byte fallback), so any prompt encodes and decodes back exactly.

Training is deterministic: one thread, the corpus read in order and in full, fixed options. Its
vocabulary size is the `vocab_size` of the tiny and bench configs (TOKENIZER_VOCAB there).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "plugins" / "llama_adapter" / "data"
CORPUS = DATA / "corpus.txt"
OUTPUT = DATA / "tokenizer.model"
VOCAB_SIZE = 1000

# Every option that changes the result, fixed; LLaMA-1's tokenizer.model has the same special ids,
# normaliser, digit splitting and byte fallback.
OPTIONS = dict(
    model_type="bpe", vocab_size=VOCAB_SIZE, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
    split_digits=True, byte_fallback=True, character_coverage=1.0, max_sentence_length=4096,
    input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
)


def corpus_lines(path: Path = CORPUS) -> list[str]:
    """The corpus's non-empty lines, in order."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train(out: Path = OUTPUT, corpus: Path = CORPUS) -> Path:
    """Train on `corpus` and write the model to `out`; returns `out`."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines(corpus)), model_writer=buffer, **OPTIONS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help=f"where to write the model (default {OUTPUT})")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help=f"training text (default {CORPUS})")
    args = parser.parse_args(argv)
    path = train(args.out, args.corpus)
    print(f"wrote {path} ({VOCAB_SIZE} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
