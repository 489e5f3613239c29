"""The BPE tokenizer on a tiny merges file written here (CLIP's format); ids worked out by hand."""

import gzip

import pytest
import torch

from surgery.errors import CheckpointError
from surgery_plugins.imagebind.tokenizer import BPETokenizer, byte_symbols

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "a </w>"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe_tiny.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(vocab):
    return BPETokenizer(vocab, context_length=8)


def merged(i):
    return 512 + i  # after the 256 byte symbols and the 256 with "</w>"


def test_vocabulary_layout(tok):
    symbols = list(byte_symbols().values())
    assert symbols[:3] == ["!", '"', "#"] and len(set(symbols)) == 256  # printable bytes first, as CLIP
    assert byte_symbols()[ord(" ")] == chr(256 + 32)  # bytes 0..32 are not printable: 256 + their rank
    assert tok.vocab_size == 512 + len(MERGES) + 2
    assert (tok.sot_id, tok.eot_id) == (519, 520) and tok.eot_id == tok.vocab_size - 1  # EOT is the largest id


def test_encode_applies_the_merges(tok):
    assert tok.encode("the cat") == [merged(1), merged(3)]  # "the</w>", "cat</w>"
    assert tok.encode("THE  Dog\n") == [merged(1), merged(5)]  # lower-cased, whitespace collapsed
    assert tok.encode("a") == [merged(6)]
    # symbol ids: printable ASCII from "!" (33) at 0; the same with "</w>" 256 later
    assert tok.encode("cats") == [merged(2), ord("t") - 33, 256 + ord("s") - 33]  # "ca", "t", "s</w>"
    assert tok.encode("dog's") == [merged(5), ord("'") - 33, 256 + ord("s") - 33]  # "dog</w>", "'", "s</w>"


def test_literal_special_tokens_are_their_ids(tok):
    # upstream's pattern matches them whole and its BPE cache maps them to themselves: one id each
    assert tok.encode("the cat<|endoftext|>") == [merged(1), merged(3), 520]
    assert tok.encode("<|startoftext|>a dog <|EndOfText|>") == [519, merged(6), merged(5), 520]  # lower-cased first
    assert tok("<|endoftext|>the cat").tolist() == [519, 520, merged(1), merged(3), 520, 0, 0, 0]
    # anything else made of the same characters is still plain BPE of three pieces: "<|", "endoftex", "|>"
    assert tok.encode("<|endoftex|>") == [ord("<") - 33, 256 + ord("|") - 33, *tok.encode("endoftex"),
                                          ord("|") - 33, 256 + ord(">") - 33]


def test_rows_have_sot_eot_and_zero_padding(tok):
    ids = tok(["the cat", "a dog"])
    assert ids.dtype == torch.long and ids.shape == (2, 8)
    assert ids[0].tolist() == [519, merged(1), merged(3), 520, 0, 0, 0, 0]
    assert ids[1].tolist() == [519, merged(6), merged(5), 520, 0, 0, 0, 0]
    assert tok("the cat").shape == (8,)
    assert (ids.argmax(-1) == torch.tensor([3, 3])).all()  # the text head finds EOT with argmax


def test_long_text_is_truncated_and_keeps_eot(tok):
    ids = tok("the cat the dog the cat the dog the cat")
    assert ids.tolist() == [519, merged(1), merged(3), merged(1), merged(5), merged(1), merged(3), 520]
    assert tok("the cat", context_length=3).tolist() == [519, merged(1), 520]


def test_decode_round_trip(tok):
    assert tok.decode(tok.encode("the cat a dog")) == "the cat a dog "
    assert tok.decode(torch.tensor(tok.encode("café"))) == "café "


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        BPETokenizer(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt.gz").write_text("not gzip")
    with pytest.raises(CheckpointError, match="not a gzip"):
        BPETokenizer(tmp_path / "plain.txt.gz")
    with gzip.open(tmp_path / "bad.txt.gz", "wt") as f:
        f.write("#version\nthree symbols here\n")
    with pytest.raises(CheckpointError, match="two symbols"):
        BPETokenizer(tmp_path / "bad.txt.gz")
