"""Composed models (surgery.compose): a model of one backbone holding a model of another.

`Outer` holds a toy model (tests/toy_backbone.py, whose `query_layer` is applied through
`surgery_apply_count`) at `inner` and has a site of its own; the outer plugin only declares the
sub-model. Everything the engine does with the toy's sites must then work through the outer model:
listing, resizing (the structural hook gets the toy model), events, tokens(...), recipes,
(checkpoints: the ImageBind-LLM plugin's tests); and a bad declaration is a PluginError naming the plugin.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from surgery.errors import PluginConflictError, PluginError
from surgery.site import Counter, TokenSite, TokenTensor
from surgery.testing import check_conformance, check_recipe_replays, check_submodels_compose, check_tokens_restores
from toy_backbone import ToyModel, ToyPlugin


class Outer(nn.Module):
    def __init__(self, extra=2, dim=8, **toy):
        super().__init__()
        self.head = nn.Linear(dim, dim)
        self.inner = ToyModel(dim=dim, **toy)
        self.num_extra = extra
        self.extra = nn.Parameter(torch.randn(extra, dim))

    def forward(self, x):
        return self.head(self.inner(x)) + self.extra.sum(0)


class OuterPlugin:
    def __init__(self, declared=(("inner", "toy"),), site_name="extra"):
        self.declared, self.site_name, self.events = list(declared), site_name, []

    @surgery.hookimpl
    def surgery_register_backbones(self, register):
        register("outer", lambda m: isinstance(m, Outer))

    @surgery.hookimpl
    def surgery_submodels(self, model, backbone):
        return self.declared if backbone == "outer" else None

    @surgery.hookimpl
    def surgery_token_sites(self, model, backbone):
        if backbone != "outer":
            return None
        return [TokenSite(self.site_name, model.num_extra, tensors=[TokenTensor(model, "extra", axis=0)],
                          counters=[Counter(model, "num_extra")], min=0, max=8)]

    @surgery.hookimpl
    def surgery_before_resize(self, model, backbone, changes):
        self.events.append(("before", backbone, type(model).__name__, dict(changes)))


@pytest.fixture
def hosts(fresh_host):
    toy, outer = ToyPlugin(), OuterPlugin()
    assert fresh_host.add_plugin(toy, "toy") and fresh_host.add_plugin(outer, "outer")
    return toy, outer


def inputs():
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


def test_sub_model_sites_are_the_composed_models(hosts):
    model = Outer()
    found = surgery.sites(model)
    assert list(found) == ["extra", "prompts", "query_len", "query_layer", "memory"]
    assert {n: (s.plugin, s.part) for n, s in found.items()} == {
        "extra": ("outer", ""), **{n: ("toy", "inner") for n in ("prompts", "query_len", "query_layer", "memory")}}
    assert found["prompts"].tensors[0].module is model.inner
    paths = {t["key"] for t in found["prompts"].to_dict(surgery.site.module_paths(model))["tensors"]}
    assert paths == {"inner.prompts", "inner.pos"}


class Shell(nn.Module):
    """An Outer inside another model: sub-models of sub-models."""

    def __init__(self):
        super().__init__()
        self.body = Outer()


class ShellPlugin:
    @surgery.hookimpl
    def surgery_register_backbones(self, register):
        register("shell", lambda m: isinstance(m, Shell))

    @surgery.hookimpl
    def surgery_submodels(self, model, backbone):
        return [("body", "outer")] if backbone == "shell" else None


def test_sub_models_of_sub_models(hosts, fresh_host):
    assert fresh_host.add_plugin(ShellPlugin(), "shell")
    model = Shell()
    found = surgery.sites(model)
    assert {n: s.part for n, s in found.items()} == {"extra": "body", "prompts": "body.inner",
                                                     "query_len": "body.inner", "query_layer": "body.inner",
                                                     "memory": "body.inner"}
    surgery.resize(model, query_layer=3, extra=0)
    assert model.body.inner.adapter_layers == [1, 2, 3] and model.body.extra.shape == (0, 8)


def test_resizing_through_the_outer_model_is_resizing_the_sub_model(hosts):
    toy, outer = hosts
    torch.manual_seed(0)
    model = Outer()
    torch.manual_seed(0)
    alone = Outer()
    surgery.resize(model, query_layer=3, prompts=4, extra=1, init="normal", seed=3)
    surgery.resize(alone.inner, query_layer=3, prompts=4, init="normal", seed=3)
    assert model.inner.adapter_layers == [1, 2, 3]  # the toy's structural hook ran on the toy model
    for key, value in alone.inner.state_dict().items():
        assert torch.equal(model.inner.state_dict()[key], value), key
    assert model.extra.shape == (1, 8) and model.num_extra == 1
    # events reach every part, each as its own kind of model
    assert ("before", "outer", "Outer", {"prompts": (2, 4), "query_layer": (2, 3), "extra": (2, 1)}) in outer.events
    assert any(e[:2] == ("before", "toy") and e[2]["prompts"] == (2, 4) for e in toy.events)


def test_tokens_and_recipes(hosts):
    torch.manual_seed(0)
    model = Outer()
    x = inputs()
    before = model(x)
    with surgery.tokens(model, prompts=5, memory=2):
        assert model.inner.prompts.shape == (5, 8) and model.inner.memory.shape == (1, 2, 8)
    assert torch.equal(model(x), before)
    surgery.resize(model, prompts=3, query_len=5, init="mean")
    torch.manual_seed(0)
    fresh = Outer()
    surgery.recipe(model).replay(fresh)
    assert torch.equal(fresh(x), model(x))


def test_the_conformance_kit_checks_composed_models(hosts):
    def factory():
        return Outer()

    check_conformance(factory, lambda m: (inputs(),),
                      checks=(check_submodels_compose, check_tokens_restores, check_recipe_replays))


class ModalToyPlugin(ToyPlugin):
    """The toy plugin with a model option, `toy_mode` (a plain attribute of the toy model)."""

    @surgery.hookimpl
    def surgery_model_options(self, model, backbone):
        return {"toy_mode": getattr(model, "mode", "plain")} if backbone == "toy" else None

    @surgery.hookimpl
    def surgery_apply_options(self, model, backbone, options, edit):
        if backbone == "toy" and "toy_mode" in options:
            edit.set_attr(model, "mode", options["toy_mode"])


def test_sub_model_options_are_the_composed_models(fresh_host, tmp_path):
    from surgery.edit import Edit
    from surgery.options import apply_options, model_options

    assert fresh_host.add_plugin(ModalToyPlugin(), "toy") and fresh_host.add_plugin(OuterPlugin(), "outer")
    model = Outer()
    assert model_options(model) == {"toy_mode": "plain"}
    edit = Edit()
    apply_options(model, {"toy_mode": "fancy"}, edit)
    assert model.inner.mode == "fancy" and not hasattr(model, "mode")  # set on the sub-model, by its plugin
    edit.rollback()
    assert not hasattr(model.inner, "mode")


class MeddlingOuterPlugin(OuterPlugin):
    """A composing plugin with a bug: it edits its sub-model behind the engine's back on a resize."""

    @surgery.hookimpl
    def surgery_after_resize(self, model, backbone, changes):
        if backbone == "outer" and "prompts" in changes:
            with torch.no_grad():
                model.inner.prompts.mul_(2)


def test_the_kit_catches_a_sub_model_changed_differently_when_composed(fresh_host):
    assert fresh_host.add_plugin(ToyPlugin(), "toy") and fresh_host.add_plugin(MeddlingOuterPlugin(), "outer")
    with pytest.raises(AssertionError, match=r"check_submodels_compose: prompts -> \d+ through the composed model "
                                             r"and on the 'toy' sub-model alone give different sub-models"):
        check_conformance(Outer, lambda m: (inputs(),), checks=(check_submodels_compose,))


@pytest.mark.parametrize("declared,message", [
    ([("nowhere", "toy")], r"names 'nowhere', which is not a submodule"),
    ([("", "toy")], r"names '', which is not a submodule"),
    ([("inner", "vit")], r"as backbone 'vit', which no plugin registered"),
    ([("head", "toy")], r"as a 'toy' model, but that backbone's detector does not recognise the Linear"),
    ([("inner", "toy"), ("inner", "toy")], r"'inner' is already a part"),
    (["inner"], r"must return a list of \(attribute path, backbone name\) pairs"),
])
def test_bad_declarations_are_plugin_errors(fresh_host, declared, message):
    assert fresh_host.add_plugin(ToyPlugin(), "toy") and fresh_host.add_plugin(OuterPlugin(declared), "outer")
    with pytest.raises(PluginError, match=r"plugin 'outer': surgery_submodels .*" + message):
        surgery.sites(Outer())


def test_a_site_name_shared_with_the_sub_model_is_a_conflict(fresh_host):
    assert fresh_host.add_plugin(ToyPlugin(), "toy")
    assert fresh_host.add_plugin(OuterPlugin(site_name="prompts"), "outer")
    with pytest.raises(PluginConflictError, match="site 'prompts' .* declared by both plugin 'outer' and plugin 'toy'"):
        surgery.sites(Outer())
