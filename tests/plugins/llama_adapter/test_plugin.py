"""The LLaMA-Adapter V2 plugin: query_len and query_layer as token sites, through the core engine.

The reference for "a model resized at runtime" is a model *built* with the new counts by the
model's own constructor and given the resized weights by a strict `load_state_dict`: its
generations must be identical, and the tensors must hold what upstream's layout says they hold.
"""

import pytest
import torch

import surgery
from surgery.errors import CountError
from surgery.testing import ConformanceSuite
from surgery_plugins.llama_adapter.model import AdapterConfig, LLaMAAdapter

TestTinyConformance = ConformanceSuite.for_model(
    "llama_adapter_v2_tiny", counts={"query_len": [1, 2, 5], "query_layer": [1, 2, 4]})


def tiny(**overrides):
    torch.manual_seed(0)
    return LLaMAAdapter(AdapterConfig.named("tiny", **overrides)).eval()


def inputs(batch=2):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 28, 28, generator=gen)
    prompts = [[1, 5, 9, 17, 33], [1, 7, 8]][:batch]
    return images, prompts


def built_with_counts(model, **counts):
    """The reference: constructed with these counts, holding `model`'s (resized) weights."""
    reference = tiny(**counts)
    reference.load_state_dict(model.state_dict())  # strict: every key and shape must agree
    return reference


def greedy(model, **kw):
    images, prompts = inputs()
    return model.generate_tokens(images, prompts, max_gen_len=6, temperature=0, eos_id=2, **kw)


def test_sites_and_owned_tensors():
    model = tiny()
    sites = surgery.sites(model)
    assert surgery.backbone_of(model) == "llama_adapter_v2"
    assert {n: s.count for n, s in sites.items()} == {"query_len": 3, "query_layer": 3}
    assert sites["query_layer"].max == 4 and sites["query_len"].min == 1
    keys = [t["key"] for t in sites["query_len"].to_dict(surgery.site.module_paths(model))["tensors"]]
    assert keys == ["visual_query.weight", "adapter_query.weight"]


@pytest.mark.parametrize("query_len", [1, 2, 5])
def test_query_len_resize_matches_a_model_built_with_it(query_len):
    model = tiny()
    old_vq = model.visual_query.weight.detach().clone()
    old_table = model.adapter_query.weight.detach().clone().view(3, 3, 64)
    surgery.resize(model, query_len=query_len)
    assert model.query_len == query_len == model.config.query_len
    assert model.visual_query.weight.shape == (query_len, 32) == (model.visual_query.num_embeddings, 32)
    assert model.adapter_query.weight.shape == (3 * query_len, 64)
    keep = min(3, query_len)  # every layer keeps its first queries
    assert torch.equal(model.visual_query.weight[:keep], old_vq[:keep])
    assert torch.equal(model.adapter_query.weight.view(3, query_len, 64)[:, :keep], old_table[:, :keep])
    assert greedy(model) == greedy(built_with_counts(model, query_len=query_len))


@pytest.mark.parametrize("query_layer", [1, 2, 4])
def test_query_layer_resize_keeps_the_last_layers_rows(query_layer):
    model = tiny()
    old_table = model.adapter_query.weight.detach().clone().view(3, 3, 64)
    surgery.resize(model, query_layer=query_layer)
    assert model.query_layer == query_layer == model.config.query_layer
    table = model.adapter_query.weight.view(query_layer, 3, 64)
    keep = min(3, query_layer)  # the rows of the last `keep` layers, still in front of the same layers
    assert torch.equal(table[-keep:], old_table[-keep:])
    assert greedy(model) == greedy(built_with_counts(model, query_layer=query_layer))


def test_counts_swapped_between_generate_calls_invalidate_caches():
    model = tiny()
    first = greedy(model)
    assert model._caches.adapter_kv is not None and model._caches.kv is not None
    surgery.resize(model, query_len=5, query_layer=2)
    assert model._caches.adapter_kv is None and model._caches.kv is None  # dropped by the events
    assert greedy(model) == greedy(built_with_counts(model, query_len=5, query_layer=2))
    with surgery.tokens(model, query_len=1, query_layer=4):
        inside = greedy(model)
        assert inside == greedy(built_with_counts(model, query_len=1, query_layer=4))
    surgery.resize(model, query_len=3, query_layer=3)  # back: the stashed rows return bit-exactly
    assert greedy(model) == first


def test_cached_and_upstream_paths_agree_after_surgery():
    model = tiny()
    surgery.resize(model, query_len=6, init="copy")
    assert greedy(model, cache_adapter=True) == greedy(model, cache_adapter=False)


def test_query_layer_beyond_layers_is_refused():
    model = tiny()
    with pytest.raises(CountError, match="query_layer.*above the maximum 4"):
        surgery.resize(model, query_layer=5)
    with pytest.raises(CountError, match="query_len.*below the minimum 1"):
        surgery.resize(model, query_len=0)


def test_save_and_load_after_surgery_into_a_fresh_model(tmp_path):
    model = tiny()
    surgery.resize(model, query_len=4, query_layer=2, init="normal", seed=3)
    path = tmp_path / "edited.safetensors"
    surgery.save(model, path)
    fresh = tiny()
    result = surgery.load(path, fresh)
    assert result.replayed and surgery.counts(fresh) == {"query_len": 4, "query_layer": 2}
    assert greedy(fresh) == greedy(model)


def test_state_dict_of_other_counts_resizes_on_load():
    source = tiny(query_len=6, query_layer=2)
    model = tiny()
    surgery.load_state_dict(model, source.state_dict())
    assert (model.query_len, model.query_layer) == (6, 2)
    assert greedy(model) == greedy(source)


def test_7b_architecture_on_meta_resizes_without_memory():
    model = surgery.build("llama_adapter_v2_7b")
    assert model.adapter_query.weight.device.type == "meta"
    surgery.resize(model, query_len=64, query_layer=32)
    assert model.adapter_query.weight.shape == (64 * 32, 4096)
    assert model.visual_query.weight.shape == (64, 768)
