"""The imagebind_llm plugin: query_layer, the encoder's sites through composition (not re-declared),
k visual tokens by surgery, bit-exact restore, checkpoints of other counts, the conformance kit."""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.errors import CountError
from surgery.testing import ConformanceSuite
from surgery_plugins.imagebind_llm import plugin
from ibllm_reference import RefImageBindLLM
from test_imagebind_llm_model import PROMPTS, TIGHT, text, tiny, upstream_inputs

ENCODER_SITES = [f"num_cls_tokens.{m}" for m in ("vision", "text", "audio", "depth", "thermal", "imu", "point")]


def logits(model, inputs, tok):
    with torch.no_grad():
        visual = model.forward_visual(inputs)
        return model.forward_inference(visual, tok, 0, adapter_kv=model.adapter_kv(visual),
                                       kv_caches=model.llama.new_kv_caches(tok.shape[0], torch.float32, "cpu"))


def test_sites_are_query_layer_and_the_encoders_declared_once():
    model = surgery.build("imagebind_llm_tiny")
    found = surgery.sites(model)
    assert list(found) == ["query_layer", *ENCODER_SITES]
    assert (found["query_layer"].plugin, found["query_layer"].part) == ("imagebind_llm", "")
    assert all((found[n].plugin, found[n].part) == ("imagebind", "image_bind") for n in ENCODER_SITES)
    assert [s.name for s in plugin.surgery_token_sites(model=model, backbone="imagebind_llm")] == ["query_layer"]
    assert found["num_cls_tokens.vision"].to_dict(surgery.site.module_paths(model))["tensors"][0]["key"] == \
        "image_bind.modality_preprocessors.vision.cls_token"


@pytest.mark.parametrize("k", [2, 4])
def test_growing_cls_tokens_gives_k_visual_tokens_as_the_reference(k):
    model = tiny()
    model.image_bind.set_head_mode({"vision": "all"})
    surgery.resize(model, **{"num_cls_tokens.vision": k}, init="normal", seed=1)
    inputs, tok = upstream_inputs(model, ("vision", "audio")), text()
    assert model.forward_visual(inputs).shape == (2, k, 64)
    ref = RefImageBindLLM(model)
    ref.llama.eval_cache(2, torch.float32)
    with torch.no_grad():
        expected = ref.forward_inference(ref.forward_visual(inputs), tok, 0)
        torch.testing.assert_close(logits(model, inputs, tok), expected, **TIGHT)


def test_shrinking_back_to_one_restores_upstreams_outputs_bit_for_bit():
    model = tiny()
    inputs, tok = upstream_inputs(model, ("vision", "audio")), text()
    before_logits = logits(model, inputs, tok)
    before_tokens = model.generate_tokens(inputs, PROMPTS, max_gen_len=6, temperature=0)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.image_bind.set_head_mode({"vision": "all", "audio": "all"})
    surgery.resize(model, **{"num_cls_tokens.vision": 4, "num_cls_tokens.audio": 4}, init="normal", seed=2)
    assert not torch.equal(logits(model, inputs, tok), before_logits)
    surgery.resize(model, **{"num_cls_tokens.vision": 1, "num_cls_tokens.audio": 1})
    model.image_bind.set_head_mode("first")
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, inputs, tok), before_logits)
    assert model.generate_tokens(inputs, PROMPTS, max_gen_len=6, temperature=0) == before_tokens
    with surgery.tokens(model, query_layer=2, **{"num_cls_tokens.vision": 3}):
        assert model.prefix_query.weight.shape == (2, 64)
    assert torch.equal(logits(model, inputs, tok), before_logits)


def test_query_layer_keeps_the_last_layers_rows():
    model = tiny()
    rows = model.prefix_query.weight.detach().clone()
    surgery.resize(model, query_layer=2)
    assert torch.equal(model.prefix_query.weight, rows[2:]) and model.config.query_layer == 2
    inputs, tok = upstream_inputs(model), text()
    ref = RefImageBindLLM(model)
    ref.llama.eval_cache(2, torch.float32)
    with torch.no_grad():
        expected = ref.forward_inference(ref.forward_visual(inputs), tok, 0)
        torch.testing.assert_close(logits(model, inputs, tok), expected, **TIGHT)
    with pytest.raises(CountError, match="above the maximum 4"):
        surgery.resize(model, query_layer=5)


def test_checkpoints_of_other_counts_and_head_modes_load_into_a_fresh_model(tmp_path):
    from surgery.options import model_options

    assert model_options(tiny())["head_mode"]["vision"] == "first"
    model = tiny()
    model.image_bind.set_head_mode({"vision": "all"})
    surgery.resize(model, query_layer=3, **{"num_cls_tokens.vision": 3}, init="normal")
    surgery.save(model, tmp_path / "edited.safetensors")
    fresh = tiny(seed=5)
    surgery.load(tmp_path / "edited.safetensors", fresh)
    assert surgery.counts(fresh)["num_cls_tokens.vision"] == 3 and fresh.query_layer == 3
    assert fresh.image_bind.head_mode("vision") == "all"  # the encoder's option head_mode, through composition
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    inputs, tok = upstream_inputs(model), text()
    assert torch.equal(logits(fresh, inputs, tok), logits(model, inputs, tok))


TestImageBindLLMTinyConformance = ConformanceSuite.for_model("imagebind_llm_tiny")
