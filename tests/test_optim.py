"""Optimizers follow a change of counts (`resize(..., optimizer=)`, `tokens(..., optimizer=)`).

Every expected state is built here in plain torch from the rule (kept rows keep their state, new
rows start at zero, restored rows get their stashed state back), and every step is checked against
the same torch optimizer run on a standalone copy of the parameter holding that expected state.
"""

from unittest import mock

import pytest
import torch
from torch import nn

import surgery
from surgery.edit import Edit
from surgery.errors import OptimizerError, ResizeError
from toy_backbone import ToyModel

OPTIMIZERS = {
    "sgd": (lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9), ["momentum_buffer"]),
    "adam": (lambda params: torch.optim.Adam(params, lr=0.001), ["exp_avg", "exp_avg_sq"]),
    "adamw": (lambda params: torch.optim.AdamW(params, lr=0.001, weight_decay=0.1), ["exp_avg", "exp_avg_sq"]),
}


def make(**kw):
    torch.manual_seed(0)
    return ToyModel(**kw)


def x_in(model, seed=1):
    return torch.randn(2, 5, model.dim, generator=torch.Generator().manual_seed(seed))


def train(model, opt, steps=2, forward=None):
    for i in range(steps):
        opt.zero_grad()
        out = forward(model, i) if forward else model(x_in(model, seed=i))
        out.square().sum().backward()
        opt.step()


def row_state(opt, param, names):
    return {name: opt.state[param][name].clone() for name in names}


def check_step_matches_reference(model, opt, kind, param, expected_state, forward=None):
    """One step of `opt` on `param` equals the same optimizer class stepping a standalone copy of
    `param` that holds `expected_state` (and the same step count)."""
    build, names = OPTIMIZERS[kind]
    ref = nn.Parameter(param.detach().clone())
    ref_opt = build([ref])
    if opt.state.get(param):
        ref_opt.state[ref] = {k: (expected_state[k].clone() if k in expected_state else v.clone())
                              for k, v in opt.state[param].items()}
    opt.zero_grad()
    (forward(model, 9) if forward else model(x_in(model, seed=9))).square().sum().backward()
    ref.grad = param.grad.clone()
    before = param.detach().clone()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(param.detach(), ref.detach(), rtol=0, atol=0)
    return before


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_growth_gives_new_rows_zero_state_and_the_next_step_trains_them(toy_host, kind):
    build, names = OPTIMIZERS[kind]
    model = make(prompts=2)
    opt = build(model.parameters())
    train(model, opt)
    old_p, old_pos = row_state(opt, model.prompts, names), row_state(opt, model.pos, names)
    surgery.resize(model, prompts=4, init="normal", optimizer=opt)
    for name in names:
        assert torch.equal(opt.state[model.prompts][name], torch.cat([old_p[name], torch.zeros(2, 8)]))
        expected_pos = torch.cat([old_pos[name][:, :2], torch.zeros(1, 2, 8), old_pos[name][:, 2:]], dim=1)
        assert torch.equal(opt.state[model.pos][name], expected_pos)
    expected = {n: torch.cat([old_p[n], torch.zeros(2, 8)]) for n in names}
    before = check_step_matches_reference(model, opt, kind, model.prompts, expected)
    assert not torch.equal(model.prompts[2:], before[2:])  # the new rows were trained


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_truncate_then_restore_brings_the_state_back_bit_exactly(toy_host, kind):
    build, names = OPTIMIZERS[kind]
    model = make(prompts=4)
    opt = build(model.parameters())
    train(model, opt)
    original = {id(p): row_state(opt, p, names) for p in (model.prompts, model.pos)}
    surgery.resize(model, prompts=1, optimizer=opt)
    for name in names:
        assert torch.equal(opt.state[model.prompts][name], original[id(model.prompts)][name][:1])
    train(model, opt, steps=1)  # the optimizer runs at the smaller count
    kept = {name: opt.state[model.prompts][name].clone() for name in names}
    surgery.resize(model, prompts=4, optimizer=opt)
    for name in names:  # row 0 as trained since, rows 1-3 exactly as they were dropped
        expected = torch.cat([kept[name], original[id(model.prompts)][name][1:]])
        assert torch.equal(opt.state[model.prompts][name], expected)
    assert getattr(opt, surgery.optim.STASH_ATTR) == {}
    train(model, opt, steps=1)


def test_state_follows_both_axes_of_a_shared_table_in_any_order(toy_host):
    """query_len and query_layer are the Q and L axes of one (L*Q, D) table: its Adam state is cut
    and restored along both, interleaved, and comes back bit for bit."""
    model = make(query_len=3, query_layer=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, opt)
    weight = model.adapter.weight
    original = {n: opt.state[weight][n].clone() for n in ("exp_avg", "exp_avg_sq")}
    surgery.resize(model, query_len=2, optimizer=opt)
    surgery.resize(model, query_layer=1, optimizer=opt)
    for n, table in original.items():
        assert torch.equal(opt.state[weight][n], table.view(3, 3, 8)[:1, :2].reshape(2, 8))
    surgery.resize(model, query_len=5, optimizer=opt)  # query 2 back from the stash, 3 and 4 new
    for n, table in original.items():
        expected = torch.cat([table.view(3, 3, 8)[:1], torch.zeros(1, 2, 8)], dim=1)
        assert torch.equal(opt.state[weight][n], expected.reshape(5, 8))
    surgery.resize(model, query_len=3, optimizer=opt)
    surgery.resize(model, query_layer=3, optimizer=opt)
    for n, table in original.items():
        assert torch.equal(opt.state[weight][n], table)
    train(model, opt, steps=1)


def test_pool_and_interpolate_start_the_rewritten_rows_from_zero(toy_host):
    model = make(prompts=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt)
    pos = opt.state[model.pos]["momentum_buffer"].clone()
    surgery.resize(model, prompts=2, shrink="pool", optimizer=opt)
    assert torch.equal(opt.state[model.prompts]["momentum_buffer"], torch.zeros(2, 8))
    assert torch.equal(opt.state[model.pos]["momentum_buffer"],
                       torch.cat([torch.zeros(1, 2, 8), pos[:, 4:]], dim=1))
    train(model, opt, steps=1)
    pos = opt.state[model.pos]["momentum_buffer"].clone()
    surgery.resize(model, prompts=3, init="interpolate", optimizer=opt)
    assert torch.equal(opt.state[model.prompts]["momentum_buffer"], torch.zeros(3, 8))
    assert torch.equal(opt.state[model.pos]["momentum_buffer"], torch.cat([torch.zeros(1, 3, 8), pos[:, 2:]], dim=1))


def test_several_optimizers_each_follow_their_own_parameters(toy_host):
    model = make(prompts=2)
    first = torch.optim.Adam([model.prompts], lr=0.01)
    second = torch.optim.SGD([p for n, p in model.named_parameters() if n != "prompts"], lr=0.1, momentum=0.9)

    def step():
        for o in (first, second):
            o.zero_grad()
        model(x_in(model)).square().sum().backward()
        first.step()
        second.step()

    step()
    avg, momentum = first.state[model.prompts]["exp_avg"].clone(), second.state[model.pos]["momentum_buffer"].clone()
    surgery.resize(model, prompts=3, optimizer=[first, second])
    assert torch.equal(first.state[model.prompts]["exp_avg"], torch.cat([avg, torch.zeros(1, 8)]))
    assert torch.equal(second.state[model.pos]["momentum_buffer"],
                       torch.cat([momentum[:, :2], torch.zeros(1, 1, 8), momentum[:, 2:]], dim=1))
    step()


def test_tokens_puts_the_original_state_tensors_back(toy_host):
    model = make(prompts=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, opt)
    objects = {id(p): dict(opt.state[p]) for p in model.parameters()}
    values = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    with surgery.tokens(model, prompts=6, optimizer=opt):
        train(model, opt, steps=1)  # trains at the other count
        assert opt.state[model.prompts]["exp_avg"].shape == (6, 8)
    for p in model.parameters():
        assert all(v is objects[id(p)][k] for k, v in opt.state[p].items())
    for p in (model.prompts, model.pos):  # resized inside: their state outside the block is untouched
        assert all(torch.equal(v, values[id(p)][k]) for k, v in opt.state[p].items() if k != "step")
    assert not getattr(opt, surgery.optim.STASH_ATTR, None)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_failed_resize_leaves_the_optimizer_as_it_was(toy_host, fail_at):
    model = make(prompts=2, memory=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, opt)
    objects = {id(p): dict(opt.state[p]) for p in model.parameters()}
    groups = [list(g["params"]) for g in opt.param_groups]
    real, calls = Edit.set_tensor, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected")
        return real(self, *args, **kwargs)

    with mock.patch.object(Edit, "set_tensor", flaky):
        with pytest.raises(ResizeError, match="injected"):
            surgery.resize(model, prompts=1, memory=0, optimizer=opt)
    for p in model.parameters():
        assert opt.state[p] == objects[id(p)]  # the same tensor objects
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert not getattr(opt, surgery.optim.STASH_ATTR, None)


@pytest.mark.parametrize("bad", ["adam", 3, [object()]])
def test_optimizer_argument_must_be_optimizers(toy_host, bad):
    model = make()
    with pytest.raises(OptimizerError, match="torch.optim.Optimizer"):
        surgery.resize(model, prompts=3, optimizer=bad)
    assert model.prompts.shape == (2, 8)


# -- parameters absent at a count of zero (timm's reg_token, cls_token) -------------------------------


def vit(**kw):
    torch.manual_seed(0)
    return surgery.build("vit_tiny_avg_test", **kw)


def vit_loss(model, i=0):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))
    return model(images)


def test_a_frozen_token_stays_frozen_and_itself_through_a_count_of_zero():
    model = vit(reg_tokens=4)
    reg = model.reg_token
    reg.requires_grad_(False)
    values = reg.detach().clone()
    surgery.resize(model, reg_tokens=0)
    assert model.reg_token is None and "reg_token" not in dict(model.named_parameters())
    surgery.resize(model, reg_tokens=4)
    assert model.reg_token is reg and not reg.requires_grad and torch.equal(reg, values)
    cls = model.cls_token
    surgery.resize(model, class_token=0)
    surgery.resize(model, class_token=1)
    assert model.cls_token is cls


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_token_parameter_leaving_at_zero_stays_in_the_optimizer_and_comes_back_with_its_state(kind):
    build, names = OPTIMIZERS[kind]
    model = vit(reg_tokens=3)
    reg = model.reg_token
    opt = build(model.parameters())
    train(model, opt, forward=vit_loss)
    state = row_state(opt, reg, names)
    surgery.resize(model, reg_tokens=0, optimizer=opt)
    assert model.reg_token is None and reg.shape == (1, 0, 32)
    assert any(p is reg for g in opt.param_groups for p in g["params"])
    assert all(opt.state[reg][n].shape == (1, 0, 32) for n in names)
    train(model, opt, steps=1, forward=vit_loss)  # steps without it
    surgery.resize(model, reg_tokens=3, optimizer=opt)
    assert model.reg_token is reg
    for name in names:
        assert torch.equal(opt.state[reg][name], state[name])
    before = check_step_matches_reference(model, opt, kind, reg, state, forward=vit_loss)
    assert not torch.equal(reg, before)


def test_a_token_parameter_new_to_the_model_joins_its_sites_param_group():
    model = vit()  # no registers: reg_token is None
    decay = [p for n, p in model.named_parameters() if n not in ("cls_token", "pos_embed")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 0.1},
                           {"params": [model.cls_token, model.pos_embed], "weight_decay": 0.0}], lr=0.1)
    surgery.resize(model, reg_tokens=2, init="normal", optimizer=opt)
    reg = model.reg_token
    assert any(p is reg for p in opt.param_groups[1]["params"])  # beside pos_embed, its site's other tensor
    before = reg.detach().clone()
    train(model, opt, steps=1, forward=vit_loss)
    assert not torch.equal(reg, before)
    plain = torch.optim.SGD(vit().parameters(), lr=0.1)
    other = vit()
    surgery.resize(other, reg_tokens=2)  # without optimizer=, nothing joins
    assert not any(p is other.reg_token for g in plain.param_groups for p in g["params"])
