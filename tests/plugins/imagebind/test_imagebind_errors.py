"""Bad input: a clear error from surgery.errors naming what is allowed; model and input unchanged."""

import pytest
import torch

from surgery.errors import SurgeryError
from surgery_plugins.imagebind.config import ConfigError, ImageBindConfig, InputError
from surgery_plugins.imagebind.model import ImageBindModel
from surgery_plugins.imagebind.plugin import example_inputs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.named("tiny")).eval()


def g():
    return torch.Generator().manual_seed(0)


CASES = [
    ("vision", lambda: torch.randn(2, 4, 56, 56, generator=g()), "3 channel"),
    ("vision", lambda: torch.randn(2, 3, 56, generator=g()), "expected"),
    ("vision", lambda: torch.randn(2, 3, 10, 10, generator=g()), "smaller than"),
    ("vision", lambda: torch.randn(2, 1, 3, 4, 56, 56, generator=g()), "time cannot be interpolated"),
    ("depth", lambda: torch.randn(2, 3, 32, 32, generator=g()), "1 channel"),
    ("audio", lambda: torch.randn(2, 2, 36, 46, generator=g()), "1 channel"),
    ("imu", lambda: torch.randn(2, 6, 40, generator=g()), "cannot be interpolated"),
    ("imu", lambda: torch.randn(2, 5, 64, generator=g()), r"\(B, 6, 64\)"),
    ("text", lambda: torch.randint(0, 519, (2, 17), generator=g()), "context holds 16"),
    ("text", lambda: torch.randn(2, 16, generator=g()), "integer token ids"),
    ("text", lambda: torch.full((2, 16), 600), r"\[0, 520\)"),
    ("imu", lambda: torch.randint(0, 5, (2, 6, 64), generator=g()), "floating-point"),
]


@pytest.mark.parametrize("modality,make,message", CASES)
def test_bad_inputs_raise_input_errors(model, modality, make, message):
    x = make()
    kept, weights = x.clone(), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=message) as info:
        model({modality: x})
    assert isinstance(info.value, SurgeryError)
    assert torch.equal(x, kept)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_unknown_modality_is_named_before_anything_runs(model):
    x = example_inputs(model)[0]
    with pytest.raises(InputError, match="'smell'.*vision, text, audio, depth, thermal, imu"):
        model({**x, "smell": torch.zeros(1)})
    with pytest.raises(InputError, match="dict"):
        model(x["vision"])


def test_bad_head_modes(model):
    x = example_inputs(model)[0]
    with pytest.raises(ConfigError, match="'first'.*'mean'.*'all'"):
        model(x, head_mode="max")
    with pytest.raises(ConfigError, match="end-of-text"):
        model.set_head_mode({"text": "all"})
    with pytest.raises(ConfigError, match="end-of-text"):
        model({"text": x["text"]}, head_mode={"text": "mean"})
    with pytest.raises(ConfigError, match="end-of-text"):
        model.encode("text", x["text"], "mean")
    zero = ImageBindModel(ImageBindConfig.named("tiny", num_cls_tokens={"depth": 0}, modalities=("depth",)))
    with pytest.raises(ConfigError, match="none"):
        zero.set_head_mode("mean")
    assert zero.head_mode("depth") == "first"
    with pytest.raises(ConfigError, match="reads the CLS tokens"):
        zero(example_inputs(zero)[0], head_mode="all")


def test_bad_configs():
    with pytest.raises(ConfigError, match="causal"):
        ImageBindConfig.named("tiny", num_cls_tokens={"text": 1})
    with pytest.raises(ConfigError, match="unknown ImageBind config"):
        ImageBindConfig.named("giant")
    with pytest.raises(ConfigError, match="no modality"):
        ImageBindConfig.named("tiny", modalities=("vision", "smell"))
