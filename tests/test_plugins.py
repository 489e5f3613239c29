"""The plugin host: entry points, guarded loading, SURGERY_PLUGINS / SURGERY_STRICT_PLUGINS."""

import importlib.metadata
import pathlib
import textwrap

import pytest

import surgery
from surgery.errors import PluginError
from surgery.plugins import ENTRY_POINT_GROUP, PluginHost

GOOD = """
    import surgery
    from torch import nn

    class Marker(nn.Module):
        pass

    @surgery.hookimpl
    def surgery_register_backbones(register):
        register("{name}_backbone", lambda m: isinstance(m, Marker))

    @surgery.hookimpl
    def surgery_register_models(register):
        register("{name}_model", Marker, "{name}_backbone")
"""
RAISES_ON_IMPORT = "raise ImportError('needs a package that is not installed')\n"
HALF_REGISTERS = """
    import surgery

    @surgery.hookimpl
    def surgery_register_backbones(register):
        register("half_backbone", lambda m: False)
        raise RuntimeError("second backbone failed")
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(module: str, source: str) -> importlib.metadata.EntryPoint:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return importlib.metadata.EntryPoint(name=module, value=module, group=ENTRY_POINT_GROUP)
    return write


def test_broken_plugins_are_recorded_and_others_work(plugin_dir, monkeypatch):
    monkeypatch.delenv("SURGERY_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)
    eps = [plugin_dir("alpha", GOOD.format(name="alpha")), plugin_dir("broken_import", RAISES_ON_IMPORT),
           plugin_dir("half", HALF_REGISTERS), plugin_dir("omega", GOOD.format(name="omega"))]
    host = PluginHost()
    host.load_entry_points(eps)
    status = {name: r.status for name, r in host.records.items()}
    assert status == {"alpha": "loaded", "broken_import": "failed", "half": "failed", "omega": "loaded"}
    assert "ImportError: needs a package that is not installed" in host.records["broken_import"].error
    assert "RuntimeError: second backbone failed" in host.records["half"].error
    # the half-registered plugin left no trace: not in the manager, its first backbone not kept
    assert "half_backbone" not in host.backbones and host.pm.get_plugin("half") is None
    assert set(host.backbones) == {"alpha_backbone", "omega_backbone"}
    assert set(host.models) == {"alpha_model", "omega_model"}
    assert host.records["alpha"].hooks == ["surgery_register_backbones", "surgery_register_models"]


def test_strict_plugins_makes_failure_fatal(plugin_dir, monkeypatch):
    monkeypatch.setenv("SURGERY_STRICT_PLUGINS", "1")
    eps = [plugin_dir("broken_import2", RAISES_ON_IMPORT)]
    with pytest.raises(PluginError, match="plugin 'broken_import2'.*ImportError"):
        PluginHost().load_entry_points(eps)


@pytest.mark.parametrize("only, expected", [("beta", {"beta"}), ("beta, gamma", {"beta", "gamma"}), ("", set())])
def test_surgery_plugins_selects(plugin_dir, monkeypatch, only, expected):
    monkeypatch.setenv("SURGERY_PLUGINS", only)
    eps = [plugin_dir(n, GOOD.format(name=n)) for n in ("beta", "gamma", "delta")]
    host = PluginHost()
    host.load_entry_points(eps)
    assert set(host.records) == expected


def test_builtin_plugin_comes_through_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("timm_vit") == "surgery_plugins.timm_vit"
    record = surgery.get_host().records["timm_vit"]
    assert record.status == "loaded" and "surgery_token_sites" in record.hooks
    assert "vit_tiny_test" in record.models


def test_core_imports_no_plugin_by_name():
    core = pathlib.Path(surgery.__file__).parent
    for path in core.glob("*.py"):
        text = path.read_text()
        assert "import surgery_plugins" not in text and "from surgery_plugins" not in text, path
        assert "import_module(\"surgery_plugins" not in text, path


def test_same_plugin_name_twice_is_refused(fresh_host):
    from toy_backbone import ToyPlugin

    assert fresh_host.add_plugin(ToyPlugin(), "toy")
    assert not fresh_host.add_plugin(ToyPlugin(), "toy")
    assert fresh_host.records["toy"].status == "loaded"  # the first one keeps working
    refused = [r for name, r in fresh_host.records.items() if name != "toy"]
    assert len(refused) == 1 and "already loaded" in refused[0].error


def test_duplicate_model_names_name_both(fresh_host):
    class A:
        @surgery.hookimpl
        def surgery_register_backbones(self, register):
            register("bb_a", lambda m: False)

        @surgery.hookimpl
        def surgery_register_models(self, register):
            register("shared_name", lambda: None, "bb_a")

    class B:
        @surgery.hookimpl
        def surgery_register_backbones(self, register):
            register("bb_b", lambda m: False)

        @surgery.hookimpl
        def surgery_register_models(self, register):
            register("shared_name", lambda: None, "bb_b")

    assert fresh_host.add_plugin(A(), "a") and not fresh_host.add_plugin(B(), "b")
    assert "model 'shared_name' is registered by both plugin 'a' and plugin 'b'" in fresh_host.records["b"].error
    assert "bb_b" not in fresh_host.backbones  # all or nothing


def test_unknown_model_name_lists_known(fresh_host):
    with pytest.raises(surgery.errors.BackboneError, match="known models: none"):
        surgery.build("nope")
