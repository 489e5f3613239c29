"""Random walks of counts over every built-in plugin's tiny model, sites sharing a tensor and sites of a
composed sub-model (ImageBind-LLM's encoder) included.

Each model's token tensors are read here as cells keyed by token identity (which token of which
site a row belongs to: `query_layer` counts its layers from the last one, `query_len` its queries
from the first), written out from the plugins' documented layouts, not taken from the engine. A
reference of every cell's value is kept alongside the walk: a cell that leaves (truncate) keeps its
value in the reference, a cell that comes back with `restore` must have it again, bit for bit, and
one grown with `zeros` must be zero. At the end, the walk goes back to the starting counts: after a
walk that grew only with `restore`, the model is the one it started as (weights and outputs).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgery


def llama_cells(model):
    """visual_query rows (Q, C) by query; adapter_query seen as (L, Q, D) by (layer from the last, query)."""
    L, Q = model.query_layer, model.query_len
    table = model.adapter_query.weight.view(L, Q, -1)
    cells = {("visual_query", q): model.visual_query.weight[q] for q in range(Q)}
    cells.update({("adapter_query", i, q): table[L - 1 - i, q] for i in range(L) for q in range(Q)})
    return cells


def vit_cells(model):
    """cls_token and reg_token rows; pos_embed rows [cls?, registers..., patches...]."""
    c = 0 if model.cls_token is None else model.cls_token.shape[1]
    r = 0 if model.reg_token is None else model.reg_token.shape[1]
    pos = model.pos_embed[0]
    cells = {("cls", 0): model.cls_token[0, 0]} if c else {}
    cells.update({("pos_cls", 0): pos[0]} if c else {})
    cells.update({("reg", k): model.reg_token[0, k] for k in range(r)})
    cells.update({("pos_reg", k): pos[c + k] for k in range(r)})
    cells.update({("pos_patch", p): pos[c + r + p] for p in range(pos.shape[0] - c - r)})
    return cells


IMAGEBIND_MODALITIES = ("vision", "audio", "depth", "thermal", "imu")


def imagebind_cells(model):
    """Per modality: cls_token rows and the first rows of its positional table (one per CLS token)."""
    cells = {}
    for modality in IMAGEBIND_MODALITIES:
        pre = model.modality_preprocessors[modality]
        n = pre.num_cls_tokens
        pos = (pre if modality == "imu" else pre.pos_embedding_helper).pos_embed[0]
        cells.update({(modality, "cls", k): pre.cls_token[0, k] for k in range(n)})
        cells.update({(modality, "pos_cls", k): pos[k] for k in range(n)})
        cells.update({(modality, "pos_patch", p): pos[n + p] for p in range(pos.shape[0] - n)})
    return cells


def imagebind_llm_cells(model):
    """prefix_query rows (L, dim) by layer from the last; the encoder's cells, the point modality's
    cls_token and cls_pos rows (one each per CLS token) included."""
    L, encoder = model.query_layer, model.image_bind
    cells = {("prefix_query", i): model.prefix_query.weight[L - 1 - i] for i in range(L)}
    cells.update(imagebind_cells(encoder))
    point = encoder.point_trunk.point_encoder
    cells.update({("point", "cls", k): point.cls_token[0, k] for k in range(point.num_cls_tokens)})
    cells.update({("point", "pos_cls", k): point.cls_pos[0, k] for k in range(point.num_cls_tokens)})
    return cells


# name: (build options, cells, {site: (lowest, highest count walked)}, examples)
SUBJECTS = {
    "llama_adapter_v2_tiny": (dict(), llama_cells, {"query_len": (1, 5), "query_layer": (1, 4)}, 25),
    "vit_tiny_avg_test": (dict(reg_tokens=3), vit_cells, {"class_token": (0, 1), "reg_tokens": (0, 5)}, 25),
    "imagebind_tiny_test": (dict(), imagebind_cells,
                            {f"num_cls_tokens.{m}": (0, 3) for m in IMAGEBIND_MODALITIES}, 25),
    # the composed model: its own query_layer and its encoder's sites (point: at least one CLS token)
    "imagebind_llm_tiny": (dict(), imagebind_llm_cells,
                           {"query_layer": (1, 4), "num_cls_tokens.point": (1, 3),
                            **{f"num_cls_tokens.{m}": (0, 3) for m in IMAGEBIND_MODALITIES}}, 15),
}


def walks(name):
    ranges = SUBJECTS[name][2]
    step = st.tuples(st.fixed_dictionaries({}, optional={s: st.integers(lo, hi) for s, (lo, hi) in ranges.items()}),
                     st.sampled_from(["restore", "restore", "zeros"]))
    return st.lists(step, min_size=1, max_size=8)


def build(name):
    torch.manual_seed(0)
    return surgery.build(name, **SUBJECTS[name][0])


def outputs(name, model):
    spec = surgery.get_host().model_spec(name)
    inputs = spec.example_inputs(model)
    with torch.no_grad():
        return spec.forward(model, *inputs) if spec.forward else model(*inputs)


def same_outputs(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_outputs(a[k], b[k]) for k in a)
    return all(same_outputs(x, y) for x, y in zip(a, b, strict=True))


def walk(name, steps):
    """Run the walk, checking every cell against the reference after each step; returns the model,
    its state and outputs at the start, and whether every growth was a `restore`."""
    cells_of = SUBJECTS[name][1]
    model = build(name)
    start_counts = surgery.counts(model)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    start_outputs = outputs(name, model)
    reference = {k: v.detach().clone() for k, v in cells_of(model).items()}
    only_restore = True
    for requested, init in steps:
        live_before, counts_before = set(cells_of(model)), surgery.counts(model)
        surgery.resize(model, init=init, **requested)
        for key, value in cells_of(model).items():
            if key in live_before or (init == "restore" and key in reference):
                assert torch.equal(value, reference[key]), (key, requested, init)
            elif init == "zeros":
                assert not value.any(), (key, requested, init)
            reference[key] = value.detach().clone()
        only_restore &= init == "restore" or all(c <= counts_before[s] for s, c in requested.items())
    surgery.resize(model, **start_counts)
    return model, start_state, start_outputs, only_restore


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_random_walks_keep_every_token_row_and_walk_back_exactly(name):
    @settings(max_examples=SUBJECTS[name][3], deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(steps=walks(name))
    def run(steps):
        model, state, start_outputs, only_restore = walk(name, steps)
        if only_restore:
            now = model.state_dict()
            assert list(now) == list(state)
            assert all(torch.equal(now[k], v) for k, v in state.items())
            assert same_outputs(outputs(name, model), start_outputs)

    run()


def test_the_interleaved_llama_walk_of_the_issue_comes_back_bit_exact():
    """query_len and query_layer truncated and restored interleaved (issue 13, item 15)."""
    model, state, start_outputs, _ = walk("llama_adapter_v2_tiny", [
        ({"query_len": 2}, "restore"), ({"query_layer": 1}, "restore"), ({"query_len": 3}, "restore"),
        ({"query_layer": 2}, "restore"), ({"query_len": 1, "query_layer": 3}, "restore"),
    ])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert same_outputs(outputs("llama_adapter_v2_tiny", model), start_outputs)
    recipe = surgery.recipe(model)
    fresh = build("llama_adapter_v2_tiny")
    recipe.replay(fresh)  # the recipe says `restore` and replays to the same weights
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
