"""surgery/bench/surgery_cost.py: any registered model on meta (LLaMA-Adapter's 7B, a timm ViT), only
the site is touched, memory adds up."""

from __future__ import annotations

import json

import pytest
import torch

import surgery
from surgery.bench import surgery_cost as sc

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return sc.build(sc.CostConfig("llama_adapter_v2_7b", ()), CPU)


def test_only_the_sites_tensors_are_materialised(model):
    real = {name: t for name, t in sc._all_tensors(model).items() if t.device.type != "meta"}
    assert set(real) == {"visual_query.weight", "adapter_query.weight"}
    assert real["adapter_query.weight"].shape == (31 * 10, 4096)
    total = sum(t.numel() * t.element_size() for t in sc._all_tensors(model).values())
    assert total > 25e9  # the 7B model's size in fp32, never allocated


def test_a_touch_of_another_tensor_is_seen(model):
    """The instrument itself: an op on a base weight (meta) or on another real tensor is reported."""
    assert sc.touched_by(model, "query_len", lambda: model.visual_query.weight.sum()) == []
    touched = sc.touched_by(model, "query_len", lambda: model.llama.norm.weight.mul(2))
    assert len(touched) == 1 and "meta tensor" in touched[0]
    # query_layer's site is adapter_query only: reading visual_query.weight is touching another tensor
    touched = sc.touched_by(model, "query_layer", lambda: model.visual_query.weight.sum())
    assert touched == ["visual_query.weight (by aten.sum.default)"]
    # replacing another tensor counts too
    old = model.clip_proj.bias
    new = torch.nn.Parameter(torch.empty_like(old))  # made outside the action: only the swap is in it
    try:
        touched = sc.touched_by(model, "query_len", lambda: setattr(model.clip_proj, "bias", new))
    finally:
        model.clip_proj.bias = old
    assert touched == ["clip_proj.bias (replaced or changed in place)"]


def test_memory_of_a_known_action():
    kept = []

    def action():
        scratch = torch.empty(1_000_000, dtype=torch.uint8)  # 1 MB, freed
        kept.append(torch.empty(250_000, dtype=torch.uint8))  # 0.25 MB, held
        del scratch

    peak, retained, method = sc.memory_of(action, CPU)
    assert 1_250_000 <= peak < 1_300_000
    assert 250_000 <= retained < 300_000
    assert "profiler" in method


def test_measure_a_change_and_write(model, tmp_path):
    rows = sc.measure_change(model, "query_len", 20, CPU, 1, repeats=2)
    assert surgery.counts(model)["query_len"] == 10  # left as it was
    assert [r.action for r in rows] == ["resize", "resize back", "tokens enter", "tokens exit", "tokens swap"]
    before, after = 4 * (10 * 768 + 310 * 4096), 4 * (20 * 768 + 620 * 4096)
    by = {r.action: r for r in rows}
    assert (by["resize"].site_bytes_before, by["resize"].site_bytes_after) == (before, after)
    assert (by["resize back"].site_bytes_before, by["resize back"].site_bytes_after) == (after, before)
    for r in rows:
        assert r.other_tensors_touched == 0 and r.touched == "" and r.met_untouched
        assert r.site_bytes == after and r.peak_over_site == pytest.approx(r.peak_extra_bytes / after)
        assert r.met_memory == (r.peak_extra_bytes <= 2 * after)
        assert r.ms_p20 <= r.ms_p50 <= r.ms_p80 and r.samples == 2
    assert by["resize"].peak_extra_bytes >= after  # a growth allocates at least its new tensors
    assert by["tokens enter"].retained_extra_bytes >= after  # held while inside the block
    for r in rows:  # the same-run floor: every action that makes tensors has one, leaving tokens(...) none
        if r.action == "tokens exit":
            assert r.floor_ms is None and r.over_floor is None
        else:
            assert r.floor_ms > 0 and r.over_floor == pytest.approx(r.ms_p50 / r.floor_ms)
    assert by["tokens swap"].floor_ms == by["tokens enter"].floor_ms == by["resize"].floor_ms
    assert by["tokens swap"].target_ms == 50.0 and by["tokens swap"].met_time == (by["tokens swap"].ms_p50 < 50)
    results = sc.CostResults(rows=rows, env={"model": "m", "dtype": "float32", "device_name": "x"},
                             base_bytes=1, materialised_bytes=before)
    files = {f.name for f in sc.write(results, tmp_path)}
    assert files == {"surgery_cost.csv", "surgery_cost.json", "summary.md"}
    assert len(json.loads((tmp_path / "surgery_cost.json").read_text())["rows"]) == 5


def test_query_layer_change_touches_nothing_else(model):
    rows = sc.measure_change(model, "query_layer", 8, CPU, 1, repeats=1)
    assert all(r.other_tensors_touched == 0 for r in rows)
    assert rows[0].site_bytes_before == 4 * 310 * 4096 and rows[0].site_bytes_after == 4 * 80 * 4096


def test_the_floor_makes_tensors_of_the_new_shape():
    """floor_of allocates each end shape and writes it once: the kept rows copied, new rows drawn."""
    start = {"a": torch.arange(6.0).reshape(3, 2)}
    end = {"a": torch.empty(5, 2)}
    made = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        made.append(real_empty(*args, **kwargs))
        return made[-1]

    floor = sc.floor_of(start, end)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", spy)
        floor()
    assert made[0].shape == (5, 2)
    assert torch.equal(made[0][:3], start["a"])  # kept rows copied
    drawn = real_empty(4).normal_(generator=torch.Generator().manual_seed(0))  # new rows: a seeded draw
    assert torch.equal(made[0][3:].reshape(-1), drawn)


def test_any_registered_model_and_its_sites_only():
    """The core names no model: a timm ViT is measured the same way, and a change naming no site of
    the model is refused before anything is timed."""
    vit = sc.build(sc.CostConfig("vit_tiny_reg_test", (("reg_tokens", 4),)), CPU)
    real = {name for name, t in sc._all_tensors(vit).items() if t.device.type != "meta"}
    assert real == {"reg_token"}  # registers own no pos_embed rows in timm
    [swap] = [r for r in sc.measure_change(vit, "reg_tokens", 4, CPU, 1, repeats=1) if r.action == "tokens swap"]
    assert swap.other_tensors_touched == 0 and swap.change == "2 -> 4"
    with pytest.raises(sc.BenchmarkError, match="'query_len', not a site of 'vit_tiny_reg_test'; its sites: "):
        sc.build(sc.CostConfig("vit_tiny_reg_test", (("query_len", 4),)), CPU)
