"""ImageBindModel against the independent reference (`reference.py`), and CLS counts at runtime."""

import pytest
import torch

import ib_reference as ref
import surgery
from surgery_plugins.imagebind.config import CLS_MODALITIES, ImageBindConfig
from surgery_plugins.imagebind.model import ImageBindModel
from surgery_plugins.imagebind.plugin import example_inputs

ATOL = 2e-5


def tiny(**overrides):
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.named("tiny", **overrides)).eval()


def inputs(model, batch=2):
    return example_inputs(model, batch)[0]


def sd(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def site(modality):
    return f"num_cls_tokens.{modality}"


@pytest.mark.parametrize("modality", ["vision", "text", "audio", "depth", "thermal", "imu"])
def test_every_modality_matches_the_reference(modality):
    model = tiny()
    x = inputs(model)[modality]
    with torch.no_grad():
        ours = model({modality: x})[modality]
        expected = ref.embed(sd(model), model.config, modality, x)
    assert ours.shape == (2, model.config.out_embed_dim)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-5)


def test_clip_axis_is_averaged_as_upstream():
    model = tiny()
    g = torch.Generator().manual_seed(3)
    video = torch.randn(2, 3, 3, 2, 56, 56, generator=g)  # (B, S, C, T, H, W)
    audio = torch.randn(2, 3, 1, 36, 46, generator=g)     # (B, S, 1, mels, frames)
    with torch.no_grad():
        out = model({"vision": video, "audio": audio})
        for modality, x in (("vision", video), ("audio", audio)):
            expected = ref.embed(sd(model), model.config, modality, x)
            torch.testing.assert_close(out[modality], expected, atol=ATOL, rtol=1e-5)
            per_clip = model({modality: x.flatten(0, 1).unsqueeze(1)})[modality].view(2, 3, -1)  # S = 1 each
            torch.testing.assert_close(out[modality], per_clip.mean(1))  # the mean is not renormalised
    assert not torch.allclose(out["vision"].norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("modality,size", [("vision", 84), ("depth", 48), ("thermal", 24)])
def test_other_resolutions_interpolate_like_upstream(modality, size):
    model = tiny()
    chans = 3 if modality == "vision" else 1
    x = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model({modality: x})[modality]
        m = model.config.modalities[modality]
        layout = [(s - k) // k + 1 for s, k in zip(m.input_size[-2:], m.kernel_size[-2:])]
        tokens = ref.patch_tokens(sd(model), modality, x, 1, layout, m.kernel_size)
        expected = ref.post(sd(model), modality, ref.head(sd(model), modality,
                                                          ref.trunk(sd(model), modality, tokens, m.num_heads)))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("k", [0, 2, 4])
def test_cls_counts_run_every_modality_and_shrinking_back_is_exact(k):
    model = tiny()
    x = inputs(model)
    with torch.no_grad():
        before = model(x)
        surgery.resize(model, **{site(m): k for m in CLS_MODALITIES})
        assert all(model.num_cls_tokens(m) == k for m in CLS_MODALITIES)
        grown = model(x)
        modes = ["first"] + (["mean", "all"] if k else [])
        for mode in modes:
            out = model(x, head_mode=mode)
            for m in CLS_MODALITIES:
                want = (2, k, 24) if mode == "all" else (2, 24)
                assert out[m].shape == want and torch.isfinite(out[m]).all(), (m, mode)
            assert torch.equal(out["text"], before["text"])  # text has no CLS tokens
        for m in CLS_MODALITIES:
            assert not torch.equal(grown[m], before[m]), m  # the count reaches the forward
            pre = model.modality_preprocessors[m]
            table = pre.pos_embed if m == "imu" else pre.pos_embedding_helper.pos_embed
            assert table.shape[1] == k + (8 if m == "imu" else pre.pos_embedding_helper.num_patches)
            assert (pre.cls_token is None) == (k == 0)
        surgery.resize(model, **{site(m): 1 for m in CLS_MODALITIES})
        after = model(x)
    for m in before:
        assert torch.equal(after[m], before[m]), m


def test_head_modes_match_the_reference_with_several_cls_tokens():
    model = tiny()
    surgery.resize(model, **{site(m): 3 for m in CLS_MODALITIES}, init="normal", seed=5)
    x = inputs(model)
    weights = sd(model)
    with torch.no_grad():
        for mode in ("first", "mean", "all"):
            out = model(x, head_mode=mode)
            for m in CLS_MODALITIES:
                expected = ref.embed(weights, model.config, m, x[m], k=3, mode=mode)
                torch.testing.assert_close(out[m], expected, atol=ATOL, rtol=1e-5)
        all_tokens = model(x, head_mode="all")
        first = model(x, head_mode="first")
    for m in CLS_MODALITIES:
        # the same token through the head at another batch shape: equal up to matmul rounding
        torch.testing.assert_close(all_tokens[m][:, 0], first[m], atol=1e-6, rtol=2e-6)


def test_interpolation_keeps_every_cls_row():
    model = tiny()
    surgery.resize(model, **{site("vision"): 3}, init="normal", seed=1)
    x = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model({"vision": x}, head_mode="all")["vision"]
        weights = sd(model)
        tokens = ref.patch_tokens(weights, "vision", x, 3, [4, 4], (14, 14))
        h = ref.trunk(weights, "vision", tokens, 2)
        expected = ref.post(weights, "vision", ref.head(weights, "vision", h, 3, "all"))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-5)


def test_set_head_mode_per_modality():
    model = tiny(num_cls_tokens={"vision": 2})
    model.set_head_mode({"vision": "all"})
    out = model(inputs(model))
    assert out["vision"].shape == (2, 2, 24) and out["audio"].shape == (2, 24)
    assert model.head_mode("vision") == "all" and model.config.modalities["vision"].head_mode == "all"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype):
    model = tiny()
    x = inputs(model)
    with torch.no_grad():
        full = model(x)
        half = model.to(dtype)(x)
    for m, e in half.items():
        assert e.dtype == dtype
        torch.testing.assert_close(e.float(), full[m], atol=0.1, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    model = tiny()
    x = inputs(model)
    with torch.no_grad():
        cpu = model(x)
        surgery.resize(model, **{site("vision"): 2})
        cuda_model = model.to("cuda", dtype)
        out = cuda_model({k: v.cuda() for k, v in x.items()}, head_mode="all")
        surgery.resize(cuda_model, **{site("vision"): 1})
        back = cuda_model({k: v.cuda() for k, v in x.items()})
    assert out["vision"].shape == (2, 2, 24) and out["vision"].device.type == "cuda"
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for m in cpu:
        torch.testing.assert_close(back[m].float().cpu(), cpu[m], atol=tol, rtol=tol)
