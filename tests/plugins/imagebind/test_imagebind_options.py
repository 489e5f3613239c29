"""The head modes as the model option `head_mode`: saved, restored by `surgery.load`, shown by inspect."""

import json

import pytest
import torch
from safetensors.torch import save_file

import surgery
from surgery.cli import main
from surgery.errors import CheckpointError, ModelConfigError
from surgery.options import model_options
from surgery_plugins.imagebind.config import ImageBindConfig
from surgery_plugins.imagebind.model import ImageBindModel
from surgery_plugins.imagebind.plugin import example_inputs
from test_options import rewrite_options  # tests/test_options.py

VISION8 = {"num_cls_tokens.vision": 8}


def tiny(**kw):
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.named("tiny", **kw)).eval()


def modes(model):
    return {m: model.head_mode(m) for m in ("vision", "audio", "depth", "thermal", "imu")}


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    now = model.state_dict()
    return list(now) == list(before) and all(torch.equal(now[k], before[k]) for k in now)


@pytest.fixture
def all8(tmp_path):
    """A model with 8 vision CLS tokens read in mode `all`, saved."""
    model = tiny()
    surgery.resize(model, **VISION8, init="normal", seed=1)
    model.set_head_mode({"vision": "all", "audio": "mean"})
    surgery.save(model, tmp_path / "all8.safetensors")
    return model, tmp_path / "all8.safetensors"


def test_the_model_reports_its_head_modes():
    assert model_options(tiny(head_mode={"imu": "mean"})) == {
        "head_mode": {"vision": "first", "audio": "first", "depth": "first", "thermal": "first", "imu": "mean"}}
    assert model_options(tiny(modalities=("text",))) == {"head_mode": {}}


def test_head_mode_all_survives_save_and_load(all8):
    model, path = all8
    x = example_inputs(model)[0]
    fresh = tiny()
    surgery.load(path, fresh)
    assert modes(fresh) == {**modes(tiny()), "vision": "all", "audio": "mean"}
    with torch.no_grad():
        out, expected = fresh(x), model(x)
    assert out["vision"].shape == (2, 8, 24)
    for m in expected:
        assert torch.equal(out[m], expected[m]), m


def test_modes_are_set_before_the_counts_when_they_allow_them(all8, tmp_path):
    # a model in `all` with 4 tokens loads a file in `first` with 0: `first` must come first
    small = tiny()
    surgery.resize(small, **{"num_cls_tokens.vision": 0})
    surgery.save(small, tmp_path / "zero.safetensors")
    model = tiny()
    surgery.resize(model, **{"num_cls_tokens.vision": 4})
    model.set_head_mode({"vision": "all"})
    surgery.load(tmp_path / "zero.safetensors", model)
    assert model.num_cls_tokens("vision") == 0 and model.head_mode("vision") == "first"
    # and a model at 0 tokens takes `all` once the file's 8 tokens are there
    surgery.load(all8[1], model)
    assert model.num_cls_tokens("vision") == 8 and model.head_mode("vision") == "all"


def test_inspect_shows_the_modes(all8, capsys):
    assert main(["inspect", str(all8[1]), "--model", "imagebind_tiny_test"]) == 0
    text = capsys.readouterr().out
    assert "options:\n  head_mode: vision=all, audio=mean, depth=first, thermal=first, imu=first\n" in text
    assert main(["inspect", str(all8[1]), "--model", "imagebind_tiny_test", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["options"]["head_mode"]["vision"] == "all"
    assert info["metadata"]["surgery"]["options"] == info["options"]


@pytest.mark.parametrize("saved, message", [
    ({"head_mode": {"vision": "bogus"}}, r"head_mode=.*unknown head mode 'bogus'; allowed: 'first'"),
    ({"head_mode": {"text": "all"}}, "text has no CLS-token head mode"),
    ({"head_mode": {"sound": "all"}}, "unknown modality 'sound'"),
    ({"head_mode": "all"}, "must map modalities to one of first, mean, all"),
    ({"head_mode": {"vision": ["all"]}}, "must map modalities"),
    ({"head_mode": {"vision": "all"}, "import": "os"}, "'import' is not an option of this 'imagebind' model; "
                                                        "its options: head_mode"),
])
def test_a_bad_saved_mode_is_refused_and_changes_nothing(all8, tmp_path, saved, message):
    path = rewrite_options(all8[1], tmp_path / "bad.safetensors", saved)
    model = tiny()
    model.set_head_mode({"depth": "mean"})
    before, before_modes = state(model), modes(model)
    with pytest.raises(ModelConfigError, match=message):
        surgery.load(path, model)
    assert same_state(model, before) and modes(model) == before_modes
    assert main(["inspect", str(path), "--model", "imagebind_tiny_test"]) == 1  # one error line, no traceback


def test_a_load_failing_after_the_modes_puts_them_back(all8, tmp_path):
    path = rewrite_options(all8[1], tmp_path / "ok.safetensors", {"head_mode": {"vision": "mean", "imu": "all"}})
    model = tiny(modalities=("vision", "audio", "depth", "thermal", "imu"))  # no text: unexpected keys
    before, before_modes = state(model), modes(model)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        surgery.load(path, model)
    assert same_state(model, before) and modes(model) == before_modes and surgery.recipe(model).steps == ()


def test_a_checkpoint_without_options_keeps_the_models_modes(tmp_path):
    model = tiny()
    model.set_head_mode({"audio": "mean"})
    sd = {k: v.contiguous() for k, v in tiny().state_dict().items()}
    save_file(sd, str(tmp_path / "plain.safetensors"))  # no "surgery" metadata at all
    surgery.load(tmp_path / "plain.safetensors", model)
    assert model.head_mode("audio") == "mean"
