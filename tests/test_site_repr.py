"""A site prints as a summary of itself, never as the model it belongs to (issue 14 item 24), and its
JSON names the sub-model part it belongs to (issue 17)."""

from __future__ import annotations

import json

import timm

import surgery
from surgery.cli import main, site_dicts


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


def test_inspect_json_names_the_part_each_site_belongs_to(capsys):
    # ImageBind-LLM composes ImageBind at `image_bind`: its sites are that part's, query_layer is the model's own
    assert main(["inspect", "imagebind_llm_tiny", "--json"]) == 0
    sites = {s["name"]: s for s in json.loads(capsys.readouterr().out)["sites"]}
    modalities = ("vision", "text", "audio", "depth", "thermal", "imu", "point")
    assert {n: s["part"] for n, s in sites.items()} == {
        "query_layer": "", **{f"num_cls_tokens.{m}": "image_bind" for m in modalities}}
    for site in sites.values():  # a part's tensors are under its path in the state dict
        assert all(t["key"].startswith(f"{site['part']}.") for t in site["tensors"] if site["part"])
        assert all(not t["key"].startswith("image_bind.") for t in site["tensors"] if not site["part"])
