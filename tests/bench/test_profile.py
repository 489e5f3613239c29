"""surgery/bench/profile.py: a traced generation with every stage labelled, nothing left behind."""

from __future__ import annotations

import json

import torch

from surgery import ops
from surgery.bench import profile


def test_profile_a_tiny_generation(tmp_path):
    originals = {n: getattr(ops, n) for n in ("query_concat", "adapter_add", "adapter_attention")}
    config = profile.ProfileConfig(model="llama_adapter_v2_tiny", steps=3, prompt_len=5, batch=2, threads=1)
    result = profile.run(config, tmp_path)
    names = [s["name"] for s in result.stages]
    assert names == [*profile.STAGES, "decode_step_1", "decode_step_2"]
    by = {s["name"]: s for s in result.stages}
    assert by["prefill"]["calls"] == 1 and by["query_concat"]["calls"] == 1
    assert by["adapter_attention"]["calls"] == 3 * 3  # 3 adapted layers x (prefill + 2 steps)
    assert all(s["total_ms"] >= 0 for s in result.stages)
    trace = json.loads(result.trace.read_text())
    traced = {e.get("name") for e in trace["traceEvents"]}
    assert set(names) | {"generate"} <= traced
    assert "Self CPU" in result.top_table and (tmp_path / "top_ops.txt").exists()
    assert json.loads((tmp_path / "stages.json").read_text()) == result.stages
    assert {n: getattr(ops, n) for n in originals} == originals  # the wrappers are gone
    assert len(result.tokens) == 2 and all(len(t) == 3 for t in result.tokens)


def test_stage_labels_are_removed_from_the_model_even_on_error(tmp_path):
    import surgery

    model = surgery.build("llama_adapter_v2_tiny")
    hooks = len(model.clip._forward_pre_hooks)
    try:
        with profile.labelled_stages(model, profile._Ranges(nvtx=False)):
            assert "forward_inference" in model.__dict__
            raise KeyError("boom")
    except KeyError:
        pass
    assert "forward_inference" not in model.__dict__ and "forward_visual" not in model.__dict__
    assert len(model.clip._forward_pre_hooks) == hooks
    assert ops.query_concat.__name__ == "query_concat"
