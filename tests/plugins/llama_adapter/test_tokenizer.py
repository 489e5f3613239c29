"""Tokenizer (upstream LLaMA interface over sentencepiece), the Alpaca template, top-p sampling.

The tokenizer is checked against sentencepiece itself; the template against upstream's text
typed out here; `sample_top_p` against a plain-Python nucleus rule (upstream: a token is
dropped when the mass ranked above it exceeds p) through exact kept sets and sample frequencies.
"""

import pytest
import sentencepiece as spm
import torch

from surgery.errors import CheckpointError, ModelConfigError
from surgery_plugins.llama_adapter.tokenizer import Tokenizer, format_prompt, sample_top_p

# -- tokenizer ------------------------------------------------------------------------------------


def test_special_ids_are_llama_1s(tiny_tokenizer, tiny_tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    assert tiny_tokenizer.n_words == 200 == sp.get_piece_size()
    assert (tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.pad_id) == (1, 2, -1)
    assert all(type(v) is int for v in (tiny_tokenizer.n_words, tiny_tokenizer.bos_id,
                                        tiny_tokenizer.eos_id, tiny_tokenizer.pad_id))


@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (False, True), (True, True)])
def test_encode_adds_bos_eos_around_sentencepiece_ids(tiny_tokenizer, tiny_tokenizer_path, bos, eos):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    text = "describe the red house in this picture"
    plain = sp.encode(text)
    assert plain and 0 not in plain  # no unknown pieces: the text is in the tiny corpus
    expected = [1] * bos + plain + [2] * eos
    assert tiny_tokenizer.encode(text, bos=bos, eos=eos) == expected


def test_decode_round_trips_and_skips_control_ids(tiny_tokenizer):
    text = format_prompt("What is in the picture?", "a cat, 2 dogs")
    ids = tiny_tokenizer.encode(text, bos=True, eos=True)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.decode(torch.tensor(ids)) == text
    assert tiny_tokenizer.decode([]) == ""


def test_encode_rejects_non_strings(tiny_tokenizer):
    with pytest.raises(TypeError):
        tiny_tokenizer.encode(["a"], bos=True, eos=False)


def test_missing_and_corrupt_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer(tmp_path)  # a directory
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(CheckpointError, match="not a sentencepiece model"):
        Tokenizer(bad)


def test_model_without_bos_piece_refuses_bos(tmp_path):
    import io

    from fixtures import tiny_corpus

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny_corpus()), model_writer=buffer, vocab_size=100,
                                   bos_id=-1, eos_id=1, unk_id=0, minloglevel=2)
    (tmp_path / "t.model").write_bytes(buffer.getvalue())
    tok = Tokenizer(tmp_path / "t.model")
    assert tok.bos_id == -1
    assert tok.encode("the cat", bos=False, eos=True)[-1] == 1
    with pytest.raises(ModelConfigError, match="no bos piece"):
        tok.encode("the cat", bos=True, eos=False)


# -- Alpaca template ------------------------------------------------------------------------------

NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nDescribe this image.\n\n### Response:")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nWhat is in the picture?\n\n### Input:\na cat, 2 dogs\n\n### Response:")


def test_format_prompt_exact_text():
    assert format_prompt("Describe this image.") == NO_INPUT
    assert format_prompt("Describe this image.", None) == NO_INPUT
    assert format_prompt("What is in the picture?", "a cat, 2 dogs") == WITH_INPUT


def test_format_prompt_empty_input_and_braces_are_literal():
    # only None drops the input section (upstream tests `input is None`)
    assert format_prompt("x", "").endswith("### Instruction:\nx\n\n### Input:\n\n\n### Response:")
    assert "### Instruction:\n{input} {0}\n\n" in format_prompt("{input} {0}")


# -- top-p sampling -------------------------------------------------------------------------------


def nucleus(row, p):
    """Upstream's rule in plain Python: walk tokens from most to least likely, keep each one while
    the mass of those already walked is <= p; renormalise. Returns {token: probability}."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kept, mass = [], 0.0
    for i in order:
        if mass > p:
            break
        kept.append(i)
        mass += row[i]
    total = sum(row[i] for i in kept)
    return {i: row[i] / total for i in kept}


# dyadic probabilities: every partial sum is exact, so the `>` boundary is tested exactly
ROWS = [[0.0625, 0.5, 0.125, 0.0625, 0.25],
        [0.25, 0.125, 0.0625, 0.0625, 0.5]]


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.75, 0.8, 1.0])
def test_sample_top_p_frequencies_match_reference(p):
    n = 20000
    probs = torch.tensor(ROWS).repeat_interleave(n, dim=0)  # (2n, V): n draws per row
    gen = torch.Generator().manual_seed(0)
    out = sample_top_p(probs, p, generator=gen)
    assert out.shape == (2 * n, 1) and out.dtype == torch.long
    for r, row in enumerate(ROWS):
        expected = nucleus(row, p)
        drawn = out[r * n:(r + 1) * n, 0]
        counts = torch.bincount(drawn, minlength=len(row)).double() / n
        for token in range(len(row)):
            want = expected.get(token, 0.0)
            if want == 0.0:
                assert counts[token] == 0, (p, r, token)  # outside the nucleus: never drawn
            else:
                assert abs(counts[token].item() - want) < 0.015, (p, r, token, counts.tolist(), expected)


def test_sample_top_p_boundary_and_greedy():
    row = torch.tensor([ROWS[0]])
    # p = 0.5: the top token (0.5) leaves mass 0.5 above the second, which is not > 0.5: both kept
    assert set(nucleus(ROWS[0], 0.5)) == {1, 4}
    # p = 0: only the top token has no mass above it
    gen = torch.Generator().manual_seed(1)
    draws = sample_top_p(row.repeat(200, 1), 0.0, generator=gen)
    assert torch.all(draws == 1)


def test_sample_top_p_generator_reproducible_and_input_untouched():
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(3)), dim=-1)
    before = probs.clone()
    a = sample_top_p(probs, 0.75, generator=torch.Generator().manual_seed(7))
    b = sample_top_p(probs, 0.75, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(probs, before)
    for r in range(4):
        assert a[r, 0].item() in nucleus(probs[r].tolist(), 0.75)
