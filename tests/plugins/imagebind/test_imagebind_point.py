"""The point modality (ImageBind-LLM's `imagebind_w3D.pth`): the encoder against an independent
reference (`point_reference.py`), its sampling and grouping, key layout, loading, the
`num_cls_tokens.point` site, bad input."""

from pathlib import Path

import pytest
import torch

import point_reference as ref
import surgery
from surgery.errors import CheckpointError, CountError, SurgeryError
from surgery.testing import ConformanceSuite
from surgery_plugins.imagebind.config import ConfigError, ImageBindConfig, InputError
from surgery_plugins.imagebind.loading import imagebind_huge, load_imagebind
from surgery_plugins.imagebind.model import ImageBindModel
from surgery_plugins.imagebind.plugin import example_inputs
from surgery_plugins.imagebind.points import farthest_point_sample, first_centres, group_points

KEYS = Path(__file__).with_name("imagebind_w3d_keys.txt")
TINY = dict(num_groups=8, group_size=8, heads=2)  # the tiny_w3d point encoder
ATOL = 2e-5


def randomized(model, seed=0):
    """Every floating tensor of the model drawn at random (BatchNorm variances positive), so no
    parameter sits at an init value that could hide it; loaded strictly back into the model."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            scales = value.dim() == 1 and key.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".0.weight"))
            value = torch.randn(value.shape, generator=g) * 0.2 + (1.0 if scales else 0.0)  # norm scales near 1
            if key.endswith("running_var"):
                value = value.abs() + 0.5
        sd[key] = value
    model.load_state_dict(sd, strict=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def point_model(**overrides):
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.named("tiny_w3d", modalities=("point",), **overrides)).eval()


def clouds(batch=2, n=64, seed=1):
    return torch.randn(batch, n, 3, generator=torch.Generator().manual_seed(seed))


# -- sampling and grouping -----------------------------------------------------------------------------


def test_farthest_point_sampling_is_upstreams_loop():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        x = torch.randn(3, 500, 3, generator=g) * scale
        start = torch.randint(0, 500, (3,), generator=g)
        assert torch.equal(farthest_point_sample(x, 64, start), ref.fps(x, 64, start))
    grid = torch.randint(0, 3, (2, 300, 3), generator=g).float()  # many equal distances: the first maximum wins
    assert torch.equal(farthest_point_sample(grid, 27), ref.fps(grid, 27, torch.zeros(2, dtype=torch.long)))


def test_groups_are_the_nearest_points_around_each_centre():
    x = clouds(3, 200)
    groups, centres = group_points(x, 16, 10)
    ref_groups, ref_centres = ref.group(x, 16, 10, torch.zeros(3, dtype=torch.long))
    assert torch.equal(centres, ref_centres)
    torch.testing.assert_close(groups, ref_groups, atol=0, rtol=0)  # nearest first, in both
    assert torch.equal(groups[:, :, 0], torch.zeros(3, 16, 3))       # each centre is its own nearest point


def test_first_centre_is_point_zero_or_a_seeded_draw():
    x = clouds(4, 100)
    assert first_centres(x) is None
    drawn = first_centres(x, seed=5)
    assert torch.equal(drawn, torch.randint(0, 100, (4,), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(farthest_point_sample(x, 8, drawn)[:, 0], drawn)


# -- the encoder against the reference -----------------------------------------------------------------


@pytest.mark.parametrize("k,mode", [(1, "first"), (3, "first"), (3, "mean"), (3, "all")])
def test_point_embedding_matches_the_reference(k, mode):
    model = point_model(num_cls_tokens={"point": k}, head_mode={"point": mode})
    sd = randomized(model)
    x = clouds()
    with torch.no_grad():
        ours = model({"point": x})["point"]
        expected = ref.point_embedding(sd, x, mode=mode, **TINY)
    assert ours.shape == ((2, k, 24) if mode == "all" else (2, 24))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-5)


def test_seeded_start_matches_the_reference_and_repeats():
    model = point_model()
    model.point_trunk.point_encoder.fps_seed = 7
    sd = randomized(model)
    x = clouds(3, 64)
    start = torch.randint(0, 64, (3,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        first = model({"point": x})["point"]
        torch.testing.assert_close(first, ref.point_embedding(sd, x, start=start, **TINY), atol=ATOL, rtol=1e-5)
        assert torch.equal(model({"point": x})["point"], first)  # the same draw on every call
        model.point_trunk.point_encoder.fps_seed = None
        torch.testing.assert_close(model({"point": x})["point"], ref.point_embedding(sd, x, **TINY),
                                   atol=ATOL, rtol=1e-5)


def test_bfloat16_model_groups_in_float32():
    model = point_model()
    sd = randomized(model)
    x = clouds()
    with torch.no_grad():
        expected = ref.point_embedding(sd, x, **TINY)
        ours = model.to(torch.bfloat16)({"point": x})["point"]
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, atol=0.05, rtol=0.05)


def test_point_beside_the_other_modalities():
    torch.manual_seed(0)
    model = surgery.build("imagebind_tiny_w3d_test")
    x = example_inputs(model)[0]
    assert x["point"].shape == (2, 64, 3)
    with torch.no_grad():
        out = model(x)
        alone = model({"point": x["point"]})["point"]
    assert list(out) == ["vision", "text", "audio", "depth", "thermal", "imu", "point"]
    assert torch.equal(out["point"], alone)
    torch.testing.assert_close(out["point"].norm(dim=-1), torch.ones(2))  # the fixed logit scale is 1


# -- keys and checkpoints ----------------------------------------------------------------------------------


def test_huge_w3d_has_the_released_keys_in_order():
    expected = []
    for line in KEYS.read_text().splitlines():  # "key (shape) dtype"
        if not line.startswith("#"):
            key, rest = line.split(" ", 1)
            expected.append((key, *rest.rsplit(" ", 1)))
    model = surgery.build("imagebind_huge_w3d")  # on the meta device
    got = [(k, str(tuple(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == 1_223_558_401
    buffers = dict(model.named_buffers())
    assert "modality_postprocessors.point.1.log_logit_scale" in buffers
    assert "point_trunk.point_encoder.encoder.first_conv.1.running_mean" in buffers


def tiny_w3d_state_dict(seed=0):
    torch.manual_seed(seed)
    return randomized(ImageBindModel(ImageBindConfig.named("tiny_w3d")), seed)


def test_w3d_file_loads_strictly_and_the_plain_model_takes_its_six(tmp_path):
    sd = tiny_w3d_state_dict()
    torch.save(sd, tmp_path / "w3d.pth")
    model = imagebind_huge(tmp_path / "w3d.pth", config="tiny_w3d", num_cls_tokens={"point": 2}, init="copy")
    assert model.num_cls_tokens("point") == 2
    assert torch.equal(model.point_trunk.point_encoder.cls_pos[:, 1], sd["point_trunk.point_encoder.cls_pos"][:, 0])
    assert [s["site"] for s in surgery.recipe(model).steps] == ["num_cls_tokens.point"]
    plain = imagebind_huge(tmp_path / "w3d.pth", config="tiny")  # the point keys are another modality's
    assert "point" not in plain.modalities and not hasattr(plain, "point_trunk")
    x = example_inputs(plain)[0]
    with torch.no_grad():
        ours = imagebind_huge(tmp_path / "w3d.pth", config="tiny_w3d")({"point": clouds()})["point"]
        torch.testing.assert_close(ours, ref.point_embedding(sd, clouds(), **TINY), atol=ATOL, rtol=1e-5)
        assert torch.equal(plain(x)["vision"], imagebind_huge(sd, config="tiny_w3d")(x)["vision"])


def test_a_file_without_point_keys_is_refused_by_the_w3d_model_naming_them():
    six = {k: v for k, v in tiny_w3d_state_dict().items() if "point" not in k}
    model = point_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="none of the model's modalities"):
        load_imagebind(model, six)
    with pytest.raises(CheckpointError, match=r"missing keys .*point_trunk\.pc_projection"):
        imagebind_huge(six, config="tiny_w3d")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_at_another_point_count():
    sd = tiny_w3d_state_dict()
    model = point_model(num_cls_tokens={"point": 3})
    result = load_imagebind(model, sd)  # the model takes the file's count
    assert result.changes == {"num_cls_tokens.point": (3, 1)}
    fitted = point_model(num_cls_tokens={"point": 3})
    load_imagebind(fitted, sd, mismatch="checkpoint", init="copy")
    cls = fitted.point_trunk.point_encoder.cls_token
    assert cls.shape == (1, 3, 32) and torch.equal(cls[:, 2], sd["point_trunk.point_encoder.cls_token"][:, 0])


# -- the site ----------------------------------------------------------------------------------------


class TestPointConformance(ConformanceSuite):
    counts = {"num_cls_tokens.point": [1, 2, 4]}

    def make_model(self, num_cls_tokens=None):  # the kit builds models at other counts through it
        return ImageBindModel(ImageBindConfig.named("tiny_w3d", num_cls_tokens=num_cls_tokens,
                                                    modalities=("point",))).eval()

    def make_inputs(self, model):
        return example_inputs(model)


class TestPointAllHeadConformance(ConformanceSuite):
    """Head mode `all` beside vision: the point output's shape follows the count."""

    counts = {"num_cls_tokens.point": [1, 3], "num_cls_tokens.vision": [0, 2]}

    def make_model(self, num_cls_tokens=None):
        return ImageBindModel(ImageBindConfig.named("tiny_w3d", num_cls_tokens={"point": 2, **(num_cls_tokens or {})},
                                                    head_mode={"point": "all"},
                                                    modalities=("vision", "point"))).eval()

    def make_inputs(self, model):
        return example_inputs(model)


def test_point_site_tensors_counters_and_minimum():
    model = point_model()
    site = surgery.sites(model)["num_cls_tokens.point"]
    keys = [t["key"] for t in site.to_dict(surgery.site.module_paths(model))["tensors"]]
    assert keys == ["point_trunk.point_encoder.cls_token", "point_trunk.point_encoder.cls_pos"]
    enc = model.point_trunk.point_encoder
    cls, pos = enc.cls_token.detach().clone(), enc.cls_pos.detach().clone()
    surgery.resize(model, **{"num_cls_tokens.point": 3}, init="copy")
    assert enc.num_cls_tokens == 3 and model.config.modalities["point"].num_cls_tokens == 3
    assert torch.equal(enc.cls_pos[:, 2], pos[:, 0]) and torch.equal(enc.cls_token[:, 1], cls[:, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CountError, match="max over groups"):
        surgery.resize(model, **{"num_cls_tokens.point": 0})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert model({"point": clouds()}, head_mode="all")["point"].shape == (2, 3, 24)


def test_head_mode_of_point_is_an_option_saved_and_restored(tmp_path):
    model = point_model(num_cls_tokens={"point": 2})
    model.set_head_mode({"point": "mean"})
    surgery.save(model, tmp_path / "p.safetensors")
    fresh = point_model()
    surgery.load(tmp_path / "p.safetensors", fresh)
    assert fresh.head_mode("point") == "mean" and fresh.num_cls_tokens("point") == 2
    with torch.no_grad():
        assert torch.equal(fresh({"point": clouds()})["point"], model({"point": clouds()})["point"])


# -- bad input ---------------------------------------------------------------------------------------


CASES = [
    (lambda: clouds(2, 64)[..., :2], r"\(B, N, 3\)"),
    (lambda: clouds(2, 64)[0], r"\(B, N, 3\)"),
    (lambda: clouds(2, 7), "7 points cannot make 8 groups"),
    (lambda: torch.randint(0, 5, (2, 64, 3)), "floating-point"),
    (lambda: torch.cat([clouds(2, 63), torch.full((2, 1, 3), float("nan"))], dim=1), "finite"),
]


@pytest.mark.parametrize("make,message", CASES)
def test_bad_point_clouds_raise_input_errors(make, message):
    model = point_model()
    x = make()
    kept, weights = x.clone(), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=message) as info:
        model({"point": x})
    assert isinstance(info.value, SurgeryError)
    assert torch.equal(x, kept) or torch.isnan(kept).any()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_bad_point_configs():
    with pytest.raises(ConfigError, match="at least one CLS token"):
        ImageBindConfig.named("tiny_w3d", num_cls_tokens={"point": 0})
    with pytest.raises(ConfigError, match="no modality"):
        ImageBindConfig.named("tiny", modalities=("point",))
    cfg = ImageBindConfig.named("tiny_w3d")
    cfg.modalities["point"].input_size = (4,)
    with pytest.raises(ConfigError, match="at least num_groups"):
        cfg.__post_init__()
