"""Fixtures for the ImageBind-LLM plugin tests.

The LLaMA half of ImageBind-LLM is LLaMA-Adapter V2's LLaMA, so its independent references
(`RefLLaMA`, `RefAdapter`: upstream's semantics as functions of a state dict) and tiny file
fixtures live with that plugin's tests; their folder is put on sys.path here to share them.
"""

import importlib.metadata
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llama_adapter"))

from surgery.plugins import get_host  # noqa: E402
from surgery.testing import plugin_host  # noqa: E402
from surgery_plugins.imagebind_llm import plugin as imagebind_llm_plugin  # noqa: E402

INSTALLED = any(ep.name == "imagebind_llm" for ep in importlib.metadata.entry_points(group="surgery.backbones"))


@pytest.fixture(autouse=True)
def imagebind_llm_host():
    """A host that knows the `imagebind_llm` backbone: the installed one, or a fresh one with the plugin added."""
    if INSTALLED:
        host = get_host()
        assert host.records["imagebind_llm"].status == "loaded", host.records["imagebind_llm"].error
        yield host
        return
    with plugin_host(("imagebind_llm", imagebind_llm_plugin)) as host:
        yield host


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """A trained 200-piece sentencepiece `tokenizer.model` (unk 0, bos 1, eos 2, pad -1), once per session."""
    from fixtures import train_tiny_sentencepiece

    return train_tiny_sentencepiece(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
