"""Head modes in recipes: `set_head_mode` is a recipe step (`surgery.set_options`), saved with the model,
replayed in order with the counts on a fresh model, shown by `surgery inspect`; hostile steps change nothing."""

import json

import pytest
import torch

import surgery
from surgery.cli import main
from surgery.errors import CountError, ModelConfigError
from surgery_plugins.imagebind.config import ImageBindConfig
from surgery_plugins.imagebind.model import ImageBindModel
from surgery_plugins.imagebind.plugin import example_inputs

CLS = ("vision", "audio", "depth", "thermal", "imu")
WALKED = {"vision": "all", "audio": "mean", "depth": "first", "thermal": "first", "imu": "first"}


def tiny():
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.named("tiny")).eval()


def modes(model):
    return {m: model.head_mode(m) for m in CLS}


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def walk(model):
    """Counts and modes changed in an order that matters: depth reaches 0 tokens only once it reads `first`."""
    surgery.resize(model, **{"num_cls_tokens.vision": 4}, init="normal", seed=3)
    model.set_head_mode({"vision": "all", "audio": "mean"})
    surgery.resize(model, **{"num_cls_tokens.audio": 3}, init="normal", seed=4)
    model.set_head_mode({"depth": "mean"})
    model.set_head_mode({"depth": "first"})
    surgery.resize(model, **{"num_cls_tokens.depth": 0})
    return model


@pytest.fixture
def walked(tmp_path):
    model = walk(tiny())
    return model, surgery.save(model, tmp_path / "walked.safetensors")


def assert_same_outputs(model, original):
    """`model` (modes from its state) gives what `original` gives when the modes are passed to the call."""
    x = example_inputs(original)[0]
    with torch.no_grad():
        out, expected = model(x), original(x, head_mode={m: WALKED[m] for m in CLS})
    assert out["vision"].shape == (2, 4, 24) and out["audio"].shape == (2, 24)
    assert out.keys() == expected.keys()
    for m in expected:
        assert torch.equal(out[m], expected[m]), m


def test_head_mode_changes_are_steps_of_the_recipe(walked):
    steps = surgery.recipe(walked[0]).steps
    kinds = ["option" if "option" in s else s["site"].rpartition(".")[2] for s in steps]
    assert kinds == ["vision", "option", "audio", "option", "option", "depth"]
    assert steps[1] == {"option": "head_mode", "from": dict.fromkeys(CLS, "first"),
                        "to": {**dict.fromkeys(CLS, "first"), "vision": "all", "audio": "mean"}}


def test_a_saved_recipe_replays_on_a_fresh_model(walked):
    model, path = walked
    _, metadata = surgery.read_checkpoint(path)
    recipe = surgery.Recipe.from_json(metadata["surgery"]["recipe"])
    fresh = tiny()
    recipe.replay(fresh)
    assert modes(fresh) == WALKED and fresh.num_cls_tokens("depth") == 0
    assert surgery.recipe(fresh).steps == surgery.recipe(model).steps
    assert_same_outputs(fresh, model)


def test_load_keeps_the_recipe_and_restores_the_modes(walked, capsys):
    model, path = walked
    fresh = tiny()
    assert surgery.load(path, fresh).replayed
    assert modes(fresh) == WALKED and surgery.recipe(fresh).steps == surgery.recipe(model).steps
    assert_same_outputs(fresh, model)
    assert main(["inspect", str(path), "--model", "imagebind_tiny_test"]) == 0
    text = capsys.readouterr().out
    assert "  2. option head_mode: vision first -> all, audio first -> mean\n" in text
    assert "  6. num_cls_tokens.depth: 1 -> 0  (shrink truncate)\n" in text


def test_a_mode_set_inside_a_tokens_block_is_undone_with_it():
    model = tiny()
    before = state(model)
    with surgery.tokens(model, **{"num_cls_tokens.vision": 2}):
        model.set_head_mode({"vision": "mean"})
        assert model.head_mode("vision") == "mean"
    assert modes(model) == dict.fromkeys(CLS, "first") and surgery.recipe(model).steps == ()
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items())


FIRST = dict.fromkeys(CLS, "first")
GROW_DEPTH = {"site": "num_cls_tokens.depth", "from": 1, "to": 0, "init": "restore", "shrink": "truncate", "seed": 0}


@pytest.mark.parametrize("steps, error, message", [
    ([{"option": "head_mode", "from": FIRST, "to": {**FIRST, "vision": "max"}}], ModelConfigError,
     "recipe step 1: cannot set head_mode=.*unknown head mode 'max'"),
    ([{"option": "head_mode", "from": FIRST, "to": {**FIRST, "text": "all"}}], ModelConfigError,
     "recipe step 1: .*text has no CLS-token head mode"),
    ([{"option": "head_mode", "from": FIRST, "to": "all"}], ModelConfigError, "must map modalities"),
    ([GROW_DEPTH, {"option": "head_mode", "from": FIRST, "to": {**FIRST, "depth": "all"}}], ModelConfigError,
     "recipe step 2: .*depth: head mode 'all' reads the CLS tokens and there are none"),
    ([{"option": "head_mode", "from": FIRST, "to": {**FIRST, "depth": "mean"}}, GROW_DEPTH], CountError,
     "mode 'mean'.*set_head_mode"),  # the steps in the wrong order
    ([{"option": "head_mode", "from": {**FIRST, "imu": "all"}, "to": FIRST}], surgery.errors.RecipeError,
     "recipe starts from options"),
])
def test_hostile_steps_change_nothing(steps, error, message):
    recipe = surgery.Recipe.from_json(json.dumps({"backbone": "imagebind", "steps": steps}))
    model = tiny()
    before = state(model)
    with pytest.raises(error, match=message):
        recipe.replay(model)
    now = model.state_dict()
    assert list(now) == list(before) and all(torch.equal(now[k], v) for k, v in before.items())
    assert modes(model) == FIRST and surgery.recipe(model).steps == ()
