"""Model options (surgery/options.py): plugin-owned state outside the weights, through save, load and inspect.

`OptionsPlugin` brings a small backbone, `prompted` (learned prompt tokens as its one site), with
two options: `pooling` ("sum" or "mean", a plain attribute) and `window` ({"size": int, "stride":
int}, settable key by key).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery.cli import main
from surgery.edit import Edit
from surgery.errors import CheckpointError, ModelConfigError, PluginConflictError, PluginError
from surgery.options import MAX_DEPTH, apply_options, model_options
from surgery.site import Counter, TokenSite, TokenTensor
from toy_backbone import assert_same, snapshot

BACKBONE = "prompted"
POOLINGS = ("sum", "mean")
WINDOW = {"size": 3, "stride": 1}


class PromptedModel(nn.Module):
    def __init__(self, prompts: int = 2, dim: int = 4):
        super().__init__()
        self.num_prompts = prompts
        self.prompts = nn.Parameter(torch.randn(prompts, dim))
        self.proj = nn.Linear(dim, dim)


class OptionsPlugin:
    """The `prompted` backbone and its options; `apply="ignore"` makes the setter do nothing."""

    def __init__(self, apply: str = "journaled"):
        self.apply = apply

    @surgery.hookimpl
    def surgery_register_backbones(self, register):
        register(BACKBONE, lambda m: isinstance(m, PromptedModel))

    @surgery.hookimpl
    def surgery_register_models(self, register):
        register("prompted_tiny", lambda **kw: PromptedModel(**kw), BACKBONE)

    @surgery.hookimpl
    def surgery_token_sites(self, model, backbone):
        if backbone != BACKBONE:
            return None
        return [TokenSite("prompts", model.num_prompts, tensors=[TokenTensor(model, "prompts", axis=0)],
                          counters=[Counter(model, "num_prompts")], min=0, default_init="zeros")]

    @surgery.hookimpl
    def surgery_model_options(self, model, backbone):
        if backbone != BACKBONE:
            return None
        return {"pooling": getattr(model, "pooling", "sum"), "window": dict(getattr(model, "window", WINDOW))}

    @surgery.hookimpl
    def surgery_apply_options(self, model, backbone, options, edit):
        if backbone != BACKBONE or self.apply == "ignore":
            return
        pooling = options.get("pooling", getattr(model, "pooling", "sum"))
        if pooling not in POOLINGS:
            raise ModelConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r:.40}")
        window = dict(getattr(model, "window", WINDOW))
        asked = options.get("window", {})
        if not isinstance(asked, dict) or any(k not in window or not isinstance(v, int) or isinstance(v, bool)
                                              or v < 1 for k, v in asked.items()):
            raise ModelConfigError(f"window must map size/stride to integers >= 1, got {asked!r:.40}")
        window.update(asked)
        edit.set_attr(model, "pooling", pooling)
        edit.set_attr(model, "window", window)


@pytest.fixture
def host(fresh_host):
    assert fresh_host.add_plugin(OptionsPlugin(), "options")
    return fresh_host


def saved(tmp_path, pooling="mean", **window):
    model = surgery.build("prompted_tiny")
    model.pooling, model.window = pooling, {**WINDOW, **window}
    surgery.resize(model, prompts=4)
    return surgery.save(model, tmp_path / "prompted.safetensors")


def rewrite_options(src, dst, options):
    """A copy of a saved checkpoint whose "surgery" entry records `options` instead."""
    with safe_open(str(src), framework="pt") as f:
        meta, sd = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    entry = json.loads(meta["surgery"])
    entry["options"] = options
    meta["surgery"] = json.dumps(entry)
    save_file(sd, str(dst), metadata=meta)
    return dst


def test_options_are_saved_loaded_and_shown(host, tmp_path, capsys):
    path = saved(tmp_path, "mean", size=5)
    _, meta = surgery.read_checkpoint(path)
    assert meta["surgery"]["options"] == {"pooling": "mean", "window": {"size": 5, "stride": 1}}
    fresh = surgery.build("prompted_tiny")
    assert model_options(fresh) == {"pooling": "sum", "window": WINDOW}
    surgery.load(path, fresh)
    assert (fresh.pooling, fresh.window) == ("mean", {"size": 5, "stride": 1})
    assert main(["inspect", str(path)]) == 0
    assert "options:\n  pooling: mean\n  window: size=5, stride=1\n" in capsys.readouterr().out
    assert main(["inspect", "prompted_tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"] == {"pooling": "sum", "window": WINDOW}


def test_a_dict_option_may_be_set_key_by_key(host, tmp_path):
    path = rewrite_options(saved(tmp_path), tmp_path / "partial.safetensors", {"window": {"stride": 2}})
    model = surgery.build("prompted_tiny")
    model.pooling = "mean"
    surgery.load(path, model)
    assert (model.pooling, model.window) == ("mean", {"size": 3, "stride": 2})  # pooling not named: kept


@pytest.mark.parametrize("options, error, message", [
    ({"pooling": "max"}, ModelConfigError, r"cannot set pooling=\"max\": pooling must be one of sum, mean"),
    ({"window": {"size": 0}}, ModelConfigError, "window must map size/stride to integers >= 1"),
    ({"window": {"size": True}}, ModelConfigError, "window must map"),
    ({"pooling": "mean", "__import__": "os"}, ModelConfigError,
     "'__import__' is not an option of this 'prompted' model; its options: pooling, window"),
    (["pooling", "mean"], CheckpointError, "'options' metadata is a list, not a JSON object"),
    ({"pooling": {"a": [1, {"b": 2}]}}, ModelConfigError, "pooling must be one of"),
    ({"window": json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))}, CheckpointError,
     f"not plain JSON \\(nested deeper than {MAX_DEPTH} levels\\)"),
    ({"pooling": "x" * 70000}, CheckpointError, "longer than 65536 characters"),
])
def test_a_bad_option_in_a_file_is_refused_and_changes_nothing(host, tmp_path, options, error, message):
    path = rewrite_options(saved(tmp_path), tmp_path / "bad.safetensors", options)
    model = surgery.build("prompted_tiny")
    model.pooling = "mean"
    before = snapshot(model)
    with pytest.raises(error, match=message):
        surgery.load(path, model)
    assert_same(snapshot(model), before)
    assert main(["inspect", str(path)]) == 1  # one error line, no traceback


def test_a_load_failing_after_the_options_puts_them_back(host, tmp_path):
    path = saved(tmp_path, "mean", stride=4)
    with safe_open(str(path), framework="pt") as f:
        meta, sd = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys() if k != "proj.bias"}
    save_file(sd, str(tmp_path / "missing.safetensors"), metadata=meta)
    model = surgery.build("prompted_tiny")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="missing keys .*proj.bias"):
        surgery.load(tmp_path / "missing.safetensors", model)
    assert_same(snapshot(model), before)
    assert "pooling" not in vars(model) and "window" not in vars(model)


def test_files_without_options_and_plain_state_dicts_keep_the_models(host, tmp_path):
    model = surgery.build("prompted_tiny")
    model.pooling = "mean"
    save_file(PromptedModel(prompts=3).state_dict(), str(tmp_path / "plain.safetensors"))
    surgery.load(tmp_path / "plain.safetensors", model)
    surgery.load_state_dict(model, PromptedModel().state_dict())
    assert model.pooling == "mean"


# -- what plugins must do ------------------------------------------------------------------------------


class Reports:
    """A plugin that reports `options` as they are given (garbage included) and sets nothing."""

    def __init__(self, options):
        self.options = options

    @surgery.hookimpl
    def surgery_model_options(self, model, backbone):
        return self.options


@pytest.mark.parametrize("reported, error, message", [
    (["pooling"], PluginError, "surgery_model_options returned a list; it must return a dict"),
    ({1: "x"}, PluginError, "returned an option named 1; option names are strings"),
    ({"scale": float("nan")}, PluginError, "option 'scale' is not plain JSON \\(nan is not a finite number\\)"),
    ({"scale": (1, 2)}, PluginError, "not plain JSON \\(a tuple is not a JSON value\\)"),
    ({"scale": torch.ones(2)}, PluginError, "a Tensor is not a JSON value"),
    ({"pooling": "sum"}, PluginConflictError, "option 'pooling' of backbone 'prompted' is reported by both "
                                              "plugin 'options' and plugin 'garbage'"),
])
def test_what_a_plugin_reports_is_checked(host, reported, error, message):
    assert host.add_plugin(Reports(reported), "garbage")
    with pytest.raises(error, match=message):
        model_options(surgery.build("prompted_tiny"))


def test_an_option_without_a_setter_or_a_setter_that_ignores_it_is_the_plugins_fault(host):
    model = surgery.build("prompted_tiny")
    assert host.add_plugin(Reports({"scale": 1.0}), "reports_only")
    with pytest.raises(PluginError, match="plugin 'reports_only' reports options \\['scale'\\] but has no "
                                          "surgery_apply_options"):
        apply_options(model, {"scale": 2.0}, Edit())
    ignoring = OptionsPlugin(apply="ignore")
    host.pm.unregister(name="options")
    host.pm.register(ignoring, name="ignoring")  # keeps the backbone registered by "options"
    with pytest.raises(PluginError, match="plugin 'ignoring': surgery_apply_options did not set pooling "
                                          "\\(asked \"mean\", now \"sum\"\\)"):
        apply_options(model, {"pooling": "mean"}, Edit())


def test_apply_options_journals_and_defers_what_the_plugin_refuses(host):
    model = surgery.build("prompted_tiny")
    edit = Edit()
    assert apply_options(model, {"pooling": "mean", "window": {"size": 2}}, edit) == {}
    assert (model.pooling, model.window) == ("mean", {"size": 2, "stride": 1})
    left = apply_options(model, {"pooling": "max"}, edit, only_valid=True)  # refused: left for later
    assert left == {"pooling": "max"} and model.pooling == "mean"
    edit.rollback()
    assert "pooling" not in vars(model) and model_options(model) == {"pooling": "sum", "window": WINDOW}


# -- surgery.set_options: a change of the model's state like a resize ------------------------------------


class Events:
    """Records the resize events, as a plugin that caches something would see them."""

    def __init__(self):
        self.seen = []

    @surgery.hookimpl
    def surgery_before_resize(self, model, backbone, changes):
        self.seen.append(("before", dict(changes)))

    @surgery.hookimpl
    def surgery_after_resize(self, model, backbone, changes):
        self.seen.append(("after", dict(changes)))


def option_step(name, old, new):
    return {"option": name, "from": old, "to": new}


def test_set_options_is_recorded_announced_and_replayed_in_order(host):
    events = Events()
    assert host.add_plugin(events, "events")
    model = surgery.build("prompted_tiny")
    built = {k: v.clone() for k, v in model.state_dict().items()}
    assert surgery.set_options(model, pooling="mean") == {"pooling": ("sum", "mean")}
    assert events.seen == [("before", {}), ("after", {})]
    surgery.resize(model, prompts=4)
    assert surgery.set_options(model, window={"stride": 2}) == {"window": (WINDOW, {"size": 3, "stride": 2})}
    assert surgery.set_options(model, pooling="mean") == {}  # already so: no step, no event
    assert len(events.seen) == 6
    steps = surgery.recipe(model).steps
    assert steps[0] == option_step("pooling", "sum", "mean") and steps[1]["site"] == "prompts"
    assert steps[2] == option_step("window", WINDOW, {"size": 3, "stride": 2})  # whole values

    fresh = surgery.build("prompted_tiny")
    fresh.load_state_dict(built)  # the same weights as built
    surgery.Recipe.from_json(surgery.recipe(model).to_json()).replay(fresh)
    assert model_options(fresh) == {"pooling": "mean", "window": {"size": 3, "stride": 2}}
    assert torch.equal(fresh.prompts, model.prompts) and fresh.num_prompts == 4
    assert surgery.recipe(fresh).steps == steps


def test_set_options_is_atomic_and_undone_with_a_tokens_block(host):
    model = surgery.build("prompted_tiny")
    before = snapshot(model)
    with pytest.raises(ModelConfigError, match="set_options: cannot set pooling=\"max\": pooling must be one of"):
        surgery.set_options(model, pooling="max")
    with pytest.raises(ModelConfigError, match="'stride' is not an option of this 'prompted' model"):
        surgery.set_options(model, stride=2)
    assert_same(snapshot(model), before)
    assert surgery.recipe(model).steps == ()
    with surgery.tokens(model, prompts=3):
        surgery.set_options(model, pooling="mean", window={"size": 5})
        assert model_options(model) == {"pooling": "mean", "window": {"size": 5, "stride": 1}}
    assert_same(snapshot(model), before)
    assert model_options(model) == {"pooling": "sum", "window": WINDOW} and surgery.recipe(model).steps == ()


def test_a_plugin_failing_after_an_option_change_rolls_it_back(host):
    class Broken:
        @surgery.hookimpl
        def surgery_after_resize(self, model, backbone, changes):
            raise ValueError("cache rebuild failed")

    assert host.add_plugin(Broken(), "broken")
    model = surgery.build("prompted_tiny")
    with pytest.raises(surgery.errors.ResizeError, match="plugin 'broken' failed in surgery_after_resize"):
        surgery.set_options(model, pooling="mean")
    assert model_options(model)["pooling"] == "sum" and surgery.recipe(model).steps == ()


def test_a_saved_recipe_with_option_steps_is_kept_by_load(host, tmp_path):
    model = surgery.build("prompted_tiny")
    surgery.resize(model, prompts=4)
    surgery.set_options(model, pooling="mean")
    surgery.resize(model, prompts=1)
    path = surgery.save(model, tmp_path / "steps.safetensors")
    fresh = surgery.build("prompted_tiny")
    result = surgery.load(path, fresh)
    assert result.replayed and surgery.recipe(fresh).steps == surgery.recipe(model).steps
    assert model_options(fresh) == model_options(model) and torch.equal(fresh.prompts, model.prompts)
    # a history whose options end elsewhere than the file's is not the model's: the load records its own
    lie = {"backbone": BACKBONE, "steps": [*surgery.recipe(model).steps[:1], option_step("pooling", "sum", "sum")]}
    entry = {**surgery.checkpoint.surgery_metadata(model), "recipe": lie}
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file(sd, str(tmp_path / "lie.safetensors"), metadata={"surgery": json.dumps(entry)})
    other = surgery.build("prompted_tiny")
    assert not surgery.load(tmp_path / "lie.safetensors", other).replayed
    kinds = [("option" if "option" in s else "site") for s in surgery.recipe(other).steps]
    assert kinds == ["option", "site"] and model_options(other)["pooling"] == "mean"


@pytest.mark.parametrize("step, message", [
    ({"option": 3, "from": "sum", "to": "mean"}, "recipe step 1: option must be an option's name"),
    ({"option": "", "from": "sum", "to": "mean"}, "option must be an option's name"),
    ({"option": "pooling", "from": "sum", "to": float("nan")}, "to of option 'pooling' must be plain JSON .*nan"),
    ({"option": "pooling", "from": "sum", "to": json.loads("[" * 20 + "]" * 20)}, "nested deeper than 8"),
    ({"option": "pooling", "from": "x" * 70000, "to": "sum"}, "from of option 'pooling' is longer than 65536"),
    ({"option": "pooling", "from": "sum"}, "expected the fields site, from, to, init, shrink, seed .* or option"),
    ({"option": "pooling", "site": "prompts", "from": 1, "to": 2}, "expected the fields"),
])
def test_hostile_option_steps_are_refused_by_from_json(step, message):
    text = json.dumps({"backbone": BACKBONE, "steps": [step]})  # as a file would carry it (NaN included)
    with pytest.raises(surgery.errors.RecipeError, match=message):
        surgery.Recipe.from_json(text)


@pytest.mark.parametrize("steps, error, message", [
    ([option_step("pooling", "sum", "max")], ModelConfigError, "recipe step 1: cannot set pooling=\"max\""),
    ([option_step("pooling", "sum", "mean"), option_step("window", WINDOW, {"size": -1, "stride": 1})],
     ModelConfigError, "recipe step 2: cannot set window="),
    ([option_step("__class__", "sum", "mean")], ModelConfigError, "option '__class__' is not an option of this"),
    ([option_step("pooling", "mean", "sum")], surgery.errors.RecipeError, "starts from options"),
])
def test_option_steps_a_model_cannot_take_change_nothing_on_replay(host, steps, error, message):
    model = surgery.build("prompted_tiny")
    before = snapshot(model)
    recipe = surgery.Recipe.from_json({"backbone": BACKBONE, "steps": [*steps, {
        "site": "prompts", "from": 2, "to": 5, "init": "zeros", "shrink": "truncate", "seed": 0}]})
    with pytest.raises(error, match=message):
        recipe.replay(model)
    assert_same(snapshot(model), before)
    assert surgery.recipe(model).steps == ()
