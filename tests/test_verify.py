"""surgery/verify.py: what plugins declare (`surgery_token_sites`) and what they apply
(`surgery_apply_count`) is checked, and a plugin that lies is named and rolled back.

The expected shapes are written out here from the toy model's layout (tests/toy_backbone.py),
not taken from the engine: prompts (P, D) with P coupled rows in pos (1, P + S, D), and the
adapter table stored flat as (L * Q, D).
"""

import re

import pytest

import surgery
from surgery.cli import main
from surgery.errors import PluginError, ResizeError
from surgery.site import TokenSite, TokenTensor
from toy_backbone import ToyModel, ToyPlugin, assert_same, snapshot


def _sites_plugin(declare):
    """A third-party plugin adding sites to toy models: `declare(model)` is what it returns."""
    class Declares:
        @surgery.hookimpl
        def surgery_token_sites(self, model, backbone):
            return declare(model) if backbone == "toy" else None
    return Declares()


GARBAGE = {
    "a dict": (lambda m: {"extra": 1}, "returned a dict"),
    "a string": (lambda m: "extra", "returned a str"),
    "not sites": (lambda m: ["extra"], "item 0 that is a str"),
    "negative count": (lambda m: [TokenSite("extra", -1)], "count -1"),
    "count not int": (lambda m: [TokenSite("extra", 1.0)], "count 1.0"),
    "no name": (lambda m: [TokenSite("", 0)], "non-empty string"),
    "tensors not TokenTensor": (lambda m: [TokenSite("extra", 0, tensors=["prompts"])], "not a list of"),
    "counters not Counter": (lambda m: [TokenSite("extra", 0, counters=[("num_prompts",)])], "not a list of"),
    "tensor on no module": (lambda m: [TokenSite("extra", 0, tensors=[TokenTensor("model", "prompts", axis=0)])],
                            "declare an attribute of an nn.Module"),
    "axis not int": (lambda m: [TokenSite("extra", 0, tensors=[TokenTensor(m, "prompts", axis="rows")])],
                     "axis 'rows'"),
    "view not ints": (lambda m: [TokenSite("extra", 0, tensors=[TokenTensor(m, "prompts", axis=0, view=[2, 8])])],
                      "view [2, 8]"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_from_token_sites_is_a_plugin_error_naming_it(fresh_host, case):
    declare, says = GARBAGE[case]
    fresh_host.add_plugin(ToyPlugin(), "toy")
    fresh_host.add_plugin(_sites_plugin(declare), "junk")
    with pytest.raises(PluginError, match="plugin 'junk': surgery_token_sites") as caught:
        surgery.sites(ToyModel())
    assert says in str(caught.value)


def test_well_formed_sites_of_every_kind_pass(fresh_host):
    """The toy plugin's own sites (coupled rows, a view, a template at count 0) are accepted."""
    fresh_host.add_plugin(ToyPlugin(), "toy")
    assert list(surgery.sites(ToyModel(memory=0))) == ["prompts", "query_len", "query_layer", "memory"]


def _applies(apply):
    """A third-party plugin whose surgery_apply_count claims every change of site 'prompts'/'query_len'."""
    class Applies:
        @surgery.hookimpl
        def surgery_apply_count(self, model, backbone, change):
            if change.site.name in ("prompts", "query_len"):
                return apply(change)
            return None
    return Applies()


def _resize_tensors_only(change):
    for t in change.site.tensors:
        change.resize_tensor(t)
    return True


def _counters_only(change):
    for c in change.site.counters:
        change.edit.set_attr(c.target, c.attr, c.value_for(change.new))
    return True


LIARS = {
    # what the plugin does, the site changed, what the error must say (independent expected shapes)
    "returns True, does nothing": (lambda change: True, dict(prompts=3),
                                   r"tensor prompts is \[2, 8\], expected shape \[3, 8\]"),
    "coupled rows forgotten": (lambda change: change.resize_tensor(change.site.tensors[0]) or True, dict(prompts=3),
                               r"tensor pos is \[1, 7, 8\], expected shape \[1, 8, 8\]"),
    "counters forgotten": (_resize_tensors_only, dict(prompts=3), r"counter ToyModel.num_prompts is 2, expected 3"),
    "a view's table forgotten": (_counters_only, dict(query_len=4),
                                 r"tensor adapter.weight is \[6, 8\], expected shape \[8, 8\]"),
    "not a bool": (lambda change: "done", dict(prompts=3), r"returned 'done'; return True or None"),
}


@pytest.mark.parametrize("how", ["resize", "tokens"])
@pytest.mark.parametrize("case", list(LIARS))
def test_apply_that_does_not_reach_the_count_is_rolled_back_naming_the_plugin(fresh_host, case, how):
    apply, requested, says = LIARS[case]
    fresh_host.add_plugin(ToyPlugin(), "toy")
    fresh_host.add_plugin(_applies(apply), "liar")
    model = ToyModel(prompts=2, query_len=3, query_layer=2)
    before = snapshot(model)
    with pytest.raises(ResizeError, match="plugin 'liar'") as caught:
        if how == "resize":
            surgery.resize(model, **requested)
        else:
            with surgery.tokens(model, **requested):
                pass
    assert re.search(says, str(caught.value)), caught.value
    assert_same(snapshot(model), before)
    assert surgery.counts(model) == {"prompts": 2, "query_len": 3, "query_layer": 2, "memory": 0}


def test_an_honest_plugin_apply_passes(fresh_host):
    """A plugin applying the change itself, fully, through the journal: accepted, and undone by tokens()."""
    fresh_host.add_plugin(ToyPlugin(), "toy")
    fresh_host.add_plugin(_applies(lambda change: change.apply_default() or True), "honest")
    model = ToyModel(prompts=2, query_len=3, query_layer=2)
    before = snapshot(model)
    with surgery.tokens(model, prompts=5, query_len=1):
        assert model.prompts.shape == (5, 8) and model.pos.shape == (1, 10, 8)
        assert model.adapter.weight.shape == (2, 8) and model.adapter.num_embeddings == 2
    assert_same(snapshot(model), before)


def test_absent_at_zero_is_accepted_for_a_templated_tensor(fresh_host):
    fresh_host.add_plugin(ToyPlugin(), "toy")
    model = ToyModel(memory=2)

    class Memory:
        @surgery.hookimpl
        def surgery_apply_count(self, model, backbone, change):
            return change.apply_default() or True if change.site.name == "memory" else None

    fresh_host.add_plugin(Memory(), "memory")
    surgery.resize(model, memory=0)
    assert model.memory is None


def test_cli_resize_with_a_lying_plugin_writes_nothing(surgery_host, tmp_path, capsys):
    """The audit's case: the CLI printed "resized 0 -> 3" and wrote a file still at 0."""
    surgery_host.add_plugin(_lying_for("reg_tokens"), "liar")
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    surgery.save(surgery.build("vit_tiny_test"), src)
    code = main(["resize", str(src), "--set", "reg_tokens=3", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.count("\n") == 1 and "plugin 'liar' applied site 'reg_tokens' (0 -> 3)" in err


def _lying_for(site):
    class Lies:
        @surgery.hookimpl
        def surgery_apply_count(self, model, backbone, change):
            return True if change.site.name == site else None
    return Lies()

