"""Official-layout checkpoints: key names, strict loading, resize on load, refusals."""

import pickle

import pytest
import torch

import ib_reference as ref
import surgery
from surgery.errors import CheckpointError, UnsafeCheckpointError
from surgery_plugins.imagebind.config import ImageBindConfig
from surgery_plugins.imagebind.loading import imagebind_huge, load_imagebind
from surgery_plugins.imagebind.model import ImageBindModel
from surgery_plugins.imagebind.plugin import example_inputs


def official_tiny_state_dict(seed=0):
    """A state dict with upstream's key names, written out here from upstream's module tree at the
    tiny config's sizes (width 32, depth 16, 2 blocks, joint width 24), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd, out = {}, 24
    P = "modality_preprocessors"
    sd[f"{P}.vision.cls_token"] = r(1, 1, 32)
    sd[f"{P}.vision.rgbt_stem.proj.1.weight"] = r(32, 3, 2, 14, 14)
    sd[f"{P}.vision.pos_embedding_helper.pos_embed"] = r(1, 17, 32)
    sd[f"{P}.text.pos_embed"] = r(1, 16, 32)
    sd[f"{P}.text.mask"] = torch.full((16, 16), float("-inf")).triu(1)
    sd[f"{P}.text.token_embedding.weight"] = r(520, 32)
    for m, dim, kernel, rows in (("audio", 32, 16, 13), ("depth", 16, 8, 17), ("thermal", 32, 8, 17)):
        stem = "depth_stem" if m == "depth" else "rgbt_stem"
        sd[f"{P}.{m}.cls_token"] = r(1, 1, dim)
        sd[f"{P}.{m}.{stem}.proj.weight"] = r(dim, 1, kernel, kernel)
        sd[f"{P}.{m}.{stem}.norm_layer.weight"] = 1 + r(dim)
        sd[f"{P}.{m}.{stem}.norm_layer.bias"] = r(dim)
        sd[f"{P}.{m}.pos_embedding_helper.pos_embed"] = r(1, rows, dim)
    sd[f"{P}.imu.pos_embed"] = r(1, 9, 32)
    sd[f"{P}.imu.cls_token"] = r(1, 1, 32)
    sd[f"{P}.imu.imu_stem.proj.weight"] = r(32, 48)
    sd[f"{P}.imu.imu_stem.norm_layer.weight"] = 1 + r(32)
    sd[f"{P}.imu.imu_stem.norm_layer.bias"] = r(32)
    widths = {"vision": 32, "text": 32, "audio": 32, "depth": 16, "thermal": 32, "imu": 32}
    sd["modality_trunks.vision.pre_transformer_layer.0.weight"] = 1 + r(32)
    sd["modality_trunks.vision.pre_transformer_layer.0.bias"] = r(32)
    for m, d in widths.items():
        for i in range(2):
            b = f"modality_trunks.{m}.blocks.{i}"
            sd[f"{b}.attn.in_proj_weight"], sd[f"{b}.attn.in_proj_bias"] = r(3 * d, d), r(3 * d)
            if m not in ("vision", "text"):
                sd[f"{b}.attn.bias_k"], sd[f"{b}.attn.bias_v"] = r(1, 1, d), r(1, 1, d)
            sd[f"{b}.attn.out_proj.weight"], sd[f"{b}.attn.out_proj.bias"] = r(d, d), r(d)
            for n in ("norm_1", "norm_2"):
                sd[f"{b}.{n}.weight"], sd[f"{b}.{n}.bias"] = 1 + r(d), r(d)
            sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"] = r(4 * d, d), r(4 * d)
            sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"] = r(d, 4 * d), r(d)
    for m, d in widths.items():
        if m == "text":
            sd["modality_heads.text.proj.0.weight"], sd["modality_heads.text.proj.0.bias"] = 1 + r(d), r(d)
            sd["modality_heads.text.proj.1.weight"] = r(out, d)
            continue
        sd[f"modality_heads.{m}.0.weight"], sd[f"modality_heads.{m}.0.bias"] = 1 + r(d), r(d)
        sd[f"modality_heads.{m}.{3 if m == 'imu' else 2}.weight"] = r(out, d)
    for m, scale in (("text", 1 / 0.07), ("audio", 20.0), ("depth", 5.0), ("thermal", 10.0), ("imu", 5.0)):
        sd[f"modality_postprocessors.{m}.1.log_logit_scale"] = torch.tensor(scale).log()
    return sd


@pytest.fixture
def official_file(tmp_path):
    path = tmp_path / "imagebind_tiny.pth"
    torch.save(official_tiny_state_dict(), path)
    return path


def test_huge_architecture_has_the_released_keys_and_size():
    model = imagebind_huge(device="meta")
    sd = model.state_dict()
    assert len(sd) == 1311  # upstream's imagebind_huge(): 1311 keys, 1,200,781,057 parameters
    assert sum(p.numel() for p in model.parameters()) == 1_200_781_057
    shapes = {
        "modality_preprocessors.vision.cls_token": (1, 1, 1280),
        "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
        "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
        "modality_preprocessors.text.mask": (77, 77),
        "modality_preprocessors.text.token_embedding.weight": (49408, 1024),
        "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
        "modality_preprocessors.depth.depth_stem.proj.weight": (384, 1, 16, 16),
        "modality_preprocessors.thermal.pos_embedding_helper.pos_embed": (1, 197, 768),
        "modality_preprocessors.imu.pos_embed": (1, 251, 512),
        "modality_preprocessors.imu.imu_stem.proj.weight": (512, 48),
        "modality_trunks.vision.blocks.31.attn.in_proj_weight": (3840, 1280),
        "modality_trunks.audio.blocks.11.attn.bias_k": (1, 1, 768),
        "modality_trunks.imu.blocks.5.mlp.fc1.weight": (2048, 512),
        "modality_heads.imu.3.weight": (1024, 512),
        "modality_heads.text.proj.1.weight": (1024, 1024),
        "modality_postprocessors.text.1.log_logit_scale": (),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert "modality_trunks.text.blocks.0.attn.bias_k" not in sd
    assert "modality_postprocessors.vision.1.log_logit_scale" not in sd
    assert isinstance(model.modality_postprocessors.text[1].log_logit_scale, torch.nn.Parameter)
    assert "log_logit_scale" in dict(model.modality_postprocessors.audio[1].named_buffers())


def test_official_file_loads_strictly_and_matches_the_reference(official_file):
    model = imagebind_huge(official_file, config="tiny")
    expected_sd = official_tiny_state_dict()
    assert model.state_dict().keys() == expected_sd.keys()
    x = example_inputs(model)[0]
    with torch.no_grad():
        out = model(x)
        for m, e in out.items():
            torch.testing.assert_close(e, ref.embed(expected_sd, model.config, m, x[m]), atol=2e-5, rtol=1e-5)


def test_counts_asked_for_are_grown_after_loading(official_file):
    model = imagebind_huge(official_file, config="tiny", num_cls_tokens={"vision": 3, "imu": 0}, init="copy",
                           head_mode={"vision": "all"})
    sd = official_tiny_state_dict()
    cls = model.modality_preprocessors.vision.cls_token
    assert cls.shape == (1, 3, 32) and torch.equal(cls[:, 2], sd["modality_preprocessors.vision.cls_token"][:, 0])
    assert model.modality_preprocessors.imu.cls_token is None
    assert [s["site"] for s in surgery.recipe(model).steps] == ["num_cls_tokens.imu", "num_cls_tokens.vision"]
    assert model(example_inputs(model)[0])["vision"].shape == (2, 3, 24)


def test_load_into_a_built_model_of_other_counts(official_file):
    model = ImageBindModel(ImageBindConfig.named("tiny", num_cls_tokens={"vision": 2, "depth": 4}))
    result = load_imagebind(model, official_file)  # mismatch="model": the model takes the file's counts
    assert result.changes == {"num_cls_tokens.vision": (2, 1), "num_cls_tokens.depth": (4, 1)}
    other = ImageBindModel(ImageBindConfig.named("tiny", num_cls_tokens={"vision": 2}))
    load_imagebind(other, official_tiny_state_dict(), mismatch="checkpoint", init="mean")
    assert other.num_cls_tokens("vision") == 2
    assert torch.equal(other.modality_preprocessors.vision.cls_token[:, 1],
                       official_tiny_state_dict()["modality_preprocessors.vision.cls_token"][:, 0])


def test_a_subset_of_modalities_loads_from_the_full_file(official_file):
    model = imagebind_huge(official_file, config="tiny", modalities=("vision", "text"))
    assert model.modalities == ("vision", "text")
    x = example_inputs(model)[0]
    sd = official_tiny_state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["vision"], ref.embed(sd, model.config, "vision", x["vision"]),
                                   atol=2e-5, rtol=1e-5)


def test_checkpoint_of_another_model_is_refused_and_nothing_changes(tmp_path):
    import timm

    model = ImageBindModel(ImageBindConfig.named("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=1, num_heads=2)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="not an ImageBind checkpoint"):
        load_imagebind(model, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="not an ImageBind checkpoint"):
        imagebind_huge(tmp_path / "vit.pth", config="tiny")
    huge_keys = official_tiny_state_dict()
    huge_keys["modality_trunks.vision.blocks.0.attn.in_proj_weight"] = torch.zeros(12, 4)  # another size
    with pytest.raises(CheckpointError, match="in_proj_weight"):
        load_imagebind(model, huge_keys)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        imagebind_huge(huge_keys, config="tiny")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"modality_heads.vision.0.weight": Evil()}, f)
    with pytest.raises(UnsafeCheckpointError):
        imagebind_huge(path, config="tiny")
