"""ClipVision against a from-scratch OpenAI-CLIP forward written here in plain torch.

The reference follows openai/CLIP `VisionTransformer.forward` op for op (conv1, class
embedding, positional embedding, ln_pre, residual attention blocks in LND layout with
`multi_head_attention_forward` on `in_proj_*`, QuickGELU MLP), except that, like upstream's
`clip_encode_image`, it applies ln_post and `@ proj` to every token instead of the CLS one.
It reads the OpenAI state dict directly, so it checks the key mapping as well as the layout.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures import TINY_CLIP, make_openai_visual_state_dict
from surgery.errors import CheckpointError
from surgery_plugins.llama_adapter.clip import (
    ClipVision,
    ClipVisionConfig,
    clip_transform,
    convert_openai_visual,
    load_images,
    to_openai_visual,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def openai_reference(sd, images, prefix="visual."):
    """OpenAI CLIP's visual tower keeping all tokens: images (B, 3, S, S) -> (B, 1+N, D)."""
    w = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    width, _, patch, _ = w["conv1.weight"].shape
    heads = width // 64
    layers = len({k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")})

    def ln(x, name):
        return F.layer_norm(x, (width,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)

    x = F.conv2d(images, w["conv1.weight"], stride=patch)             # (B, W, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)       # (B, N, W)
    cls = w["class_embedding"] + x.new_zeros(x.shape[0], 1, width)     # (B, 1, W)
    x = torch.cat([cls, x], dim=1) + w["positional_embedding"]        # (B, 1+N, W)
    x = ln(x, "ln_pre")
    x = x.permute(1, 0, 2)                                            # (1+N, B, W), LND
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        h = ln(x, b + "ln_1")
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, w[b + "attn.in_proj_weight"], w[b + "attn.in_proj_bias"],
            None, None, False, 0.0, w[b + "attn.out_proj.weight"], w[b + "attn.out_proj.bias"],
            training=False, need_weights=False)
        x = x + attn
        h = ln(x, b + "ln_2")
        h = F.linear(h, w[b + "mlp.c_fc.weight"], w[b + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)                              # QuickGELU
        x = x + F.linear(h, w[b + "mlp.c_proj.weight"], w[b + "mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)                                            # (B, 1+N, W)
    x = ln(x, "ln_post")                                              # every token, not x[:, 0]
    return x @ w["proj"]                                              # (B, 1+N, D)


def images(batch=3, size=28, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prefix", ["clip.visual.", "visual.", ""])
def test_matches_openai_reference_all_tokens(prefix):
    sd = make_openai_visual_state_dict(**TINY_CLIP, prefix=prefix)
    model = ClipVision.from_openai(sd).eval()
    x = images()
    with torch.no_grad():
        out = model(x)
        ref = openai_reference(sd, x, prefix)
    assert out.shape == ref.shape == (3, 5, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # not just the CLS row: patch tokens differ from each other and from CLS
    assert not torch.allclose(out[:, 0], out[:, 1]) and not torch.allclose(out[:, 1], out[:, 2])


def test_load_openai_into_built_module_and_ignore_rest_of_model(tiny_clip_visual_sd):
    # a full LLaMA_adapter state dict: the tower under clip.visual., plus text tower and adapter keys
    full = {"clip." + k: v for k, v in tiny_clip_visual_sd.items()}
    full.update({"clip.token_embedding.weight": torch.zeros(10, 4), "clip.logit_scale": torch.zeros(()),
                 "visual_query.weight": torch.zeros(10, 8), "llama.norm.weight": torch.ones(8)})
    model = ClipVision(ClipVisionConfig(**TINY_CLIP)).eval()
    assert model.load_openai(full) is model
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), openai_reference(tiny_clip_visual_sd, x), rtol=1e-5, atol=1e-5)


def test_config_from_state_dict_tiny_and_vit_l14():
    sd = make_openai_visual_state_dict(**TINY_CLIP)
    assert ClipVisionConfig.from_state_dict(sd) == ClipVisionConfig(
        image_size=28, patch_size=14, width=128, layers=2, heads=2, output_dim=32)
    # ViT-L/14 shapes as upstream's state dict lists them (meta: no memory)
    vit_l = make_openai_visual_state_dict(width=1024, layers=24, patch_size=14, image_size=224,
                                          output_dim=768, prefix="clip.visual.", device="meta")
    assert vit_l["clip.visual.positional_embedding"].shape == (257, 1024)
    assert ClipVisionConfig.from_state_dict(vit_l) == ClipVisionConfig()
    assert ClipVisionConfig().num_tokens == 257
    # heads follow OpenAI's width // 64 unless given (they change no shape, so must not be guessed)
    assert ClipVisionConfig().heads == 16 and ClipVisionConfig(width=128).heads == 2
    assert ClipVisionConfig(width=128, heads=4).heads == 4


def test_vit_l14_layout_matches_openai_shapes():
    vit_l = make_openai_visual_state_dict(width=1024, layers=24, patch_size=14, image_size=224,
                                          output_dim=768, device="meta")
    with torch.device("meta"):
        model = ClipVision()
    own = model.state_dict()
    converted = convert_openai_visual(vit_l)
    assert own.keys() == converted.keys()
    assert all(own[k].shape == converted[k].shape for k in own)
    assert sum(v.numel() for v in own.values()) == sum(v.numel() for v in vit_l.values())
    assert model.blocks[0].attn.num_heads == 16 and model.patch_embed.proj.bias is None
    assert model.head.bias is None and model.global_pool == ""


def test_from_openai_on_meta_checkpoint_gives_shapes_only_module():
    sd = make_openai_visual_state_dict(**TINY_CLIP, device="meta")
    model = ClipVision.from_openai(sd)
    assert model.head.weight.is_meta and model.head.weight.shape == (32, 128)


def test_key_errors_name_missing_and_unexpected_keys(tiny_clip_visual_sd):
    sd = dict(tiny_clip_visual_sd)
    del sd["visual.transformer.resblocks.1.ln_2.bias"]
    sd["visual.transformer.resblocks.0.attn.bogus"] = torch.zeros(1)
    sd["visual.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        convert_openai_visual(sd)
    msg = str(err.value)
    assert "visual.transformer.resblocks.1.ln_2.bias" in msg
    assert "visual.transformer.resblocks.0.attn.bogus" in msg and "visual.extra" in msg
    with pytest.raises(CheckpointError):
        ClipVision.from_openai(sd)


def test_no_visual_weights_and_uninferable_config():
    with pytest.raises(CheckpointError, match="no OpenAI CLIP visual weights"):
        convert_openai_visual({"llama.norm.weight": torch.ones(4)})
    sd = make_openai_visual_state_dict(**TINY_CLIP)
    del sd["visual.conv1.weight"]
    with pytest.raises(CheckpointError, match="visual.conv1.weight"):
        ClipVisionConfig.from_state_dict(sd)


def test_shape_or_depth_mismatch_raises_before_loading(tiny_clip_visual_sd):
    model = ClipVision(ClipVisionConfig(**{**TINY_CLIP, "output_dim": 16}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \(32, 128\) vs model \(16, 128\)"):
        model.load_openai(tiny_clip_visual_sd)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    deeper = ClipVision(ClipVisionConfig(**{**TINY_CLIP, "layers": 3}))
    with pytest.raises(CheckpointError, match="blocks.2"):
        deeper.load_openai(tiny_clip_visual_sd)


def test_round_trip_to_openai(tiny_clip_visual_sd):
    model = ClipVision.from_openai(tiny_clip_visual_sd)
    back = to_openai_visual(model.state_dict(), prefix="visual.")
    assert back.keys() == tiny_clip_visual_sd.keys()
    assert all(torch.equal(back[k], v) for k, v in tiny_clip_visual_sd.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny_clip_visual_sd, dtype):
    model = ClipVision.from_openai(tiny_clip_visual_sd, dtype=dtype).eval()
    assert model.norm.weight.dtype == dtype
    x = images()  # fp32 images: the model casts them to its dtype
    with torch.no_grad():
        out = model(x)
        ref = openai_reference(tiny_clip_visual_sd, x)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-1 if dtype == torch.bfloat16 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_close_to_fp32(tiny_clip_visual_sd):
    model = ClipVision.from_openai(tiny_clip_visual_sd, device="cuda", dtype=torch.float16).eval()
    x = images()
    with torch.no_grad():
        out = model(x.cuda())
    torch.testing.assert_close(out.float().cpu(), openai_reference(tiny_clip_visual_sd, x), rtol=2e-2, atol=2e-2)


# -- preprocessing --------------------------------------------------------------------------------


def by_hand(image, size):
    """Resize the short side to `size` (bicubic, long side truncated like torchvision), crop the
    centre, RGB, [0, 1], (x - mean) / std: CLIP's `_transform`."""
    w, h = image.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = round((nw - size) / 2), round((nh - size) / 2)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def pil(mode, w, h, seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("mode,w,h", [("RGB", 60, 40), ("L", 40, 64), ("RGBA", 28, 28)])
def test_clip_transform_matches_formula(mode, w, h):
    image = pil(mode, w, h)
    out = clip_transform(20)(image)
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    torch.testing.assert_close(out, by_hand(image, 20), rtol=0, atol=1e-6)


def test_load_images_from_paths_and_pil(tmp_path):
    a, b = pil("RGB", 60, 40, seed=1), pil("L", 40, 64, seed=2)
    a.save(tmp_path / "a.png")
    batch = load_images([tmp_path / "a.png", str(tmp_path / "a.png"), b], image_size=28)
    assert batch.shape == (3, 3, 28, 28)
    torch.testing.assert_close(batch[0], by_hand(a, 28), rtol=0, atol=1e-6)
    assert torch.equal(batch[0], batch[1])
    torch.testing.assert_close(batch[2], by_hand(b, 28), rtol=0, atol=1e-6)
    assert load_images(b, 28).shape == (1, 3, 28, 28)
    # the whole path: PIL -> transform -> encoder
    model = ClipVision.from_openai(make_openai_visual_state_dict(**TINY_CLIP)).eval()
    with torch.no_grad():
        assert model(batch).shape == (3, 5, 32)
