"""Surgery on a model in use: threads, nested and out-of-order `tokens(...)` blocks, changes made
inside a block by others, and interrupts during a rollback. The model must always end consistent,
checked against its snapshot from before and against the toy's layout written out here."""

import os
import signal
import threading
import time

import pytest
import torch

import surgery
from surgery.edit import Edit
from surgery.errors import NestingError
from surgery.guard import guard_of
from toy_backbone import ToyModel, assert_same, snapshot


def make(**kw):
    torch.manual_seed(0)
    return ToyModel(**kw)


def x_in(model):
    return torch.randn(2, 5, model.dim, generator=torch.Generator().manual_seed(1))


def consistent(model):
    """Every dependent agrees with the tensors (the toy's layout, stated independently)."""
    p = model.prompts.shape[0]
    assert model.num_prompts == model.config["num_prompts"] == p and model.pos.shape[1] == p + 5
    assert model.adapter.weight.shape[0] == model.adapter.num_embeddings == model.query_len * model.query_layer
    assert model(x_in(model)).shape == (2, 8)


# -- threads ---------------------------------------------------------------------------------------


def test_tokens_blocks_from_two_threads_are_serialised(toy_host):
    model = make(prompts=2)
    before, y0 = snapshot(model), model(x_in(model))
    seen, errors = {}, []
    inside = threading.Event()

    def worker(count, wait):
        try:
            with surgery.tokens(model, prompts=count):
                inside.set()
                time.sleep(wait)  # gives the other thread every chance to change the model meanwhile
                seen[count] = (surgery.counts(model)["prompts"], model.prompts.shape[0], model.pos.shape[1])
                consistent(model)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # the first block is still open when the second one would open, and would be left first
    first = threading.Thread(target=worker, args=(5, 0.2))
    first.start()
    inside.wait(10)
    second = threading.Thread(target=worker, args=(0, 0.4))
    second.start()
    first.join(30)
    second.join(30)
    assert not errors
    assert seen == {5: (5, 5, 10), 0: (0, 0, 5)}  # each block saw only its own count
    assert_same(before, snapshot(model))
    assert torch.equal(model(x_in(model)), y0)


def test_resize_from_another_thread_waits_for_an_open_block(toy_host):
    model = make(prompts=2)
    order = []
    inside, done = threading.Event(), threading.Event()

    def resizer():
        inside.wait(10)
        surgery.resize(model, prompts=3)
        order.append("resized")
        done.set()

    thread = threading.Thread(target=resizer)
    thread.start()
    with surgery.tokens(model, prompts=6):
        inside.set()
        done.wait(0.3)  # the resize cannot run while the block is open
        order.append("block left")
        assert model.prompts.shape[0] == 6
    thread.join(30)
    assert order == ["block left", "resized"]
    assert surgery.counts(model)["prompts"] == 3
    consistent(model)


# -- nesting ---------------------------------------------------------------------------------------


def test_nested_blocks_left_in_order_restore_each_level(toy_host):
    model = make(prompts=2, query_len=3)
    before = snapshot(model)
    with surgery.tokens(model, prompts=4):
        middle = snapshot(model)
        with surgery.tokens(model, prompts=1, query_len=5):
            consistent(model)
        assert_same(middle, snapshot(model))
    assert_same(before, snapshot(model))


def test_blocks_left_out_of_order_are_detected_and_the_model_is_put_back(toy_host):
    model = make(prompts=2, query_len=3)
    before = snapshot(model)
    outer = surgery.tokens(model, prompts=4)
    inner = surgery.tokens(model, prompts=1, query_len=5)
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(NestingError, match="were still open; they were undone with it"):
        outer.__exit__(None, None, None)
    assert_same(before, snapshot(model))
    consistent(model)
    with pytest.raises(NestingError, match="already put the model back"):
        inner.__exit__(None, None, None)
    assert_same(before, snapshot(model))
    surgery.resize(model, prompts=3)  # the model is usable (and its lock free) afterwards
    consistent(model)


def test_a_resize_inside_a_block_is_undone_with_it(toy_host):
    """The block puts back rows and counters: a count changed inside it must go back too, or the
    model would mix both (timm: a class token removed inside, num_prefix_tokens put back)."""
    model = make(prompts=2, query_len=3)
    before = snapshot(model)
    with surgery.tokens(model, prompts=4):
        surgery.resize(model, prompts=6, query_len=2)
        consistent(model)
    assert_same(before, snapshot(model))
    consistent(model)
    assert surgery.recipe(model).steps == ()


def test_a_checkpoint_loaded_inside_a_block_is_undone_with_it(tmp_path):
    """The load moves a site the block did not (the class token): leaving the block must not mix
    the block's rows and counters with the load's."""
    torch.manual_seed(0)
    vit = surgery.build("vit_tiny_avg_test")
    other = surgery.build("vit_tiny_avg_test")
    surgery.resize(other, class_token=0, reg_tokens=3)
    surgery.save(other, tmp_path / "other.safetensors")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    y0 = vit(images)
    with surgery.tokens(vit, reg_tokens=1):
        surgery.load(tmp_path / "other.safetensors", vit)
        assert surgery.counts(vit) == {"class_token": 0, "reg_tokens": 3}
    assert surgery.counts(vit) == {"class_token": 1, "reg_tokens": 0} and vit.num_prefix_tokens == 1
    assert list(vit.state_dict()) == list(state)
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(vit(images), y0)


# -- what the user changed inside a block stays ------------------------------------------------------


def test_leaving_tokens_keeps_a_head_replaced_inside_the_block():
    torch.manual_seed(0)
    vit = surgery.build("vit_tiny_test")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reg = vit.reg_token
    with surgery.tokens(vit, reg_tokens=2):
        vit.reset_classifier(5)
        head = vit.head
    assert vit.num_classes == 5 and vit.head is head and vit.head.out_features == 5
    assert vit.reg_token is reg and surgery.counts(vit) == {"class_token": 1, "reg_tokens": 0}
    assert vit(images).shape == (2, 5)
    assert list(vit.state_dict())[-2:] == ["head.weight", "head.bias"]


def test_leaving_tokens_keeps_other_attributes_modules_and_parameters_set_inside(toy_host):
    model = make(prompts=2)
    before = snapshot(model)
    with surgery.tokens(model, prompts=5):
        model.extra = torch.nn.Linear(2, 2)
        model.scale = torch.nn.Parameter(torch.ones(1))
        model.note = "kept"
    assert isinstance(model.extra, torch.nn.Linear) and model.note == "kept"
    assert "scale" in dict(model.named_parameters())
    keys = [k for k in snapshot(model)["keys"] if not k.startswith("extra") and k != "scale"]
    assert keys == before["keys"]  # the surgery's own tensors back in their places
    consistent(model)


# -- interrupts during a rollback --------------------------------------------------------------------


def test_an_interrupt_inside_an_undo_step_does_not_leave_the_model_half_restored(toy_host, monkeypatch):
    """A KeyboardInterrupt raised in the middle of putting back one slot (taken out of its table,
    not yet back): the step runs again, the rest of the rollback runs, then the interrupt is raised."""
    from surgery import edit as edit_module

    model = make(prompts=2, memory=2)
    before = snapshot(model)
    real, calls = edit_module._restore_slot, {"n": 0}

    def interrupted(module, name, saved):
        calls["n"] += 1
        if calls["n"] == 1:
            for table in ("_parameters", "_buffers", "_modules"):  # half done
                module.__dict__[table].pop(name, None)
            raise KeyboardInterrupt
        real(module, name, saved)

    monkeypatch.setattr(edit_module, "_restore_slot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with surgery.tokens(model, prompts=5, memory=0, query_len=1):
            pass
    assert calls["n"] >= 2
    assert_same(before, snapshot(model))
    consistent(model)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGINT"),
                    reason="signals reach the main thread only")
def test_a_second_ctrl_c_during_a_rollback_is_held_until_it_is_done(toy_host):
    """The first Ctrl-C interrupts a resize, the second arrives while it is being rolled back: the
    rollback completes, then the KeyboardInterrupt is raised."""
    model = make(prompts=2, memory=2)
    before = snapshot(model)
    real_set_tensor, steps = Edit.set_tensor, {"n": 0}

    def first_interrupt(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 3:  # partway through the resize
            self.on_undo(lambda: os.kill(os.getpid(), signal.SIGINT))  # the second one, during the rollback
            raise KeyboardInterrupt
        return real_set_tensor(self, *args, **kwargs)

    Edit.set_tensor = first_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            surgery.resize(model, prompts=5, query_len=1, memory=0)
    finally:
        Edit.set_tensor = real_set_tensor
    assert_same(before, snapshot(model))
    consistent(model)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_while_leaving_a_block_is_raised_after_the_model_is_restored(toy_host):
    model = make(prompts=2, query_len=3)
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        with surgery.tokens(model, prompts=6, query_len=5):
            # the first undo step to run (the newest change) sends a Ctrl-C; every other one still runs
            guard_of(model).open[-1].edit.on_undo(lambda: os.kill(os.getpid(), signal.SIGINT))
    assert_same(before, snapshot(model))
    consistent(model)
