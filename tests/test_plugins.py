"""The plugin host: entry points, guarded loading, SURGERY_PLUGINS / SURGERY_STRICT_PLUGINS."""

import importlib.metadata
import json
import pathlib
import sys
import textwrap

import pytest
import torch

import surgery
from surgery.errors import PluginError
from surgery.plugins import ENTRY_POINT_GROUP, PluginHost, reset_host

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


def _installed(*names):
    """The installed (built-in) entry points of these names."""
    eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name in names]
    assert sorted(ep.name for ep in eps) == sorted(names)
    return eps


def _exits_on_import(code):
    return f"import sys\nsys.exit({code})\n"


EXITS_WHILE_REGISTERING = """
    import sys
    import surgery

    @surgery.hookimpl
    def surgery_register_backbones(register):
        sys.exit()
"""


@pytest.mark.parametrize("module, source, says", [
    ("exits_bare", _exits_on_import(""), "sys.exit(None) was called"),
    ("exits_code", _exits_on_import(3), "sys.exit(3) was called"),
    ("exits_registering", EXITS_WHILE_REGISTERING, "sys.exit(None) was called"),
])
def test_plugin_calling_sys_exit_fails_alone(plugin_dir, monkeypatch, module, source, says):
    monkeypatch.delenv("SURGERY_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)
    host = PluginHost()
    host.load_entry_points([plugin_dir(module, source), plugin_dir(f"{module}_ok", GOOD.format(name=module))])
    assert host.records[module].status == "failed" and says in host.records[module].error
    assert host.records[f"{module}_ok"].status == "loaded" and f"{module}_backbone" in host.backbones


def test_surgery_resize_with_an_exiting_plugin_installed_writes_its_output(plugin_dir, monkeypatch, tmp_path, capsys):
    """The audit's case: a plugin calling sys.exit() at import stopped the host, and `surgery resize`
    exited 0 having written nothing."""
    from surgery.cli import main

    monkeypatch.delenv("SURGERY_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)
    host = PluginHost()
    host.load_entry_points(_installed("timm_vit") + [plugin_dir("exits_at_import", _exits_on_import(""))])
    old = reset_host(host)
    try:
        src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
        surgery.save(surgery.build("vit_tiny_test"), src)
        assert main(["resize", str(src), "--set", "reg_tokens=2", "-o", str(out)]) == 0
    finally:
        reset_host(old)
    assert surgery.checkpoint.read_checkpoint(out)[0]["reg_token"].shape[1] == 2


def test_sys_exit_in_plugin_code_during_a_command_is_never_a_success(surgery_host, tmp_path, capsys):
    from surgery.cli import main

    class ExitsAfterResize:
        @surgery.hookimpl
        def surgery_after_resize(self, model, backbone, changes):
            sys.exit()

    surgery_host.add_plugin(ExitsAfterResize(), "exits_after_resize")
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    surgery.save(surgery.build("vit_tiny_test"), src)
    code = main(["resize", str(src), "--set", "reg_tokens=2", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists() and "sys.exit(None) was called" in err
    assert main(["--version"]) == 0  # argparse's own exits keep their meaning


LAZY_DETECT = """
    import surgery

    class Marker:
        pass

    def detect(model):
        import surgery_optional_dependency_not_installed  # a lazy optional import
        return isinstance(model, Marker)

    @surgery.hookimpl
    def surgery_register_backbones(register):
        register("lazy_backbone", detect)
"""


def test_a_raising_detect_is_isolated_to_its_plugin_and_shown(plugin_dir, monkeypatch, capsys):
    from toy_backbone import ToyModel, ToyPlugin

    from surgery.cli import main

    monkeypatch.delenv("SURGERY_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)
    host = PluginHost()
    host.load_entry_points([plugin_dir("lazy", LAZY_DETECT)])
    assert host.add_plugin(ToyPlugin(), "toy") and host.records["lazy"].status == "loaded"
    old = reset_host(host)
    try:
        assert surgery.counts(ToyModel(prompts=3))["prompts"] == 3  # the toy model still works
        record = host.records["lazy"]
        assert record.status == "degraded" and host.records["toy"].status == "loaded"
        assert "detect of backbone 'lazy_backbone' raised ModuleNotFoundError" in record.error
        with pytest.raises(surgery.errors.BackboneError, match="detectors that failed: .*'lazy_backbone'"):
            surgery.sites(torch.nn.Linear(2, 2))
        assert main(["plugins", "--json"]) == 0
        shown = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert shown["lazy"]["status"] == "degraded" and "ModuleNotFoundError" in shown["lazy"]["error"]
    finally:
        reset_host(old)


def test_surgery_plugins_shows_a_detect_that_fails_before_any_model_is_seen(plugin_dir, monkeypatch, capsys):
    from surgery.cli import main

    monkeypatch.delenv("SURGERY_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)
    host = PluginHost()
    host.load_entry_points([plugin_dir("lazy_fresh", LAZY_DETECT)])
    old = reset_host(host)
    try:
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert "degraded" in out and "lazy_fresh: detect of backbone 'lazy_backbone' raised" in out
    finally:
        reset_host(old)


def test_a_raising_detect_is_fatal_in_strict_mode(plugin_dir, monkeypatch):
    monkeypatch.delenv("SURGERY_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)
    host = PluginHost()
    host.load_entry_points([plugin_dir("lazy_strict", LAZY_DETECT)])
    host.strict = True
    with pytest.raises(PluginError, match="plugin 'lazy_strict': detect of backbone 'lazy_backbone'"):
        host.identify(torch.nn.Linear(2, 2))


STEALS_TIMM_VIT = """
    import surgery

    @surgery.hookimpl
    def surgery_register_backbones(register):
        register("timm_vit", lambda m: False)
"""
MODELS_FOR_TIMM_VIT = """
    import surgery

    def tiny_vit():
        import timm

        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                                 num_heads=2)

    @surgery.hookimpl
    def surgery_register_models(register):
        register("vit_from_aab", tiny_vit, "timm_vit")
"""


def test_a_plugin_cannot_take_a_builtin_backbone_name(plugin_dir, monkeypatch):
    """'aaa' sorts before 'timm_vit' and claims its backbone name; 'aab' registers a model for the
    real timm_vit backbone. The built-in keeps its backbone, the conflict is aaa's, aab loads."""
    monkeypatch.delenv("SURGERY_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)
    host = PluginHost()
    host.load_entry_points([plugin_dir("aaa_thief", STEALS_TIMM_VIT), plugin_dir("aab_models", MODELS_FOR_TIMM_VIT)]
                           + _installed("timm_vit"))
    records = host.records
    assert records["timm_vit"].status == "loaded" and records["timm_vit"].builtin and records["timm_vit"].error is None
    assert host.backbones["timm_vit"].plugin == "timm_vit"
    assert records["aaa_thief"].status == "failed"
    conflict = "backbone 'timm_vit' is registered by both plugin 'timm_vit' and plugin 'aaa_thief'"
    assert conflict in records["aaa_thief"].error
    assert records["aab_models"].status == "loaded" and not records["aab_models"].builtin
    assert host.models["vit_from_aab"].backbone == "timm_vit"
    old = reset_host(host)
    try:
        assert surgery.backbone_of(surgery.build("vit_from_aab")) == "timm_vit"
    finally:
        reset_host(old)


@pytest.mark.parametrize("value, strict", [("", False), ("0", False), ("false", False), ("FALSE", False),
                                           ("no", False), ("Off", False), (" off ", False), ("1", True),
                                           ("true", True), ("TRUE", True), ("yes", True), ("On", True)])
def test_strict_plugins_values(monkeypatch, value, strict):
    monkeypatch.setenv("SURGERY_STRICT_PLUGINS", value)
    assert PluginHost().strict is strict


@pytest.mark.parametrize("value", ["maybe", "2", "fasle", "-1"])
def test_strict_plugins_refuses_other_values(monkeypatch, capsys, value):
    from surgery.cli import main

    monkeypatch.setenv("SURGERY_STRICT_PLUGINS", value)
    with pytest.raises(PluginError, match=f"SURGERY_STRICT_PLUGINS='{value}' is not a yes/no value; use 1, true"):
        PluginHost()
    old = reset_host(None)  # the CLI creates the host: one line, exit 1
    try:
        assert main(["plugins"]) == 1
    finally:
        reset_host(old)
    err = capsys.readouterr().err
    assert err.startswith("surgery: error: SURGERY_STRICT_PLUGINS=") and err.count("\n") == 1


def test_surgery_plugins_reports_a_name_no_entry_point_has(plugin_dir, monkeypatch):
    monkeypatch.delenv("SURGERY_STRICT_PLUGINS", raising=False)
    monkeypatch.setenv("SURGERY_PLUGINS", "epsilon,epsilno")
    eps = [plugin_dir("epsilon", GOOD.format(name="epsilon"))]
    host = PluginHost()
    host.load_entry_points(eps)
    assert host.records["epsilon"].status == "loaded"
    assert host.records["epsilno"].status == "missing"
    assert "SURGERY_PLUGINS names 'epsilno', but no installed plugin has that entry point; installed: epsilon" \
        in host.records["epsilno"].error
    monkeypatch.setenv("SURGERY_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'epsilno'"):
        PluginHost().load_entry_points(eps)
