"""surgery.trainable: only the chosen rows change, with any optimizer; every other value is
bit-identical; every requires_grad flag comes back."""

import pytest
import torch

import surgery
from surgery.errors import SiteError, SweepError

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adamw_decay": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.5),  # decay moves every value
    "sgd_momentum_decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
}


def images(model, n=4):
    return torch.randn(n, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(model, params, optimizer, steps=3):
    x = images(model)
    opt = OPTIMIZERS[optimizer](params)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def changed_rows(before, after, dim=1):
    """Indices along `dim` where any value differs."""
    diff = (before != after)
    other = [d for d in range(diff.dim()) if d != dim]
    return diff.any(dim=tuple(other)).nonzero().flatten().tolist() if other else diff.nonzero().flatten().tolist()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_only_new_rows_change_every_other_value_bit_identical(optimizer):
    model = surgery.build("vit_tiny_reg_test")  # 2 registers, pos_embed over patches only
    with surgery.tokens(model, reg_tokens=4, init="normal", seed=0):
        before = snapshot(model)
        with surgery.trainable(model, sites="reg_tokens", rows="new") as params:
            assert [p is model.reg_token for p in params] == [True]
            train(model, params, optimizer)
        after = snapshot(model)
        assert changed_rows(before["reg_token"], after["reg_token"]) == [2, 3]  # the new ones, not 0, 1
        for key in before:
            if key != "reg_token":
                assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_coupled_positional_rows_follow_and_patch_rows_stay(optimizer):
    model = surgery.build("vit_tiny_test")  # class token; pos_embed rows [cls, reg..., patches...]
    with surgery.tokens(model, reg_tokens=3, init="normal", seed=0):
        before = snapshot(model)
        with surgery.trainable(model, sites="reg_tokens") as params:
            train(model, params, optimizer)
        after = snapshot(model)
        assert changed_rows(before["reg_token"], after["reg_token"]) == [0, 1, 2]
        assert changed_rows(before["pos_embed"], after["pos_embed"]) == [1, 2, 3]  # the registers' rows only
        assert torch.equal(before["cls_token"], after["cls_token"])
        for key in before:
            if key not in ("reg_token", "pos_embed"):
                assert torch.equal(before[key], after[key]), key


def test_rows_all_trains_every_row_of_the_site():
    model = surgery.build("vit_tiny_reg_test")
    with surgery.tokens(model, reg_tokens=3, init="normal", seed=0):
        before = snapshot(model)
        with surgery.trainable(model, sites=["reg_tokens"], rows="all") as params:
            train(model, params, "adamw_decay")
        after = snapshot(model)
    assert changed_rows(before["reg_token"], after["reg_token"]) == [0, 1, 2]
    assert all(torch.equal(before[k], after[k]) for k in before if k != "reg_token")


def test_flags_restored_and_hooks_removed():
    model = surgery.build("vit_tiny_reg_test")
    model.head.weight.requires_grad_(False)  # a mixed set of flags comes back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with surgery.tokens(model, reg_tokens=4, init="normal", seed=0):
        with surgery.trainable(model, sites="reg_tokens") as params:
            assert [p is model.reg_token for p in params] == [True]
            assert {n for n, p in model.named_parameters() if p.requires_grad} == {"reg_token"}
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        # after the block nothing is masked: a step moves the old registers too
        before = model.reg_token.detach().clone()
        train(model, [model.reg_token], "adam", steps=1)
        assert changed_rows(before, model.reg_token.detach()) == [0, 1, 2, 3]


def test_flags_restored_when_the_body_raises():
    model = surgery.build("vit_tiny_test")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with surgery.trainable(model, sites="class_token", rows="all"):
            raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_nothing_new_yields_no_parameters():
    model = surgery.build("vit_tiny_reg_test")
    with surgery.tokens(model, reg_tokens=1):  # shrunk: no new rows
        with surgery.trainable(model, sites="reg_tokens", rows="new") as params:
            assert params == []
            assert not any(p.requires_grad for p in model.parameters())


def test_since_outside_a_block_counts_from_the_built_model():
    model = surgery.build("vit_tiny_reg_test")
    surgery.resize(model, reg_tokens=5, init="normal")  # built with 2: rows 2..4 are new
    before = model.reg_token.detach().clone()
    with surgery.trainable(model, sites="reg_tokens") as params:
        train(model, params, "adamw_decay")
    assert changed_rows(before, model.reg_token.detach()) == [2, 3, 4]
    before = model.reg_token.detach().clone()
    with surgery.trainable(model, sites="reg_tokens", since={"reg_tokens": 4}) as params:
        train(model, params, "adamw_decay")
    assert changed_rows(before, model.reg_token.detach()) == [4]


def llama_loss(model):
    gen = torch.Generator().manual_seed(0)
    size = model.config.clip.image_size
    imgs = torch.randn(2, 3, size, size, generator=gen)
    tokens = torch.randint(3, model.config.vocab_size, (2, 6), generator=gen)
    return model(tokens, tokens, imgs)[0]


def test_viewed_table_and_end_anchored_rows():
    """LLaMA-Adapter's adapter_query (L*Q, D) seen as (L, Q, D): query_len's new queries are new
    columns of every layer; query_layer's new layer is the front row (anchored at the end)."""
    model = surgery.build("llama_adapter_v2_tiny")  # query_len 3, query_layer 3
    L, Q, D = 3, 3, model.adapter_query.weight.shape[-1]
    with surgery.tokens(model, query_len=5, query_layer=4, init="normal", seed=0):
        before = snapshot(model)
        with surgery.trainable(model, sites=["query_len", "query_layer"]) as params:
            opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
            for _ in range(2):
                opt.zero_grad()
                llama_loss(model).backward()
                opt.step()
        after = snapshot(model)
    table_before = before["adapter_query.weight"].view(L + 1, Q + 2, D)
    table_after = after["adapter_query.weight"].view(L + 1, Q + 2, D)
    changed = (table_before != table_after).any(-1)  # (layers, queries)
    expected = torch.zeros(L + 1, Q + 2, dtype=torch.bool)
    expected[0, :] = True  # the new (earliest adapted) layer: all its queries
    expected[:, Q:] = True  # the new queries: in every layer
    assert torch.equal(changed, expected)
    assert changed_rows(before["visual_query.weight"], after["visual_query.weight"], dim=0) == [3, 4]
    for key in before:
        if key not in ("adapter_query.weight", "visual_query.weight"):
            assert torch.equal(before[key], after[key]), key


def test_refusals():
    model = surgery.build("vit_tiny_test")
    with pytest.raises(SiteError, match="no token site 'registers'"):
        with surgery.trainable(model, sites="registers"):
            pass
    with pytest.raises(SweepError, match="rows='some'"):
        with surgery.trainable(model, sites="reg_tokens", rows="some"):
            pass


def test_a_resize_inside_the_block_is_refused_at_the_next_step():
    model = surgery.build("vit_tiny_test")
    with surgery.tokens(model, reg_tokens=2, init="normal"):
        with surgery.trainable(model, sites="reg_tokens") as params:
            opt = torch.optim.SGD(params, lr=0.1)
            surgery.resize(model, reg_tokens=3)  # pos_embed, partly frozen, gains a row
            with pytest.raises(SweepError, match="changed shape inside surgery.trainable"):
                opt.step()
