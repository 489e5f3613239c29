"""The timm ViT plugin against timm itself: a model resized by surgery must behave exactly like
the model timm builds with those counts, holding the same weights (all three forwards)."""

import pytest
import timm
import torch

import surgery
from surgery.errors import BackboneError, CountError

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kw}).eval()


def images(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_same_behaviour(model, reference, x):
    """forward, forward_features and forward_intermediates (with prefix tokens) agree bit-exactly."""
    reference.load_state_dict(model.state_dict())  # strict: same keys and shapes
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        assert torch.equal(model.forward_features(x), reference.forward_features(x))
        ours = model.forward_intermediates(x, return_prefix_tokens=True)
        theirs = reference.forward_intermediates(x, return_prefix_tokens=True)
    assert torch.equal(ours[0], theirs[0])
    for (a_sp, a_pre), (b_sp, b_pre) in zip(ours[1], theirs[1]):
        assert a_sp.shape == b_sp.shape and torch.equal(a_sp, b_sp)
        assert a_pre.shape == b_pre.shape and torch.equal(a_pre, b_pre)
    assert model.num_prefix_tokens == reference.num_prefix_tokens
    assert model.num_reg_tokens == reference.num_reg_tokens
    assert model.has_class_token == reference.has_class_token
    if hasattr(reference, "_model_args"):  # timm >= 1.0.30 records reconstruction arguments
        assert model._model_args == reference._model_args


@pytest.mark.parametrize("layout", [{}, {"no_embed_class": True}], ids=["pos-covers-prefix", "no_embed_class"])
@pytest.mark.parametrize("init", ["restore", "mean", "normal", "copy", "zeros", "interpolate"])
def test_registers_0_to_4_match_timm(layout, init):
    model = vit(**layout)
    if init in ("mean", "copy", "interpolate"):  # need existing registers: start from one
        surgery.resize(model, reg_tokens=1, init="normal")
    surgery.resize(model, reg_tokens=4, init=init)
    assert model.reg_token.shape == (1, 4, 32)
    expected_pos = 16 + (0 if layout else 5)
    assert model.pos_embed.shape == (1, expected_pos, 32)
    assert_same_behaviour(model, vit(reg_tokens=4, **layout), images())


def test_new_pos_rows_sit_between_class_and_patch_rows():
    model = vit()
    pos = model.pos_embed.detach().clone()
    surgery.resize(model, reg_tokens=2, init="zeros")
    reference = torch.cat([pos[:, :1], torch.zeros(1, 2, 32), pos[:, 1:]], dim=1)
    assert torch.equal(model.pos_embed, reference)


@pytest.mark.parametrize("layout", [{}, {"no_embed_class": True}], ids=["pos-covers-prefix", "no_embed_class"])
def test_class_token_added_and_removed_matches_timm(layout):
    model = vit(class_token=False, global_pool="avg", **layout)
    surgery.resize(model, class_token=1)
    assert_same_behaviour(model, vit(class_token=True, global_pool="avg", **layout), images())
    surgery.resize(model, class_token=0)
    assert model.cls_token is None
    assert_same_behaviour(model, vit(class_token=False, global_pool="avg", **layout), images())


def test_class_and_registers_together_match_timm():
    model = vit(class_token=False, global_pool="avg")
    surgery.resize(model, class_token=1, reg_tokens=3)
    assert_same_behaviour(model, vit(class_token=True, reg_tokens=3, global_pool="avg"), images())
    surgery.resize(model, class_token=0, reg_tokens=1)
    assert_same_behaviour(model, vit(class_token=False, reg_tokens=1, global_pool="avg"), images())


def test_model_args_rebuild_the_same_architecture():
    model = vit()
    if not hasattr(model, "_model_args"):
        pytest.skip("this timm records no reconstruction arguments")
    surgery.resize(model, reg_tokens=2)
    rebuilt = timm.create_model("vit_tiny_patch16_224", pretrained=False, **model._model_args)
    rebuilt.load_state_dict(model.state_dict())  # strict


def test_patch_dropout_counter_follows():
    model = vit(patch_drop_rate=0.5)
    surgery.resize(model, reg_tokens=3)
    reference = vit(patch_drop_rate=0.5, reg_tokens=3)
    reference.load_state_dict(model.state_dict())
    assert model.patch_drop.num_prefix_tokens == reference.patch_drop.num_prefix_tokens == 4
    model.train(), reference.train()
    torch.manual_seed(5)
    ours = model.forward_features(images())
    torch.manual_seed(5)
    assert torch.equal(ours, reference.forward_features(images()))


def test_dynamic_image_size_uses_new_prefix_count():
    model = vit(dynamic_img_size=True)
    surgery.resize(model, reg_tokens=2)
    reference = vit(dynamic_img_size=True, reg_tokens=2)
    reference.load_state_dict(model.state_dict())
    x = images(size=48)
    assert torch.equal(model(x), reference(x))


def test_eva_registers_match_timm():
    kw = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **kw).eval()
    surgery.resize(model, reg_tokens=2)
    assert all(m.num_prefix_tokens == 3 for m in model.modules() if hasattr(m, "num_prefix_tokens"))
    reference = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_reg_tokens=2, **kw).eval()
    reference.load_state_dict(model.state_dict())
    x = images(size=28)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        assert torch.equal(model.forward_features(x), reference.forward_features(x))
    assert getattr(model, "_model_args", {"num_reg_tokens": 2})["num_reg_tokens"] == 2


def test_token_pooling_keeps_the_class_token():
    model = vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CountError, match="global_pool='token' reads the class token"):
        surgery.resize(model, class_token=0)
    assert model.cls_token is not None and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_tokens_context_restores_timm_model():
    model = vit(reg_tokens=2)
    y0 = model(images())
    with surgery.tokens(model, reg_tokens=0):
        assert model.reg_token is None and model.num_prefix_tokens == 1
        reference = vit()
        reference.load_state_dict(model.state_dict())  # strict: the layout of a 0-register model
        assert torch.equal(model(images()), reference(images()))
    assert model.num_prefix_tokens == 3 and torch.equal(model(images()), y0)


def test_distilled_vit_is_not_claimed():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **TINY)
    with pytest.raises(BackboneError, match="VisionTransformerDistilled"):
        surgery.sites(deit)


def test_registered_models_build_and_run():
    for name in ("vit_tiny_test", "vit_tiny_reg_test", "vit_tiny_avg_test", "eva_tiny_test"):
        spec = surgery.get_host().model_spec(name)
        model = surgery.build(name)
        with torch.no_grad():
            assert model(*spec.example_inputs(model)).shape == (2, 10)
