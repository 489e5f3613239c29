"""The optional kNN cache: a faiss index file the user gives, mixed in as upstream does (per embedding)."""

from __future__ import annotations

import copy
import pickle
import sys

import pytest
import torch

from surgery.errors import CheckpointError, ModelConfigError
from ibllm_reference import RefImageBindLLM
from test_imagebind_llm_model import PROMPTS, TIGHT, tiny, upstream_inputs


def write_index(path, dim, n=50, seed=0):
    faiss = pytest.importorskip("faiss")
    vectors = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors.numpy())
    faiss.write_index(index, str(path))
    return faiss.read_index(str(path))


@pytest.mark.parametrize("k", [1, 4])
def test_knn_cache_mixes_prototypes_as_upstream(tmp_path, k):
    model = tiny(num_cls_tokens={"vision": k}, head_mode="all")
    index = write_index(tmp_path / "knn.index", dim=24)
    inputs = upstream_inputs(model, ("vision", "audio"))
    plain = model.forward_visual(inputs).detach()
    model.attach_knn(tmp_path / "knn.index")
    ref = RefImageBindLLM(model, knn_index=index)
    with torch.no_grad():
        for args in ((10, 20, 0.5), (3, 5.0, 0.9)):
            torch.testing.assert_close(model.forward_visual(inputs, *args), ref.forward_visual(inputs, *args), **TIGHT)
        assert not torch.allclose(model.forward_visual(inputs), plain, atol=1e-3)
    assert model.generate_tokens(inputs, PROMPTS, max_gen_len=6, temperature=0) == ref.generate(inputs, PROMPTS, 6)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # the cache comes along
        torch.testing.assert_close(copied.forward_visual(inputs), model.forward_visual(inputs), rtol=0, atol=0)
    model.attach_knn(None)
    torch.testing.assert_close(model.forward_visual(inputs).detach(), plain, rtol=0, atol=0)


def test_bad_index_or_arguments_are_clear_errors_that_keep_the_cache(tmp_path):
    model = tiny()
    write_index(tmp_path / "good.index", dim=24)
    write_index(tmp_path / "wide.index", dim=32)
    model.attach_knn(tmp_path / "good.index")
    good = model.knn
    with pytest.raises(CheckpointError, match=r"holds 32-d vectors; the model's ImageBind embeddings are 24-d"):
        model.attach_knn(tmp_path / "wide.index")
    with pytest.raises(CheckpointError, match="does not exist"):
        model.attach_knn(tmp_path / "missing.index")
    (tmp_path / "junk.index").write_bytes(b"not an index")
    with pytest.raises(CheckpointError, match="is not a faiss index file"):
        model.attach_knn(tmp_path / "junk.index")
    assert model.knn is good
    inputs = upstream_inputs(model)
    for args, message in (((51, 20, 0.5), r"cache_size must be an integer within 1\.\.50"),
                          ((10, float("inf"), 0.5), "cache_t must be a finite number"),
                          ((10, 20, 1.5), r"cache_weight must be a number within 0\.\.1")):
        with pytest.raises(ModelConfigError, match=message):
            model.forward_visual(inputs, *args)


def test_without_faiss_the_cache_asks_for_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    model = tiny()
    with pytest.raises(ModelConfigError, match="pip install faiss-cpu"):
        model.attach_knn(tmp_path / "knn.index")
    assert model.knn is None
