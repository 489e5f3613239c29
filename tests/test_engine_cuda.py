"""The engine on GPU tensors (skipped without a GPU; CI has none, lent GPU machines run it)."""

import pytest
import timm
import torch

import surgery

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def vit(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kw}).eval().to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", ["restore", "zeros", "mean", "normal", "copy", "interpolate"])
def test_resize_on_gpu_matches_timm(dtype, init):
    model = vit(dtype)
    surgery.resize(model, reg_tokens=1, init="normal")
    surgery.resize(model, reg_tokens=3, init=init)
    assert model.reg_token.device.type == "cuda" and model.reg_token.dtype == dtype
    reference = vit(dtype, reg_tokens=3)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_normal_init_is_the_same_on_cpu_and_gpu():
    cpu, gpu = vit().cpu(), vit()
    surgery.resize(cpu, reg_tokens=4, init="normal", seed=3)
    surgery.resize(gpu, reg_tokens=4, init="normal", seed=3)
    torch.testing.assert_close(cpu.reg_token, gpu.reg_token.cpu())


def test_tokens_and_restore_exact_on_gpu(tmp_path):
    model = vit(reg_tokens=2)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    y0 = model(x)
    with surgery.tokens(model, reg_tokens=0):
        pass
    surgery.resize(model, reg_tokens=1)
    surgery.resize(model, reg_tokens=2)
    assert torch.equal(model(x), y0)
    path = tmp_path / "m.safetensors"
    surgery.save(model, path)
    fresh = vit()
    surgery.load(path, fresh)
    assert fresh.reg_token.device.type == "cuda" and torch.equal(fresh(x), y0)
