"""The engine on the toy backbone: sites, resize, tokens, recipes, atomicity.

References are written here in plain torch from the definition of each site (which rows a
token owns, what each counter must read), never taken from the engine itself.
"""

from unittest import mock

import pytest
import torch

import surgery
from surgery.edit import Edit
from surgery.errors import CountError, ResizeError, SiteError, StrategyError, SurgeryError
from toy_backbone import ToyModel, assert_same, snapshot


def make(**kw):
    torch.manual_seed(0)
    return ToyModel(**kw)


def x_in(model, batch=2):
    return torch.randn(batch, 5, model.dim, generator=torch.Generator().manual_seed(1))


def test_sites_lists_counts_and_owned_tensors(toy_host):
    model = make(prompts=2, query_len=3, query_layer=2, memory=0)
    sites = surgery.sites(model)
    assert list(sites) == ["prompts", "query_len", "query_layer", "memory"]
    assert {n: s.count for n, s in sites.items()} == {"prompts": 2, "query_len": 3, "query_layer": 2, "memory": 0}
    assert surgery.counts(model) == {n: s.count for n, s in sites.items()}
    assert all(s.plugin == "toy" for s in sites.values())
    info = sites["query_len"].to_dict(surgery.site.module_paths(model))
    assert info["tensors"][0] == {"key": "adapter.weight", "shape": [6, 8], "view": [2, 3, 8], "axis": 1,
                                  "start": 0, "coupled": False}


def test_grow_prompts_keeps_old_rows_and_coupled_positions(toy_host):
    model = make(prompts=2)
    old_prompts, old_pos = model.prompts.detach().clone(), model.pos.detach().clone()
    assert surgery.resize(model, prompts=4) == {"prompts": (2, 4)}
    # reference: prompts append zero rows (the site's default), pos gets two zero rows after row 1
    assert torch.equal(model.prompts, torch.cat([old_prompts, torch.zeros(2, 8)]))
    expected_pos = torch.cat([old_pos[:, :2], torch.zeros(1, 2, 8), old_pos[:, 2:]], dim=1)
    assert torch.equal(model.pos, expected_pos)
    assert model.num_prompts == 4 and model.config["num_prompts"] == 4
    assert model(x_in(model)).shape == (2, 8)


def test_view_of_flat_table_resizes_token_axis(toy_host):
    model = make(query_len=3, query_layer=2)
    table = model.adapter.weight.detach().clone().view(2, 3, 8)
    surgery.resize(model, query_len=5, init="copy")
    assert model.adapter.weight.shape == (10, 8) and model.adapter.num_embeddings == 10
    new = model.adapter.weight.view(2, 5, 8)
    for layer in range(2):  # each layer's queries cycle within that layer
        for q in range(5):
            assert torch.equal(new[layer, q], table[layer, q % 3])
    surgery.resize(model, query_len=1)
    assert torch.equal(model.adapter.weight, table[:, :1].reshape(2, 8))


def test_structural_site_goes_through_apply_hook(toy_host):
    model = make(query_layer=2, layers=4)
    surgery.resize(model, query_layer=3)
    assert model.adapter_layers == [1, 2, 3]
    assert model.adapter.weight.shape == (9, 8)
    assert model(x_in(model)).shape == (2, 8)


def test_absent_tensor_is_created_and_removed(toy_host):
    model = make(memory=0)
    surgery.resize(model, memory=4, init="zeros")
    assert isinstance(model.memory, torch.nn.Parameter) and model.memory.shape == (1, 4, 8)
    assert "memory" in dict(model.named_parameters())
    surgery.resize(model, memory=0)
    assert model.memory is None and "memory" not in model.state_dict()


def test_parameter_identity_kept_and_grad_dropped(toy_host):
    model = make()
    param = model.prompts
    model(x_in(model)).sum().backward()
    assert param.grad is not None
    surgery.resize(model, prompts=5)
    assert model.prompts is param and param.shape == (5, 8) and param.grad is None


def test_tensors_the_site_does_not_own_are_untouched(toy_host):
    model = make()
    others = {k: (p, p.data_ptr()) for k, p in model.named_parameters() if k not in ("prompts", "pos")}
    surgery.resize(model, prompts=6)
    for key, (param, ptr) in others.items():
        assert dict(model.named_parameters())[key] is param and param.data_ptr() == ptr


def test_shrink_then_grow_back_with_defaults_is_bit_exact(toy_host):
    model = make(prompts=4, query_len=4)
    before, y0 = snapshot(model), model(x_in(model))
    surgery.resize(model, prompts=1, query_len=2)
    surgery.resize(model, prompts=4, query_len=4)
    after = snapshot(model)
    assert_same(before, after)
    assert torch.equal(model(x_in(model)), y0)


def test_two_sites_sharing_a_table_shrink_and_grow_back_together_exactly(toy_host):
    # query_len and query_layer are the Q and L axes of one (L*Q, D) table
    model = make(query_len=4, query_layer=3)
    before = snapshot(model)
    surgery.resize(model, query_len=2, query_layer=1)
    surgery.resize(model, query_len=4, query_layer=3)
    assert_same(before, snapshot(model))


def test_restore_then_default_for_rows_beyond_stash(toy_host):
    model = make(prompts=3)
    original = model.prompts.detach().clone()
    surgery.resize(model, prompts=2)
    surgery.resize(model, prompts=5)
    assert torch.equal(model.prompts[:3], original)
    assert torch.equal(model.prompts[3:], torch.zeros(2, 8))  # the site's default (zeros)


def test_normal_growth_of_a_table_axis_is_the_seeded_reference_draw(toy_host, monkeypatch):
    """query_len is the Q axis of a flat (L*Q, D) table: its new rows are one seeded draw over
    (new, L, D), matched to each layer's features, placed per layer; the old rows are kept."""
    import zlib

    from surgery import strategies

    monkeypatch.setattr(strategies, "NORMAL_CHUNK", 32)  # several chunks even at this size
    model = make(query_len=3, query_layer=2)
    table = model.adapter.weight.detach().clone().view(2, 3, 8)  # (L, Q, D)
    surgery.resize(model, query_len=13, seed=4)
    block = table.movedim(1, 0).double()  # (Q, L, D)
    mean = block.mean(0, keepdim=True)
    std = (block - mean).square().mean().sqrt()
    g = torch.Generator().manual_seed(4 + zlib.crc32(b"query_len"))
    new = mean + torch.randn((10, 2, 8), generator=g).double() * std
    expected = torch.cat([block, new]).movedim(0, 1).reshape(26, 8)
    grown = model.adapter.weight.detach()
    assert torch.equal(grown.view(2, 13, 8)[:, :3], table)  # the old rows, bit for bit
    torch.testing.assert_close(grown.double(), expected, rtol=1e-6, atol=1e-6)  # float32 rounding only
    assert model.adapter.weight.is_contiguous()


def test_pool_then_interpolate(toy_host):
    model = make(prompts=4)
    p = model.prompts.detach().clone()
    surgery.resize(model, prompts=2, shrink="pool")
    torch.testing.assert_close(model.prompts, torch.stack([(p[0] + p[1]) / 2, (p[2] + p[3]) / 2]))
    surgery.resize(model, prompts=3, init="interpolate")
    q = torch.stack([(p[0] + p[1]) / 2, (p[2] + p[3]) / 2])
    torch.testing.assert_close(model.prompts, torch.stack([q[0], (q[0] + q[1]) / 2, q[1]]))


def test_tokens_restores_bit_exactly_also_on_exception(toy_host):
    model = make(prompts=2, memory=2)
    before, y0 = snapshot(model), model(x_in(model))
    with surgery.tokens(model, prompts=7, memory=0, query_len=1, query_layer=4, init="normal"):
        assert surgery.counts(model) == {"prompts": 7, "query_len": 1, "query_layer": 4, "memory": 0}
        assert model(x_in(model)).shape == (2, 8)
    assert_same(before, snapshot(model))
    assert torch.equal(model(x_in(model)), y0)
    with pytest.raises(RuntimeError, match="boom"):
        with surgery.tokens(model, prompts=0):
            raise RuntimeError("boom")
    assert_same(before, snapshot(model))
    assert surgery.recipe(model).steps == ()


def test_training_a_truncated_site_in_place_does_not_touch_the_kept_original(toy_host):
    """A truncated whole-tensor site must not share memory with the tensor kept for the undo."""
    model = make(prompts=4)
    before = snapshot(model)
    with surgery.tokens(model, prompts=2, shrink="truncate"):
        with torch.no_grad():
            model.prompts.add_(1.0)  # an optimiser step, in place
    assert_same(before, snapshot(model))


def test_repeated_truncations_stash_without_copying_earlier_rows_and_restore_in_order(toy_host):
    """Each shrink stashes only the rows it drops (no concatenation with the earlier stash), and
    growing back with `restore` returns all of them, in their original order, bit-exactly."""
    model = make(prompts=6)
    original = model.prompts.detach().clone()
    surgery.resize(model, prompts=4, shrink="truncate")
    first = surgery.engine.model_state(model).stash["prompts"][0]
    surgery.resize(model, prompts=1, shrink="truncate")
    pieces = surgery.engine.model_state(model).stash["prompts"]
    assert [p.values.shape[0] for p in pieces] == [2, 3] and pieces[0] is first  # the earlier rows, not a copy
    assert torch.equal(first.values, original[4:]) and torch.equal(pieces[1].values, original[1:4])
    surgery.resize(model, prompts=3)  # restore takes from the front: rows 1 and 2
    assert torch.equal(model.prompts, original[:3])
    surgery.resize(model, prompts=6)
    assert torch.equal(model.prompts, original)
    assert surgery.engine.model_state(model).stash == {}


def test_events_around_resize_and_tokens(toy_host):
    model = make(prompts=2)
    surgery.resize(model, prompts=3)
    assert toy_host.events == [("before", "toy", {"prompts": (2, 3)}), ("after", "toy", {"prompts": (2, 3)})]
    toy_host.events.clear()
    with surgery.tokens(model, prompts=1):
        pass
    assert toy_host.events == [("before", "toy", {"prompts": (3, 1)}), ("after", "toy", {"prompts": (3, 1)}),
                               ("before", "toy", {"prompts": (1, 3)}), ("after", "toy", {"prompts": (1, 3)})]
    toy_host.events.clear()
    surgery.resize(model, prompts=3)  # no change, no event
    assert toy_host.events == []


@pytest.mark.parametrize("count, match", [
    (-1, "below the minimum 0"), (17, "above the maximum 16"), (2.0, "type float"), (True, "type bool"),
    ("3", "type str"),
])
def test_bad_counts_name_site_and_allowed(toy_host, count, match):
    model = make()
    before = snapshot(model)
    with pytest.raises(CountError, match=match) as err:
        surgery.resize(model, prompts=count)
    assert "'prompts'" in str(err.value) and "allowed: an integer, at least 0, at most 16" in str(err.value)
    assert_same(before, snapshot(model))


def test_step_and_zero_constraints(toy_host):
    model = make()
    with pytest.raises(CountError, match="steps of 2"):
        surgery.resize(model, memory=3)
    with pytest.raises(CountError, match="below the minimum 1"):
        surgery.resize(model, query_len=0)


def test_unknown_site_and_strategy(toy_host):
    model = make()
    with pytest.raises(SiteError, match="its sites: prompts, query_len, query_layer, memory"):
        surgery.resize(model, nope=1)
    with pytest.raises(StrategyError, match="allowed"):
        surgery.resize(model, prompts=3, init="bogus")
    with pytest.raises(StrategyError, match="allowed"):
        surgery.resize(model, prompts=1, shrink="mean")


def test_strategy_error_mid_way_rolls_back_earlier_sites(toy_host):
    model = make(prompts=2, memory=0)
    before = snapshot(model)
    # prompts grows fine, memory has no tokens for 'mean' to work from: the whole call fails
    with pytest.raises(StrategyError, match="site 'memory'.*mean"):
        surgery.resize(model, prompts=5, memory=2, init="mean")
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5])
def test_injected_failure_at_any_step_leaves_model_as_it_was(toy_host, fail_at):
    model = make(prompts=2, query_len=3, memory=2)
    before = snapshot(model)
    real = Edit.set_tensor
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise torch.OutOfMemoryError("injected: out of memory")
        return real(self, *args, **kwargs)

    with mock.patch.object(Edit, "set_tensor", flaky):
        with pytest.raises(ResizeError) as err:
            surgery.resize(model, prompts=4, query_len=5, query_layer=3, memory=4)
    text = str(err.value)
    assert "OutOfMemoryError" in text and "failed at tensor" in text and "left as it was" in text
    assert calls["n"] == fail_at  # nothing ran after the failure
    assert_same(before, snapshot(model))


def test_resize_error_names_site_tensor_and_request(toy_host):
    model = make(prompts=2)
    with mock.patch.object(Edit, "set_tensor", side_effect=RuntimeError("disk on fire")):
        with pytest.raises(ResizeError, match=r"site 'prompts' from 2 to 4 failed at tensor prompts .*disk on fire"):
            surgery.resize(model, prompts=4)


def test_plugin_error_in_event_rolls_back(toy_host):
    model = make(prompts=2)
    before = snapshot(model)

    class Broken:
        @surgery.hookimpl
        def surgery_after_resize(self, model, backbone, changes):
            raise ValueError("cache rebuild failed")

    assert surgery.get_host().add_plugin(Broken(), "broken_events")
    with pytest.raises(ResizeError, match="plugin 'broken_events' failed in surgery_after_resize"):
        surgery.resize(model, prompts=5)
    assert_same(before, snapshot(model))


def test_recipe_replays_bit_exactly_on_fresh_model(toy_host):
    model = make(prompts=2, query_len=3)
    surgery.resize(model, prompts=5, init="normal", seed=3)
    surgery.resize(model, query_len=6, init="interpolate")
    surgery.resize(model, prompts=1)
    surgery.resize(model, prompts=3, init="mean")
    recipe = surgery.recipe(model)
    assert [s["site"] for s in recipe.steps] == ["prompts", "query_len", "prompts", "prompts"]
    assert recipe.counts == {"prompts": 3, "query_len": 6} and recipe.initial == {"prompts": 2, "query_len": 3}
    fresh = make(prompts=2, query_len=3)
    surgery.Recipe.from_json(recipe.to_json()).replay(fresh)
    assert_same(snapshot(model), snapshot(fresh), same_objects=False)
    assert torch.equal(model(x_in(model)), fresh(x_in(fresh)))


def test_recipe_refuses_model_with_other_start(toy_host):
    model = make(prompts=2)
    surgery.resize(model, prompts=4)
    other = make(prompts=3)
    before = snapshot(other)
    with pytest.raises(CountError, match="replay it on a freshly built model"):
        surgery.recipe(model).replay(other)
    assert_same(before, snapshot(other))


def test_bf16_model_keeps_dtype(toy_host):
    model = make().to(torch.bfloat16)
    surgery.resize(model, prompts=5, query_len=4, init="normal")
    assert model.prompts.dtype == torch.bfloat16 and model.adapter.weight.dtype == torch.bfloat16


def test_errors_share_one_hierarchy():
    for name in surgery.errors.__all__:
        assert issubclass(getattr(surgery.errors, name), SurgeryError)


# -- properties over random sequences of changes ---------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COUNTS = st.fixed_dictionaries({}, optional={
    "prompts": st.integers(0, 6), "query_len": st.integers(1, 6), "query_layer": st.integers(1, 4),
    "memory": st.sampled_from([0, 2, 4]),
})
INIT = st.sampled_from(["restore", "zeros", "normal"])


def consistent(model):
    """Every dependent agrees with the tensors (an independent statement of the toy's layout)."""
    p = model.prompts.shape[0]
    assert model.num_prompts == model.config["num_prompts"] == p and model.pos.shape[1] == p + 5
    assert model.adapter.weight.shape[0] == model.adapter.num_embeddings == model.query_len * model.query_layer
    assert model.adapter_layers == list(range(4 - model.query_layer, 4))
    assert model(x_in(model)).shape == (2, 8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(COUNTS, INIT), max_size=4), temporary=COUNTS)
def test_any_sequence_stays_consistent_and_tokens_restores(toy_host, steps, temporary):
    model = make(prompts=2, query_len=3, query_layer=2, memory=2)
    for requested, init in steps:
        surgery.resize(model, init=init, **requested)
        consistent(model)
    before = snapshot(model)
    with surgery.tokens(model, **temporary):
        consistent(model)
    assert_same(before, snapshot(model))


def test_end_anchored_block_grows_in_front_and_truncates_from_front(toy_host, monkeypatch):
    """One adapter row per layer for the *last* L layers: shrinking drops the earliest layer's row."""
    import toy_backbone

    real = toy_backbone.toy_sites

    def end_anchored(model):
        found = real(model)
        L, Q, D = model.query_layer, model.query_len, model.dim
        found[2].tensors[0] = surgery.TokenTensor(model.adapter, "weight", axis=0, view=(L, Q, D), anchor="end")
        return found

    monkeypatch.setattr(toy_backbone, "toy_sites", end_anchored)
    model = make(query_len=2, query_layer=3)
    table = model.adapter.weight.detach().clone().view(3, 2, 8)
    surgery.resize(model, query_layer=2)
    assert torch.equal(model.adapter.weight.view(2, 2, 8), table[1:])  # the last two layers' rows kept
    surgery.resize(model, query_layer=4)  # restore: the dropped row comes back, then the default (zeros)
    grown = model.adapter.weight.view(4, 2, 8)
    assert torch.equal(grown[0], torch.zeros(2, 8)) and torch.equal(grown[1:], table)
    # several rows dropped from the front, in steps, come back in place bit for bit
    model = make(query_len=2, query_layer=4)
    table = model.adapter.weight.detach().clone().view(4, 2, 8)
    surgery.resize(model, query_layer=3)
    surgery.resize(model, query_layer=1)
    assert torch.equal(model.adapter.weight.view(1, 2, 8), table[3:])
    surgery.resize(model, query_layer=2)
    assert torch.equal(model.adapter.weight.view(2, 2, 8), table[2:])
    surgery.resize(model, query_layer=4)
    assert torch.equal(model.adapter.weight.view(4, 2, 8), table)
    with pytest.raises(ValueError, match="anchor"):
        surgery.TokenTensor(model, "prompts", axis=0, anchor="middle")


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_rows_are_reversed_a_few_at_a_time(monkeypatch, n, step):
    """The end-anchored path turns rows around through small temporaries: same as torch.flip."""
    from surgery import rows

    monkeypatch.setattr(rows, "_chunk_rows", lambda x: step)
    src = torch.arange(n * 6.0).reshape(n, 2, 3)
    dst = torch.empty(2, n, 3).movedim(1, 0)  # a strided destination, as the engine's rows are
    rows._copy_reversed(dst, src)
    assert torch.equal(dst, src.flip(0))
    rows._reverse_rows_(dst)
    assert torch.equal(dst, src)


# -- strategy mappings and declarations are checked before anything changes -------------------------


@pytest.mark.parametrize("option", ["init", "shrink"])
def test_unknown_site_in_a_strategy_mapping_is_refused_naming_it_and_the_sites(toy_host, option):
    model = make(prompts=2)
    before = snapshot(model)
    with pytest.raises(SiteError, match=r"names 'prompt'.*its sites: prompts, query_len, query_layer, memory"):
        surgery.resize(model, prompts=3, **{option: {"prompt": "zeros" if option == "init" else "pool"}})
    with pytest.raises(SiteError, match="names 'prompt'"):
        with surgery.tokens(model, prompts=1, **{option: {"prompt": "mean" if option == "init" else "truncate"}}):
            pass
    assert_same(before, snapshot(model))
    with pytest.raises(StrategyError, match="unknown init strategy 'bogus'"):  # a site not resized: still checked
        surgery.resize(model, prompts=3, init={"prompts": "zeros", "memory": "bogus"})
    assert_same(before, snapshot(model))


def _broken_declaration(monkeypatch, site_index, **changes):
    import dataclasses

    import toy_backbone

    real = toy_backbone.toy_sites

    def broken(model):
        found = real(model)
        site = found[site_index]
        site.tensors[0] = dataclasses.replace(site.tensors[0], **changes)
        return found

    monkeypatch.setattr(toy_backbone, "toy_sites", broken)


@pytest.mark.parametrize("site, index, changes, match", [
    ("prompts", 0, {"axis": 1}, r"tensor prompts, along axis 1 its extent is 8, not start \+ count = 0 \+ 2"),
    ("prompts", 0, {"start": 1, "coupled": False}, r"tensor prompts, .*extent is 2, not start \+ count = 1 \+ 2"),
    ("query_len", 1, {"axis": 0}, r"tensor adapter.weight, along axis 0 its extent is 2, not start \+ count = 0 \+ 3"),
    ("memory", 3, {"axis": 0}, r"tensor memory, along axis 0 its extent is 1, not start \+ count = 0 \+ 2"),
])
def test_a_declaration_whose_extent_is_not_its_block_is_refused(toy_host, monkeypatch, site, index, changes, match):
    """Declared on the wrong axis, the wrong dimension would grow: refused before anything changes."""
    model = make(prompts=2, memory=2)
    before = snapshot(model)
    _broken_declaration(monkeypatch, index, **changes)
    with pytest.raises(SiteError, match=rf"site '{site}'.*{match}"):
        surgery.resize(model, **{site: 4})
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("axis", [2, -3])
def test_an_axis_outside_the_tensor_is_refused(toy_host, monkeypatch, axis):
    model = make(prompts=2)
    before = snapshot(model)
    _broken_declaration(monkeypatch, 0, axis=axis)
    with pytest.raises(SiteError, match=rf"site 'prompts'.*tensor prompts, with axis {axis}, outside its 2 dimensions"):
        surgery.resize(model, prompts=3)
    assert_same(before, snapshot(model))


def test_an_attribute_the_module_lacks_is_refused_by_name(toy_host, monkeypatch):
    model = make(memory=0)
    before = snapshot(model)
    _broken_declaration(monkeypatch, 3, name="memroy")
    with pytest.raises(SiteError, match=r"site 'memory'.*memroy"):
        surgery.resize(model, memory=2)
    assert_same(before, snapshot(model))
