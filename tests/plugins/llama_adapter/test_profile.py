"""plugins/llama_adapter/profile.py (`surgery profile`): a traced generation with every stage
labelled, nothing patched, nothing left behind."""

from __future__ import annotations

import json

import pytest
import torch

import surgery
import surgery_plugins.llama_adapter.profile as profile
from surgery import ops


def test_profile_a_tiny_generation(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_KERNEL", "cpp")  # the fused ops as torch ops (the eager one is plain torch)
    if not ops.can_run("cpp", torch.device("cpu"))[0]:
        pytest.skip("the C++ extension is not built")
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
    ranges = {n for n in names if n not in ("query_concat", "adapter_add", "adapter_attention")}
    assert ranges | {"generate"} <= traced  # the fused ops are there as their torch ops:
    assert {"surgery::query_concat", "surgery::adapter_add", "surgery::adapter_attention"} <= traced
    assert "Self CPU" in result.top_table and (tmp_path / "top_ops.txt").exists()
    assert json.loads((tmp_path / "stages.json").read_text()) == result.stages
    assert {n: getattr(ops, n) for n in originals} == originals  # the wrappers are gone
    assert len(result.tokens) == 2 and all(len(t) == 3 for t in result.tokens)
    # labelling changes nothing: the tokens are those of a plain greedy generation
    assert result.tokens == _plain_tokens(config)


def _plain_tokens(config):
    torch.manual_seed(0)
    model = surgery.build(config.model)
    gen = torch.Generator().manual_seed(1)
    size = model.config.clip.image_size
    images = torch.randn(config.batch, 3, size, size, generator=gen)
    prompts = [[1, *torch.randint(3, model.config.vocab_size, (config.prompt_len - 1,), generator=gen).tolist()]
               for _ in range(config.batch)]
    return model.generate_tokens(images, prompts, max_gen_len=config.steps, temperature=0)


def test_stage_labels_are_removed_from_the_model_even_on_error():
    model = surgery.build("llama_adapter_v2_tiny")

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hooks()
    with pytest.raises(KeyError, match="boom"):
        with profile.labelled_stages(model, profile.Ranges(nvtx=False)):
            assert hooks() > before
            raise KeyError("boom")
    assert hooks() == before and not model.__dict__.keys() & {"forward_inference", "forward_visual"}
