"""The plugin: num_cls_tokens.<modality> sites through the core engine and its conformance kit."""

import pytest
import torch

import surgery
from surgery.errors import CountError
from surgery.site import module_paths
from surgery.testing import ConformanceSuite
from surgery_plugins.imagebind.config import CLS_MODALITIES, ImageBindConfig
from surgery_plugins.imagebind.model import ImageBindModel
from surgery_plugins.imagebind.plugin import example_inputs

TestTinyConformance = ConformanceSuite.for_model(
    "imagebind_tiny_test", counts={"num_cls_tokens.vision": [0, 2, 4], "num_cls_tokens.imu": [0, 3]})


class TestAllHeadConformance(ConformanceSuite):
    """Head mode 'all': the output's shape follows the count, and the count cannot reach 0."""

    counts = {"num_cls_tokens.audio": [1, 4], "num_cls_tokens.depth": [2]}

    def make_model(self, num_cls_tokens=None):  # the kit builds models at other counts through it
        counts = {"audio": 2, "depth": 3, **(num_cls_tokens or {})}
        return ImageBindModel(ImageBindConfig.named("tiny", num_cls_tokens=counts, head_mode="all",
                                                    modalities=("audio", "depth", "text")))

    def make_inputs(self, model):
        return example_inputs(model)


def tiny(**kw):
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.named("tiny", **kw)).eval()


def test_sites_tensors_and_counts():
    model = tiny()
    assert surgery.backbone_of(model) == "imagebind"
    sites = surgery.sites(model)
    assert list(sites) == [f"num_cls_tokens.{m}" for m in ("vision", "text", "audio", "depth", "thermal", "imu")]
    assert {n: s.count for n, s in sites.items()} == {**{f"num_cls_tokens.{m}": 1 for m in CLS_MODALITIES},
                                                      "num_cls_tokens.text": 0}
    paths = module_paths(model)
    keys = [t["key"] for t in sites["num_cls_tokens.vision"].to_dict(paths)["tensors"]]
    assert keys == ["modality_preprocessors.vision.cls_token",
                    "modality_preprocessors.vision.pos_embedding_helper.pos_embed"]
    keys = [t["key"] for t in sites["num_cls_tokens.imu"].to_dict(paths)["tensors"]]
    assert keys == ["modality_preprocessors.imu.cls_token", "modality_preprocessors.imu.pos_embed"]


def test_resize_keeps_patch_rows_and_the_trained_token():
    model = tiny()
    pre = model.modality_preprocessors.vision
    cls, pos = pre.cls_token.detach().clone(), pre.pos_embedding_helper.pos_embed.detach().clone()
    surgery.resize(model, **{"num_cls_tokens.vision": 3}, init="copy")
    assert pre.cls_token.shape == (1, 3, 32) and pre.num_cls_tokens == 3
    assert model.config.modalities["vision"].num_cls_tokens == 3
    assert torch.equal(pre.cls_token[:, 1], cls[:, 0]) and torch.equal(pre.cls_token[:, 2], cls[:, 0])
    table = pre.pos_embedding_helper.pos_embed
    assert torch.equal(table[:, 3:], pos[:, 1:])            # patch rows untouched
    assert torch.equal(table[:, 1], pos[:, 0])              # the CLS row, copied with its token
    rebuilt = tiny(num_cls_tokens={"vision": 3})            # a model built with 3 tokens takes the weights strictly
    rebuilt.load_state_dict(model.state_dict())
    x = example_inputs(model)[0]
    with torch.no_grad():
        assert torch.equal(rebuilt(x)["vision"], model(x)["vision"])


def test_text_refuses_cls_tokens_and_says_why():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CountError, match="causal"):
        surgery.resize(model, **{"num_cls_tokens.text": 1})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_modes_reading_cls_tokens_keep_at_least_one():
    model = tiny()
    model.set_head_mode({"vision": "mean"})
    with pytest.raises(CountError, match="mode 'mean'.*set_head_mode"):
        surgery.resize(model, **{"num_cls_tokens.vision": 0})
    model.set_head_mode({"vision": "first"})
    surgery.resize(model, **{"num_cls_tokens.vision": 0})
    assert model.modality_preprocessors.vision.cls_token is None


def test_tokens_context_and_save_load(tmp_path):
    model = tiny()
    x = example_inputs(model)[0]
    with torch.no_grad():
        base = model(x)
        with surgery.tokens(model, **{"num_cls_tokens.audio": 4}):
            assert model(x, head_mode="all")["audio"].shape == (2, 4, 24)
        assert torch.equal(model(x)["audio"], base["audio"])
        surgery.resize(model, **{"num_cls_tokens.thermal": 2, "num_cls_tokens.imu": 0}, init="normal", seed=2)
        surgery.save(model, tmp_path / "ib.safetensors")
        fresh = tiny()
        result = surgery.load(tmp_path / "ib.safetensors", fresh)
        assert result.replayed
        assert fresh.num_cls_tokens("thermal") == 2 and fresh.num_cls_tokens("imu") == 0
        for m, e in model(x).items():
            assert torch.equal(fresh(x)[m], e), m


def test_registered_models():
    host = surgery.get_host()
    assert {"imagebind_tiny_test", "imagebind_small", "imagebind_huge"} <= set(host.models)
    huge = surgery.build("imagebind_huge")  # shapes only, on the meta device
    assert huge.modality_preprocessors.vision.cls_token.device.type == "meta"
    surgery.resize(huge, **{"num_cls_tokens.vision": 8})
    assert huge.modality_preprocessors.vision.pos_embedding_helper.pos_embed.shape == (1, 264, 1280)
