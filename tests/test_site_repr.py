"""A site prints as a summary of itself, never as the model it belongs to (issue 14 item 24)."""

from __future__ import annotations

import json

import timm

import surgery
from surgery.cli import site_dicts


def test_sites_print_as_a_short_summary():
    vit = timm.create_model("vit_small_patch16_224")
    text = repr(surgery.sites(vit))
    assert len(text) < 1500, text  # was 99 KB: a counter's repr printed the whole model
    assert "Block(" not in text and "Linear(" not in text
    assert "TokenSite(name='reg_tokens', count=0, min=0, max=None, step=1, plugin='timm_vit'" in text
    assert f"TokenTensor(VisionTransformer.pos_embed {tuple(vit.pos_embed.shape)}, axis=1, start=1, coupled)" in text
    assert "TokenTensor(VisionTransformer.reg_token absent, axis=1, start=0)" in text
    assert "Counter(VisionTransformer.num_reg_tokens)" in text


def test_views_and_anchors_show_in_the_summary_and_the_json():
    model = surgery.build("llama_adapter_v2_tiny")
    site = surgery.sites(model)["query_layer"]
    rows = model.adapter_query.weight.shape
    assert repr(site.tensors[0]) == (f"TokenTensor(Embedding.weight {tuple(rows)}, axis=0, start=0, "
                                     f"view={(model.query_layer, model.query_len, rows[1])}, anchor='end')")
    counters = {c for s in site_dicts(model) for c in s["counters"]}
    assert {"LLaMAAdapter.query_len", "LLaMAAdapter.query_layer", "Embedding.num_embeddings"} <= counters
    json.dumps(site_dicts(model))  # plain data
