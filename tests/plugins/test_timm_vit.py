"""The timm ViT plugin against timm itself: a model resized by surgery must behave exactly like
the model timm builds with those counts, holding the same weights (all three forwards). Every
family the plugin declares is here (ViT, Eva, NaFlexVit, RelPos, hybrid stems; DeiT distilled and
Beit, whose tokens timm fixes, are refused with the reason), and wrapped models get the way in."""

import pytest
import timm
import torch

import surgery
from surgery.errors import BackboneError, CountError
from surgery.testing import check_conformance

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


# -- hybrid stems: MobileCLIP's and ViTamin's patch embeddings have no projection -------------------

HYBRIDS = {  # the released architectures, one block deep, at 64 px (their stems fix the width)
    "vit_base_mci_224": dict(img_size=64, depth=1, num_classes=5),   # MobileCLIP: ConvStem, proj=False
    "vitamin_small_224": dict(img_size=64, depth=1, num_classes=5),  # ViTamin: MbConv stages, proj=False
}


@pytest.mark.parametrize("arch", list(HYBRIDS))
def test_hybrid_stems_without_projection_match_timm(arch):
    def build(**kw):
        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False, **HYBRIDS[arch], **kw).eval()

    model = build()
    assert isinstance(model.patch_embed.proj, torch.nn.Identity)
    with_class = surgery.counts(model)["class_token"] == 1  # MobileCLIP has one, ViTamin none
    surgery.resize(model, reg_tokens=2, class_token=1)
    expected = build(reg_tokens=2) if with_class else build(reg_tokens=2, class_token=True)
    assert_same_behaviour(model, expected, images(size=64))


# -- what the head pools ------------------------------------------------------------------------


def test_prr_pool_follows_the_class_token_as_timm_builds_it():
    """PRR pools the class token when there is one and averages otherwise: timm decides at build time."""
    model = vit(global_pool="prr", reg_tokens=1)
    assert model.attn_pool.pool == "token"
    surgery.resize(model, class_token=0)
    assert model.attn_pool.pool == "avg"
    assert_same_behaviour(model, vit(global_pool="prr", reg_tokens=1, class_token=False), images())
    surgery.resize(model, class_token=1)
    assert_same_behaviour(model, vit(global_pool="prr", reg_tokens=1, class_token=True), images())


class OwnPool(torch.nn.Module):
    """An attention pool the plugin does not know (it reads the first token)."""

    def forward(self, x):
        return x[:, 0]


def test_unknown_attention_pool_keeps_the_class_token():
    model = vit(global_pool="map")
    model.attn_pool = OwnPool()
    with pytest.raises(CountError, match="attention pool \\(OwnPool\\) is not one this plugin knows"):
        surgery.resize(model, class_token=0)
    assert model.cls_token is not None and model.num_prefix_tokens == 1
    surgery.resize(model, reg_tokens=2)  # registers do not move the class token
    assert model.num_prefix_tokens == 3


# -- other families -----------------------------------------------------------------------------

FLEX = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def flex(arch="naflexvit_base_patch16_gap", **kw):
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **{**FLEX, **kw}).eval()


def naflex_batch():
    """NaFlex input: 16 patches of 8x8x3 with their grid coordinates; the second image has 10 valid."""
    gen = torch.Generator().manual_seed(2)
    coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 10:] = False
    return {"patches": torch.randn(2, 16, 8 * 8 * 3, generator=gen), "patch_coord": coords.expand(2, -1, -1),
            "patch_valid": valid}


@pytest.mark.parametrize("arch", ["naflexvit_base_patch16_gap", "naflexvit_base_patch16_map"])
def test_naflexvit_class_and_register_tokens_match_timm(arch):
    model = flex(arch, reg_tokens=1)
    assert surgery.counts(model) == {"class_token": 0, "reg_tokens": 1}
    for counts in ({"class_token": 1, "reg_tokens": 3}, {"class_token": 0, "reg_tokens": 0}):
        surgery.resize(model, **counts)
        reference = flex(arch, class_token=bool(counts["class_token"]), reg_tokens=counts["reg_tokens"])
        reference.load_state_dict(model.state_dict())  # strict
        with torch.no_grad():
            assert torch.equal(model(images()), reference(images()))
            assert torch.equal(model(naflex_batch()), reference(naflex_batch()))  # masks count the prefix
        for a, b in ((model, reference), (model.embeds, reference.embeds)):
            assert (a.num_prefix_tokens, a.num_reg_tokens, a.has_class_token) == \
                (b.num_prefix_tokens, b.num_reg_tokens, b.has_class_token)
        assert model._model_args == reference._model_args


def test_naflexvit_passes_the_conformance_kit():
    def factory(class_token=0, reg_tokens=1):
        return flex(class_token=bool(class_token), reg_tokens=reg_tokens)

    check_conformance(factory, (images(),), counts={"class_token": [1], "reg_tokens": [0, 2]})


@pytest.mark.parametrize("arch", ["vit_relpos_small_patch16_224", "vit_srelpos_small_patch16_224"])
def test_relpos_class_token_matches_timm(arch):
    """RelPosMlp pads its bias for the class token: per block, or shared (srelpos)."""
    model = flex(arch)
    assert surgery.counts(model) == {"class_token": 0}
    surgery.resize(model, class_token=1)
    for counts in (True, False):
        reference = flex(arch, class_token=counts)
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(model(images()), reference(images()))
        tables = [m.prefix_tokens for m in model.modules() if hasattr(m, "prefix_tokens")]
        assert tables == [m.prefix_tokens for m in reference.modules() if hasattr(m, "prefix_tokens")] and tables
        assert model.num_prefix_tokens == reference.num_prefix_tokens
        surgery.resize(model, class_token=0)


def test_relpos_bias_tables_refuse_with_the_reason():
    model = flex("vit_relpos_small_patch16_224", rel_pos_type="bias")
    with pytest.raises(CountError, match=r"RelPosBias\) hold learned rows for the class token.*class_token=\.\.\."):
        surgery.resize(model, class_token=1)
    assert model.cls_token is None and model.num_prefix_tokens == 0


def test_distilled_deit_declares_both_tokens_and_refuses_changes_with_the_reason():
    model = vit_like("deit_tiny_distilled_patch16_224")
    sites = surgery.sites(model)
    assert {name: site.count for name, site in sites.items()} == {"class_token": 1, "dist_token": 1}
    assert [t.name for t in sites["dist_token"].tensors] == ["dist_token", "pos_embed"]
    assert sites["dist_token"].tensors[1].start == 1  # its positional row follows the class token's
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for change in ({"dist_token": 0}, {"dist_token": 2}, {"class_token": 0}):
        with pytest.raises(CountError, match=r"one class and one distillation token.*non-distilled DeiT"):
            surgery.resize(model, **change)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], v) for k, v in after.items())
    with surgery.tokens(model, dist_token=1):  # the counts it has: nothing to do
        pass


def test_beit_declares_its_class_token_and_refuses_changes_with_the_reason():
    model = vit_like("beit_base_patch16_224")
    assert surgery.counts(model) == {"class_token": 1}
    with pytest.raises(CountError, match="Beit always has exactly one class token"):
        surgery.resize(model, class_token=0)
    assert model.cls_token.shape == (1, 1, 32)


def vit_like(arch, **kw):
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **{**TINY, "depth": 1, **kw}).eval()


# -- wrapped models -----------------------------------------------------------------------------


def _ddp(model):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return torch.nn.parallel.DistributedDataParallel(model)


WRAPPED = {
    "torch.compile": (lambda m: torch.compile(m), r"torch.compile'd model .* pass the model itself, model._orig_mod"),
    "DataParallel": (torch.nn.DataParallel, r"DataParallel model .* model.module"),
    "DistributedDataParallel": (_ddp, r"DistributedDataParallel model .* model.module"),
}


@pytest.mark.parametrize("wrapper", list(WRAPPED))
def test_wrapped_model_gets_the_way_to_the_model(wrapper):
    import torch.distributed as dist

    wrap, message = WRAPPED[wrapper]
    model = vit(reg_tokens=1)
    try:
        wrapped = wrap(model)
        for call in (surgery.counts, lambda m: surgery.resize(m, reg_tokens=2)):
            with pytest.raises(BackboneError, match=message):
                call(wrapped)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert model.reg_token.shape == (1, 1, 32)


def test_features_only_model_gets_the_way_to_the_model_whose_features_follow():
    def features(**kw):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, out_indices=(0, 1),
                                 global_pool="avg", **{**TINY, **kw}).eval()

    wrapped = features()
    with pytest.raises(BackboneError, match=r"features_only model .* pass the model itself, model.model"):
        surgery.resize(wrapped, reg_tokens=2)
    surgery.resize(wrapped.model, reg_tokens=2, class_token=0)  # the hint, followed
    reference = features(reg_tokens=2, class_token=False)
    reference.load_state_dict(wrapped.state_dict())
    with torch.no_grad():
        ours, theirs = wrapped(images()), reference(images())
    assert len(ours) == len(theirs) == 2 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_registered_factories_take_the_counts_by_site_name():
    """What the conformance kit relies on: `surgery.build(name, **counts)` builds those counts."""
    eva = surgery.build("eva_tiny_test", reg_tokens=2, class_token=0)  # Eva spells it num_reg_tokens
    assert surgery.counts(eva) == {"class_token": 0, "reg_tokens": 2} and eva.cls_embed is False
    avg = surgery.build("vit_tiny_avg_test", class_token=0)
    assert avg.has_class_token is False and avg.num_prefix_tokens == 0  # a bool, as timm's own build


def test_eva_class_token_removal_matches_timm():
    """Eva records `cls_embed` (a class token and no registers): it follows both counts."""
    kw = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=10, global_pool="avg")
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **kw).eval()
    for counts in ({"class_token": 0}, {"class_token": 1, "reg_tokens": 1}):
        surgery.resize(model, **counts)
        reference = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **kw, class_token=bool(
            surgery.counts(model)["class_token"]), num_reg_tokens=surgery.counts(model)["reg_tokens"]).eval()
        reference.load_state_dict(model.state_dict())
        assert model.cls_embed is reference.cls_embed
        with torch.no_grad():
            assert torch.equal(model(images(size=28)), reference(images(size=28)))


def test_registered_models_build_and_run():
    for name in ("vit_tiny_test", "vit_tiny_reg_test", "vit_tiny_avg_test", "eva_tiny_test"):
        spec = surgery.get_host().model_spec(name)
        model = surgery.build(name)
        with torch.no_grad():
            assert model(*spec.example_inputs(model)).shape == (2, 10)
