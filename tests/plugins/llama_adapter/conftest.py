"""Fixtures for the LLaMA-Adapter plugin tests: a tiny tokenizer and tiny CLIP visual weights."""

from pathlib import Path

import pytest

from fixtures import TINY_CLIP, make_openai_visual_state_dict, train_tiny_sentencepiece


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """A trained 200-piece sentencepiece `tokenizer.model` (unk 0, bos 1, eos 2, pad -1), once per session."""
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
    from surgery_plugins.llama_adapter.tokenizer import Tokenizer

    return Tokenizer(tiny_tokenizer_path)


@pytest.fixture
def tiny_clip_visual_sd():
    """OpenAI-layout `visual.*` weights of a 2-layer, width-128 CLIP tower (28px images, patch 14,
    output_dim 32); a fresh dict per test, so tests may edit it."""
    return make_openai_visual_state_dict(**TINY_CLIP, prefix="visual.")
