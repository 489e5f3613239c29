"""One test per hook, and a test that fails when a hook is added without one."""

import inspect
import sys

import pytest
import torch

import surgery
from surgery import hookspecs
from surgery.errors import BackboneError, PluginConflictError, PluginError
from surgery.plugins import PluginHost
from toy_backbone import ToyModel, ToyPlugin

HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if name.startswith("surgery_") and callable(fn) and hasattr(fn, "surgery_spec"))


def test_every_hook_has_a_test():
    assert HOOKS, "no hookspecs found"
    here = sys.modules[__name__]
    missing = [name for name in HOOKS if not callable(getattr(here, f"test_hook_{name}", None))]
    assert not missing, f"hooks without a test_hook_<name> test in {__file__}: {missing}"


def test_hookspecs_are_documented():
    for name in HOOKS:
        assert inspect.getdoc(getattr(hookspecs, name)), name


def test_hook_surgery_register_backbones(fresh_host):
    assert fresh_host.add_plugin(ToyPlugin(), "toy")
    assert fresh_host.backbones["toy"].plugin == "toy"
    assert fresh_host.identify(ToyModel()) == "toy"

    class Again:
        @surgery.hookimpl
        def surgery_register_backbones(self, register):
            register("toy", lambda m: False)

    assert not fresh_host.add_plugin(Again(), "again")
    error = fresh_host.records["again"].error
    assert "backbone 'toy' is registered by both plugin 'toy' and plugin 'again'" in error


def test_hook_surgery_register_models(fresh_host):
    fresh_host.add_plugin(ToyPlugin(), "toy")
    spec = fresh_host.model_spec("toy_tiny")
    assert spec.backbone == "toy" and spec.plugin == "toy"
    model = surgery.build("toy_tiny", prompts=3)
    assert isinstance(model, ToyModel) and surgery.counts(model)["prompts"] == 3
    assert spec.example_inputs(model)[0].shape == (2, 5, 8)

    class UnknownBackbone:
        @surgery.hookimpl
        def surgery_register_models(self, register):
            register("x", ToyModel, "no_such_backbone")

    assert not fresh_host.add_plugin(UnknownBackbone(), "bad_models")
    assert "names backbone 'no_such_backbone'" in fresh_host.records["bad_models"].error


class ToyResolver:
    """Resolves `toy/<prompts>` (a toy model with that many prompts); refuses `toy/<not a number>`."""

    def __init__(self):
        self.asked = []

    @surgery.hookimpl
    def surgery_resolve_model(self, name, register):
        self.asked.append(name)
        if not name.startswith("toy/"):
            return
        if not name[4:].isdigit():
            raise BackboneError(f"toy models are toy/<number of prompts>, not {name!r}")
        register(name, lambda **kw: ToyModel(**{"prompts": int(name[4:]), **kw}), "toy", safe_kwargs=("prompts",))


def test_hook_surgery_resolve_model(fresh_host):
    fresh_host.add_plugin(ToyPlugin(), "toy")
    resolver = ToyResolver()
    fresh_host.add_plugin(resolver, "toy_names")
    model = surgery.build("toy/3")
    assert isinstance(model, ToyModel) and surgery.counts(model)["prompts"] == 3
    spec = fresh_host.model_spec("toy/3")
    assert (spec.plugin, spec.backbone, spec.safe_kwargs) == ("toy_names", "toy", frozenset({"prompts"}))
    assert resolver.asked == ["toy/3"]  # once per name; a registered name is never asked about
    assert fresh_host.model_spec("toy_tiny").plugin == "toy" and resolver.asked == ["toy/3"]
    assert "toy/3" not in fresh_host.models  # `surgery models` lists what plugins registered
    with pytest.raises(BackboneError, match="not 'toy/x'"):  # the resolver's own refusal
        fresh_host.model_spec("toy/x")
    with pytest.raises(BackboneError, match="no plugin can build a model named 'other'.*asked: toy_names"):
        fresh_host.model_spec("other")

    class Also:
        @surgery.hookimpl
        def surgery_resolve_model(self, name, register):
            register(name, ToyModel, "toy")

    fresh_host.add_plugin(Also(), "also")
    with pytest.raises(PluginConflictError, match="'toy/4' is resolved by several plugins"):
        fresh_host.model_spec("toy/4")
    assert fresh_host.model_spec("toy/x").plugin == "also"  # a refusal gives way to a plugin that resolves


@pytest.mark.parametrize("resolve, message", [
    (lambda name, register: register("something_else", ToyModel, "toy"), "may register only the name asked"),
    (lambda name, register: register(name, ToyModel, "no_such_backbone"), "names backbone 'no_such_backbone'"),
    (lambda name, register: 1 / 0, "surgery_resolve_model raised ZeroDivisionError"),
])
def test_a_resolver_that_misbehaves_is_named(fresh_host, resolve, message):
    fresh_host.add_plugin(ToyPlugin(), "toy")

    class Bad:
        surgery_resolve_model = staticmethod(surgery.hookimpl(resolve))

    fresh_host.add_plugin(Bad(), "bad")
    with pytest.raises(PluginError, match=message):
        fresh_host.model_spec("toy/1")
    assert "toy/1" not in fresh_host.resolved


def test_hook_surgery_token_sites(fresh_host):
    fresh_host.add_plugin(ToyPlugin(), "toy")

    class ExtraSite:
        """A third-party plugin adding a site to another plugin's backbone."""

        @surgery.hookimpl
        def surgery_token_sites(self, model, backbone):
            if backbone != "toy":
                return None
            return [surgery.TokenSite("extra_prompts", model.num_prompts,
                                      tensors=[surgery.TokenTensor(model, "prompts", axis=0)])]

    fresh_host.add_plugin(ExtraSite(), "extra")
    sites = surgery.sites(ToyModel())
    assert sites["extra_prompts"].plugin == "extra" and sites["prompts"].plugin == "toy"

    class Clash:
        @surgery.hookimpl
        def surgery_token_sites(self, model, backbone):
            return [surgery.TokenSite("prompts", 0)]

    fresh_host.add_plugin(Clash(), "clash")
    with pytest.raises(PluginConflictError, match="'prompts'.*both plugin 'toy' and plugin 'clash'"):
        surgery.sites(ToyModel())


def test_hook_surgery_apply_count(fresh_host):
    plugin = ToyPlugin()
    fresh_host.add_plugin(plugin, "toy")
    model = ToyModel(layers=4, query_layer=1)
    surgery.resize(model, query_layer=2)
    assert model.adapter_layers == [2, 3]  # set only by the toy plugin's apply_count hook
    # sites without a custom apply are applied by the engine from the declaration alone
    surgery.resize(model, prompts=4)
    assert model.prompts.shape == (4, 8)


def test_hook_surgery_before_resize(fresh_host):
    plugin = ToyPlugin()
    fresh_host.add_plugin(plugin, "toy")
    model = ToyModel(prompts=2)
    seen = []

    class Observer:
        @surgery.hookimpl
        def surgery_before_resize(self, model, backbone, changes):
            seen.append((surgery.counts(model)["prompts"], changes))  # counts not yet changed

    fresh_host.add_plugin(Observer(), "observer")
    surgery.resize(model, prompts=3)
    assert seen == [(2, {"prompts": (2, 3)})]


def test_hook_surgery_after_resize(fresh_host):
    fresh_host.add_plugin(ToyPlugin(), "toy")
    model = ToyModel(prompts=2)

    class Cache:
        """A plugin caching something derived from a count, dropped on every change."""

        def __init__(self):
            self.value = None

        def get(self, model):
            if self.value is None:
                self.value = model.prompts.sum().item()
            return self.value

        @surgery.hookimpl
        def surgery_after_resize(self, model, backbone, changes):
            self.value = None

    cache = Cache()
    fresh_host.add_plugin(cache, "cache")
    first = cache.get(model)
    surgery.resize(model, prompts=4, init="normal")
    assert cache.value is None and cache.get(model) == model.prompts.sum().item() != first
    with surgery.tokens(model, prompts=1):
        assert cache.get(model) == model.prompts.sum().item()
    assert cache.value is None  # dropped again after the restore


def test_typo_in_hook_name_fails_the_plugin(fresh_host):
    class Typo:
        @surgery.hookimpl
        def surgery_token_site(self, model, backbone):  # missing "s"
            return []

    assert not fresh_host.add_plugin(Typo(), "typo")
    assert "surgery_token_site" in fresh_host.records["typo"].error


def test_wrong_hook_signature_fails_the_plugin(fresh_host):
    class Wrong:
        @surgery.hookimpl
        def surgery_token_sites(self, model, backbone, extra):
            return []

    assert not fresh_host.add_plugin(Wrong(), "wrong")
    assert "extra" in fresh_host.records["wrong"].error


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("SURGERY_STRICT_PLUGINS", "1")
    host = PluginHost()

    class Broken:
        @surgery.hookimpl
        def surgery_register_backbones(self, register):
            raise RuntimeError("no")

    with pytest.raises(PluginError, match="plugin 'broken'.*RuntimeError: no"):
        host.add_plugin(Broken(), "broken")


def test_identify_with_none_or_several_matches(fresh_host):
    with pytest.raises(surgery.errors.BackboneError, match="no plugin recognises a model of type Linear"):
        surgery.sites(torch.nn.Linear(2, 2))
    fresh_host.add_plugin(ToyPlugin(), "toy")

    class Greedy:
        @surgery.hookimpl
        def surgery_register_backbones(self, register):
            register("anything", lambda m: True)

    fresh_host.add_plugin(Greedy(), "greedy")
    with pytest.raises(PluginConflictError, match="'toy' \\(plugin 'toy'\\).*'anything' \\(plugin 'greedy'\\)"):
        surgery.sites(ToyModel())
    assert "prompts" in surgery.sites(ToyModel(), backbone="toy")


def test_token_sites_raising_is_a_plugin_error_naming_the_plugin(fresh_host):
    fresh_host.add_plugin(ToyPlugin(), "toy")

    class Raises:
        @surgery.hookimpl
        def surgery_token_sites(self, model, backbone):
            return [surgery.TokenSite("extra", model.no_such_attribute)]

    fresh_host.add_plugin(Raises(), "raises")
    with pytest.raises(PluginError, match="plugin 'raises': surgery_token_sites raised AttributeError"):
        surgery.sites(ToyModel())


@pytest.mark.parametrize("raised", [RuntimeError("disk on fire"), surgery.errors.CountError("no such count"),
                                    SystemExit(3)])
def test_apply_count_errors_are_blamed_on_the_plugin_that_raised(fresh_host, raised):
    """A third party's apply raising for a site the toy plugin declares names the third party."""
    fresh_host.add_plugin(ToyPlugin(), "toy")

    class ThirdParty:
        @surgery.hookimpl
        def surgery_apply_count(self, model, backbone, change):
            raise raised

    fresh_host.add_plugin(ThirdParty(), "third_party")
    model = ToyModel(prompts=2)
    with pytest.raises(surgery.errors.SurgeryError) as caught:
        surgery.resize(model, prompts=4)
    text = str(caught.value)
    assert "plugin 'third_party'" in text and "'toy'" not in text, text
    assert surgery.counts(model)["prompts"] == 2 and model.prompts.shape == (2, 8)


def test_apply_count_keeps_pluggys_first_result_order(fresh_host):
    """The engine calls the implementations one by one, in pluggy's order: the last registered first."""
    fresh_host.add_plugin(ToyPlugin(), "toy")
    calls = []

    def handler(name, result):
        class Handler:
            @surgery.hookimpl
            def surgery_apply_count(self, model, backbone, change):
                calls.append(name)
                if result:
                    change.apply_default()
                return result
        return Handler()

    fresh_host.add_plugin(handler("first", True), "first")
    fresh_host.add_plugin(handler("second", None), "second")
    surgery.resize(ToyModel(prompts=2), prompts=3)
    assert calls == ["second", "first"]


def test_hook_surgery_model_options(fresh_host):
    from surgery.options import model_options
    from test_options import OptionsPlugin

    assert fresh_host.add_plugin(OptionsPlugin(), "options")
    assert "surgery_model_options" in fresh_host.records["options"].hooks
    model = surgery.build("prompted_tiny")
    model.pooling = "mean"
    assert model_options(model) == {"pooling": "mean", "window": {"size": 3, "stride": 1}}


def test_hook_surgery_apply_options(fresh_host, tmp_path):
    from test_options import OptionsPlugin

    assert fresh_host.add_plugin(OptionsPlugin(), "options")
    model = surgery.build("prompted_tiny")
    model.pooling = "mean"
    surgery.save(model, tmp_path / "mean.safetensors")
    fresh = surgery.build("prompted_tiny")
    surgery.load(tmp_path / "mean.safetensors", fresh)  # the option comes back through the hook
    assert fresh.pooling == "mean"


def test_hook_surgery_register_metrics(fresh_host):
    from surgery.sweep.metrics import available

    class Scores:
        @surgery.hookimpl
        def surgery_register_metrics(self, register):
            register("toy_score", lambda evaluation: {"score": 1.0}, values=("score",), backbones=("toy",),
                     needs="nothing")

    fresh_host.add_plugin(ToyPlugin(), "toy")
    assert fresh_host.add_plugin(Scores(), "scores")
    spec = fresh_host.metrics["toy_score"]
    assert (spec.plugin, spec.values, spec.backbones) == ("scores", ("score",), ("toy",))
    assert fresh_host.records["scores"].metrics == ["toy_score"]
    assert set(available("toy")) == {"drift", "toy_score"} and "toy_score" not in available("timm_vit")

    class Taken:
        def __init__(self, name, values=("v",)):
            self.name, self.values = name, values

        @surgery.hookimpl
        def surgery_register_metrics(self, register):
            register("kept_only_if_all_succeed", lambda e: {}, values=("v",))
            register(self.name, lambda e: {}, values=self.values)

    for plugin, name, error in ((Taken("toy_score"), "again", "metric 'toy_score' is registered by both plugin "
                                 "'scores' and plugin 'again'"),
                                (Taken("drift"), "core", "metric 'drift' is registered by both plugin "
                                 "'surgery (core)' and plugin 'core'"),
                                (Taken("empty", values=()), "empty", "the names of its values")):
        assert not fresh_host.add_plugin(plugin, name)
        assert error in fresh_host.records[name].error
    assert "kept_only_if_all_succeed" not in fresh_host.metrics  # a failed plugin keeps nothing it registered


def test_hook_surgery_submodels(fresh_host):
    """A model holding a toy model at `inner` has the toy's sites, applied by the toy's plugin
    (surgery.compose; the details are in tests/test_compose.py)."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ToyModel()

    class HolderPlugin:
        @surgery.hookimpl
        def surgery_register_backbones(self, register):
            register("holder", lambda m: isinstance(m, Holder))

        @surgery.hookimpl
        def surgery_submodels(self, model, backbone):
            return [("inner", "toy")] if backbone == "holder" else None

    assert fresh_host.add_plugin(ToyPlugin(), "toy") and fresh_host.add_plugin(HolderPlugin(), "holder")
    model = Holder()
    assert list(surgery.sites(model)) == list(surgery.sites(model.inner))
    surgery.resize(model, prompts=3, query_layer=3)
    assert model.inner.prompts.shape[0] == 3 and model.inner.adapter_layers == [1, 2, 3]


def test_hook_surgery_register_commands():
    from surgery.commands import CommandRegistry

    class Commands:
        @surgery.hookimpl
        def surgery_register_commands(self, register):
            register("probe", lambda args: 7, help="a probe", add_arguments=lambda p: p.add_argument("--n", type=int))

    registry = CommandRegistry()
    assert registry.add_module(Commands(), "probe_module")
    command = registry.commands["probe"]
    assert command.plugin == "probe_module" and command.run(None) == 7


class ReleasedViTLayout:
    """A toy "official release" of a timm ViT: its tensors under `release.*` names; a folder holding
    `registers.pth` has only the register tokens (a partial checkpoint)."""

    @surgery.hookimpl
    def surgery_checkpoint_layout(self, path, state_dict):
        from surgery.layouts import Layout

        if path.is_dir():
            if not (path / "registers.pth").exists():
                return None
            return Layout("registers folder", {"reg_token": torch.load(path / "registers.pth", weights_only=True)},
                          partial=True)
        if not any(k.startswith("release.") for k in state_dict):
            return None
        renamed = {k.removeprefix("release."): v for k, v in state_dict.items()}
        return Layout("vit release", renamed, model="vit_tiny_test",
                      model_kwargs={"reg_tokens": renamed["reg_token"].shape[1]})


@pytest.fixture
def vit_host(fresh_host):
    import surgery_plugins.timm_vit

    fresh_host.add_plugin(surgery_plugins.timm_vit, "timm_vit")
    return fresh_host


def test_hook_surgery_checkpoint_layout(vit_host, tmp_path):
    from surgery.layouts import read_any

    vit_host.add_plugin(ReleasedViTLayout(), "vit_release")
    torch.manual_seed(0)
    source = surgery.build("vit_tiny_test", reg_tokens=3).eval()
    torch.save({f"release.{k}": v for k, v in source.state_dict().items()}, tmp_path / "release.pth")
    _, _, layout = read_any(tmp_path / "release.pth")
    assert (layout.name, layout.plugin, layout.model, dict(layout.model_kwargs)) == \
        ("vit release", "vit_release", "vit_tiny_test", {"reg_tokens": 3})
    target = surgery.build("vit_tiny_test", reg_tokens=1).eval()
    result = surgery.load(tmp_path / "release.pth", target)  # resized to the file's 3 registers, then loaded
    assert result.counts["reg_tokens"] == 3
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(images), source(images))
    # a partial folder: only the register tokens are the file's; every other tensor stays as built
    # (those that grew with the count, such as a pos_embed with register rows, keep their old rows)
    folder = tmp_path / "registers_only"
    folder.mkdir()
    torch.save(source.reg_token.data[:, :2].clone(), folder / "registers.pth")
    fresh = surgery.build("vit_tiny_test", reg_tokens=1)
    others = {k: v.clone() for k, v in fresh.state_dict().items() if k != "reg_token"}
    surgery.load(folder, fresh)
    assert torch.equal(fresh.reg_token, source.reg_token[:, :2])
    now = fresh.state_dict()
    assert all(torch.equal(now[k], v) for k, v in others.items() if now[k].shape == v.shape)


def test_layout_hook_failures_are_attributed_and_change_nothing(vit_host, tmp_path):
    from surgery.errors import CheckpointError
    from surgery.layouts import Layout

    class Raises:
        @surgery.hookimpl
        def surgery_checkpoint_layout(self, path, state_dict):
            raise RuntimeError("layout reader bug")

    class Garbage:
        @surgery.hookimpl
        def surgery_checkpoint_layout(self, path, state_dict):
            return {"not": "a layout"}

    class AlsoClaims:
        @surgery.hookimpl
        def surgery_checkpoint_layout(self, path, state_dict):
            return Layout("mine too", dict(state_dict or {}))

    model = surgery.build("vit_tiny_test", reg_tokens=1)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="no plugin recognises its layout"):
        surgery.load(tmp_path / "folder", model)
    for plugin, error, message in [(Raises(), PluginError, "'raises': surgery_checkpoint_layout raised RuntimeError"),
                                   (Garbage(), PluginError, "'garbage': surgery_checkpoint_layout returned dict"),
                                   (AlsoClaims(), PluginConflictError, "several layouts")]:
        name = type(plugin).__name__.lower()
        vit_host.add_plugin(plugin, name)
        if isinstance(plugin, AlsoClaims):
            vit_host.add_plugin(ReleasedViTLayout(), "vit_release")
            torch.save({f"release.{k}": v for k, v in model.state_dict().items()}, tmp_path / "plain.pth")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=message):
            surgery.load(tmp_path / "plain.pth", model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        vit_host.pm.unregister(name=name)
