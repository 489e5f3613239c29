"""The tokenizer shipped in the package: reproducible from the repository's corpus, LLaMA's special
ids, exact round trips, and the registered tiny / bench models decode with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import surgery
from surgery_plugins.llama_adapter.tokenizer import SHIPPED_TOKENIZER, SHIPPED_VOCAB, format_prompt, shipped_tokenizer

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "train_tokenizer.py"


def pieces(path: Path) -> list[tuple[str, float]]:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]


def test_the_script_retrains_the_shipped_model_exactly(tmp_path):
    out = tmp_path / "tokenizer.model"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert pieces(out) == pieces(SHIPPED_TOKENIZER)
    assert out.read_bytes() == SHIPPED_TOKENIZER.read_bytes()  # options and normaliser too


def test_llama_conventions():
    sp = spm.SentencePieceProcessor(model_file=str(SHIPPED_TOKENIZER))
    assert sp.vocab_size() == SHIPPED_VOCAB
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    tok = shipped_tokenizer()
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (SHIPPED_VOCAB, 1, 2, -1)
    assert sp.is_byte(sp.piece_to_id("<0xE2>"))  # byte fallback: nothing is unknown


@pytest.mark.parametrize("text", [
    format_prompt("Describe this image in one sentence."),
    "Zebras ü 2024 € 東京 — tabs\tand  double  spaces\nnew line",
    "",
])
def test_round_trip_is_exact(text):
    tok = shipped_tokenizer()
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids  # no <unk>: bytes cover any character
    assert tok.decode(ids) == text


def test_corpus_words_are_whole_pieces():
    """Trained on the corpus: its common words are single pieces, not letters."""
    sp = spm.SentencePieceProcessor(model_file=str(SHIPPED_TOKENIZER))
    for word in ("▁image", "▁model", "▁the", "▁Instruction", "▁Response"):
        assert sp.piece_to_id(word) != sp.unk_id(), word


@pytest.mark.parametrize("name", ["llama_adapter_v2_tiny", "imagebind_llm_tiny"])
def test_registered_tiny_models_decode_text(name):
    model = surgery.build(name)
    tok = model.tokenizer
    assert tok is shipped_tokenizer()
    assert model.config.vocab_size == tok.n_words == model.llama.output.out_features
    image = torch.randn(1, 3, 28, 28) if name.startswith("llama") else {
        "Image": [torch.randn(1, 3, *model.image_bind.config.modalities["vision"].input_size[-2:]), 1]}
    ids = model.generate_tokens(image, ["Hello"], max_gen_len=6, temperature=0)[0]
    assert model.generate(image, ["Hello"], max_gen_len=6, temperature=0) == [tok.decode(ids)]


@pytest.mark.parametrize("name", ["llama_adapter_v2_bench", "imagebind_llm_bench"])
def test_bench_configs_fit_the_tokenizer(name):
    with torch.device("meta"):
        model = surgery.build(name)
    assert model.tokenizer is shipped_tokenizer()
    assert model.llama.output.out_features == model.llama.tok_embeddings.num_embeddings == SHIPPED_VOCAB
