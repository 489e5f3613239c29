"""The one transaction behind resize, tokens(...), set_options, recipe replay and load (surgery/transaction.py):
how often the plugins are asked for the sites, the events around a change that fails, a direct use."""

from __future__ import annotations

import pytest
import torch

import surgery
import toy_backbone
from surgery.errors import CountError, ResizeError, StrategyError
from surgery.transaction import Transaction
from toy_backbone import ToyModel, assert_same, snapshot


def make(**kw):
    torch.manual_seed(0)
    return ToyModel(**kw)


@pytest.fixture
def asked(monkeypatch):
    """How many times the plugins were asked for the toy model's sites."""
    count = {"n": 0}
    declare = toy_backbone.toy_sites

    def counting(model):
        count["n"] += 1
        return declare(model)

    monkeypatch.setattr(toy_backbone, "toy_sites", counting)
    return count


def test_a_single_site_resize_asks_for_the_sites_twice(toy_host, asked):
    model = make(prompts=2)
    surgery.resize(model, prompts=5)  # once to check the request, once to check the change arrived
    assert asked["n"] == 2
    asked["n"] = 0
    surgery.resize(model, prompts=3, memory=2)  # each later site uses the reading that checked the one before
    assert asked["n"] == 3
    asked["n"] = 0
    surgery.resize(model, prompts=3)  # nothing to change: the one reading that checks the request
    assert asked["n"] == 1


def test_a_failure_after_a_change_is_rolled_back_between_events_of_its_own(toy_host):
    model = make(prompts=0, memory=2)
    before = snapshot(model)
    # growths go in reverse declaration order: memory grows, then prompts has no token for `mean`
    with pytest.raises(StrategyError, match="site 'prompts'"):
        surgery.resize(model, prompts=2, memory=4, init={"prompts": "mean"})
    assert toy_host.events == [("before", "toy", {"prompts": (0, 2), "memory": (2, 4)}),
                               ("before", "toy", {"memory": (4, 2)}), ("after", "toy", {"memory": (4, 2)})]
    assert_same(before, snapshot(model))
    assert surgery.recipe(model).steps == ()


def test_a_refused_request_changes_nothing_and_announces_nothing(toy_host):
    model = make()
    with pytest.raises(CountError, match="site 'memory'"):
        surgery.resize(model, prompts=4, memory=3)  # memory goes in steps of 2: refused before any change
    assert toy_host.events == []


def test_one_transaction_commits_changes_of_counts_together(toy_host):
    model = make(prompts=2, query_len=3)
    with Transaction(model, "toy") as txn:
        txn.resize({"prompts": 4})
        txn.resize({"query_len": 5}, init="zeros")
        assert txn.net() == {"prompts": (2, 4), "query_len": (3, 5)}
    assert toy_host.events == [("before", "toy", {"prompts": (2, 4)}), ("before", "toy", {"query_len": (3, 5)}),
                               ("after", "toy", {"prompts": (2, 4), "query_len": (3, 5)})]
    assert [s["site"] for s in surgery.recipe(model).steps] == ["prompts", "query_len"]
    assert model.adapter.weight.shape == (2 * 5, 8)


def test_an_exception_in_the_block_undoes_the_whole_transaction(toy_host):
    model = make(prompts=2, query_len=3)
    before = snapshot(model)
    with pytest.raises(ResizeError, match="KeyError: .*the caller's own failure.*left as it was") as err:
        with Transaction(model, "toy") as txn:
            txn.resize({"prompts": 4})
            raise KeyError("the caller's own failure")
    assert isinstance(err.value.__cause__, KeyError)
    assert_same(before, snapshot(model))
    assert surgery.recipe(model).steps == ()


def test_a_plugin_failing_again_while_the_rollback_is_announced_keeps_the_first_error(toy_host):
    class Broken:
        calls = 0

        @surgery.hookimpl
        def surgery_after_resize(self, model, backbone, changes):
            Broken.calls += 1
            raise ValueError(f"cache rebuild failed ({Broken.calls})")

    assert surgery.get_host().add_plugin(Broken(), "broken_events")
    model = make(prompts=2)
    before = snapshot(model)
    with pytest.raises(ResizeError, match=r"failed in surgery_after_resize .*\(1\)") as err:
        surgery.resize(model, prompts=5)
    assert Broken.calls == 2 and any("(2)" in note for note in err.value.__notes__)
    assert_same(before, snapshot(model))
