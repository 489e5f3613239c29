"""ViT and DeiT from transformers: their class and distillation tokens are declared (with their
position-embedding rows) and fixed, since transformers builds no other count; every change is
refused with the allowed range and the reason, the model untouched. The conformance kit's checks
that need no change run on them."""

import pytest

hf = pytest.importorskip("transformers")

import torch  # noqa: E402
from surgery_plugins.transformers_hf import vit  # noqa: E402

import surgery  # noqa: E402
from surgery.errors import CountError  # noqa: E402
from surgery.testing import (  # noqa: E402
    Subject,
    check_factory_deterministic,
    check_same_count_is_noop,
    check_something_to_check,
)


@pytest.mark.parametrize("name, sites", [("hf_vit_tiny", {"class_token": 0}),
                                         ("hf_deit_tiny", {"class_token": 0, "distillation_token": 1})])
def test_the_prefix_tokens_are_declared_with_their_position_rows(name, sites):
    model = surgery.build(name)
    declared = surgery.sites(model)
    assert {n: s.count for n, s in declared.items()} == {n: 1 for n in sites}
    emb = (model.deit if hasattr(model, "deit") else model.vit).embeddings
    for site, row in sites.items():
        own, rows = declared[site].tensors
        assert own.module is emb and not own.coupled
        assert rows.module is emb and rows.name == "position_embeddings" and rows.coupled and rows.start == row


@pytest.mark.parametrize("name, change, reason", [
    ("hf_vit_tiny", {"class_token": 0}, "ViT always has exactly one class token"),
    ("hf_vit_tiny", {"class_token": 2}, "ViT always has exactly one class token"),
    ("hf_deit_tiny", {"class_token": 0}, "DeiT always has exactly one class token"),
    ("hf_deit_tiny", {"distillation_token": 0}, "distillation head reads position 1"),
])
def test_every_change_is_refused_with_the_range_and_the_model_is_untouched(name, change, reason):
    model = surgery.build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CountError) as error:
        surgery.resize(model, **change)
    message = str(error.value)
    assert "at least 1, at most 1" in message and reason in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(CountError), surgery.tokens(model, **change):
        pass


def test_the_factories_refuse_other_counts():
    with pytest.raises(Exception, match="distillation_token=0: only 1 can be built"):
        vit.tiny_deit(distillation_token=0)


@pytest.mark.parametrize("name", ["hf_vit_tiny", "hf_deit_tiny"])
def test_the_kit_checks_that_need_no_change(name):
    spec = surgery.get_host().model_spec(name)
    subject = Subject(lambda **kw: surgery.build(name, **kw), spec.example_inputs, spec.forward)
    check_factory_deterministic(subject)
    check_same_count_is_noop(subject)
    with pytest.raises(AssertionError, match="no site"):  # and the kit says why the rest cannot run
        check_something_to_check(subject)
