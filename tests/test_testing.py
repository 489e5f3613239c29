"""The conformance kit (`surgery.testing`): every built-in plugin passes it, broken plugins fail it.

The broken plugins are variants of one small prompt model, each with one mistake a plugin
author makes (a forgotten coupled tensor, a forgotten or wrong counter, a change made outside
the journal, an error swallowed); each must fail the check that is about that mistake, with a
message that says what went wrong. One of them also runs through pytest itself (`pytester`), as
a plugin author's `ConformanceSuite` subclass would.
"""

import pytest
import timm  # noqa: F401 - here, not later: pytester drops the modules imported after it is set up,
import torch  # and the native extensions that come with timm (triton's) do not survive that
from torch import nn

import surgery
from surgery import testing
from surgery.site import Counter, TokenSite, TokenTensor
from surgery.testing import ConformanceSuite, check_conformance, plugin_host
from toy_backbone import ToyModel, ToyPlugin

pytest_plugins = ["pytester"]

# -- every built-in plugin's tiny models pass (one test per check) --------------------------------

TestVitTinyConformance = ConformanceSuite.for_model("vit_tiny_test")
TestVitTinyRegConformance = ConformanceSuite.for_model("vit_tiny_reg_test")
TestVitTinyAvgConformance = ConformanceSuite.for_model("vit_tiny_avg_test")
TestEvaTinyConformance = ConformanceSuite.for_model("eva_tiny_test")


class TestToyBackboneConformance(ConformanceSuite):
    """The core tests' toy plugin (views, a structural site, a template, step 2), not installed:
    registered through `plugins`."""

    plugins = [("toy", ToyPlugin())]
    counts = {"prompts": [0, 3], "query_len": [1, 4], "query_layer": [1, 3], "memory": [0, 4]}

    def make_model(self):
        return ToyModel(prompts=2, query_len=3, query_layer=2, memory=2)

    def make_inputs(self, model):
        return (torch.randn(2, 5, model.dim, generator=torch.Generator().manual_seed(0)),)


def test_suite_base_class_is_not_collected_but_subclasses_are():
    assert ConformanceSuite.__test__ is False
    assert TestVitTinyConformance.__test__ is True and TestToyBackboneConformance.__test__ is True
    assert TestVitTinyConformance.model_name == "vit_tiny_test"


def test_for_model_overrides_attributes():
    suite = ConformanceSuite.for_model("vit_tiny_reg_test", counts={"reg_tokens": [5]}, seed=3)()
    subject = suite.subject()
    assert subject.seed == 3
    assert subject.trials(subject.build()) == {"class_token": [0], "reg_tokens": [5]}


# -- a small prompt model and plugin, with one mistake at a time ----------------------------------


class PromptNet(nn.Module):
    """Prompts (P, D) with their own positions (P, D), prepended to x (B, S, D); the forward reads
    `num_prompts` to split prompts from inputs."""

    def __init__(self, prompts=2, dim=8):
        super().__init__()
        self.num_prompts, self.dim = prompts, dim
        self.prompts = nn.Parameter(torch.randn(prompts, dim))
        self.prompt_pos = nn.Parameter(torch.randn(prompts, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        p = (self.prompts + self.prompt_pos)[: self.num_prompts]
        h = torch.tanh(self.proj(torch.cat([p.expand(x.shape[0], -1, -1), x], dim=1)))
        return h[:, self.num_prompts:].mean(1) + h[:, : self.num_prompts].sum(1)


class PromptPlugin:
    """Correct with `bug=None`; otherwise one mistake (see BUGS)."""

    def __init__(self, bug=None):
        self.bug = bug

    @surgery.hookimpl
    def surgery_register_backbones(self, register):
        register("prompt_net", lambda m: isinstance(m, PromptNet))

    @surgery.hookimpl
    def surgery_token_sites(self, model, backbone):
        if backbone != "prompt_net":
            return None
        tensors = [TokenTensor(model, "prompts", axis=0)]
        if self.bug != "missing coupled tensor":
            tensors.append(TokenTensor(model, "prompt_pos", axis=0, coupled=True))
        counters = {"missing counter": [], "wrong counter value": [Counter(model, "num_prompts", lambda n: n + 1)]}
        return [TokenSite("prompts", model.prompts.shape[0], tensors=tensors, min=0, max=8,
                          counters=counters.get(self.bug, [Counter(model, "num_prompts")]))]

    @surgery.hookimpl
    def surgery_apply_count(self, model, backbone, change):
        if self.bug == "counter set outside the journal":
            model.num_prompts = change.new  # not through change.edit: tokens(...) cannot undo it
            for t in change.site.tensors:
                change.resize_tensor(t)
            return True
        if self.bug == "error swallowed":
            try:
                change.apply_default()
            except Exception:  # noqa: BLE001 - the mistake under test
                pass
            return True
        return None


def prompt_inputs(model):
    return (torch.randn(2, 4, model.dim, generator=torch.Generator().manual_seed(0)),)


def prompt_subject(**options):
    return testing.Subject(lambda: PromptNet(), prompt_inputs, counts={"prompts": [0, 1, 3, 4]}, **options)


def test_correct_prompt_plugin_passes_every_check():
    with plugin_host(("prompt", PromptPlugin())):
        check_conformance(lambda: PromptNet(), prompt_inputs)


BUGS = [
    # (mistake, the check that must catch it, what its message must say)
    ("missing coupled tensor", testing.check_forward_at_every_count,
     r"forward failed inside tokens\(prompts=0\): RuntimeError"),
    ("missing coupled tensor", testing.check_grow_shrink_roundtrip, r"forward failed after resize\(prompts=3\)"),
    ("missing counter", testing.check_forward_at_every_count, r"bit-identical .* inside tokens\(prompts=3\)"),
    ("wrong counter value", testing.check_counters_follow, r"counter PromptNet.num_prompts .* reads 2, .* says 3"),
    ("counter set outside the journal", testing.check_tokens_restores,
     r"after tokens\(prompts=0\).*\n.*attribute <model>.num_prompts: 2 became 0"),
    ("counter set outside the journal", testing.check_atomic_on_injected_failure,
     r"Edit.set_tensor failing on call 1.*\n.*num_prompts: 2 became 4"),
]


@pytest.mark.parametrize("bug, check, message", BUGS, ids=[f"{b}-{c.__name__}" for b, c, _ in BUGS])
def test_kit_catches_a_broken_plugin(bug, check, message):
    with plugin_host(("prompt", PromptPlugin(bug))):
        with pytest.raises(AssertionError, match=message):
            check(prompt_subject())


def test_engine_refuses_a_plugin_that_swallowed_an_error(monkeypatch):
    """The engine checks every plugin's apply (surgery/verify.py): an error the plugin swallowed leaves
    the change unapplied, which is a ResizeError naming the plugin, rolled back (so the kit's check passes)."""
    from surgery.edit import Edit

    with plugin_host(("prompt", PromptPlugin("error swallowed"))):
        testing.check_atomic_on_injected_failure(prompt_subject())
        model = PromptNet()

        def out_of_memory(*args):
            raise MemoryError("injected")

        monkeypatch.setattr(Edit, "set_tensor", out_of_memory)
        with pytest.raises(surgery.errors.ResizeError, match="plugin 'prompt' applied site 'prompts' \\(2 -> 3\\)"):
            surgery.resize(model, prompts=3)
        assert model.prompts.shape == (2, 8) and model.num_prompts == 2


def test_check_conformance_names_the_failing_check():
    with plugin_host(("prompt", PromptPlugin("missing counter"))):
        with pytest.raises(AssertionError, match=r"^check_forward_at_every_count: outputs are bit-identical"):
            check_conformance(lambda: PromptNet(), prompt_inputs)


def test_output_change_can_be_waived():
    with plugin_host(("prompt", PromptPlugin("missing counter"))):
        testing.check_forward_at_every_count(prompt_subject(expect_output_change=False))


def test_nondeterministic_factory_is_reported():
    def factory():
        torch.manual_seed(torch.seed())  # a factory that reseeds from entropy
        return PromptNet()

    with plugin_host(("prompt", PromptPlugin())):
        with pytest.raises(AssertionError, match=r"torch.manual_seed\(0\) differ:\n.*tensor prompts: values differ"):
            testing.check_factory_deterministic(testing.Subject(factory, prompt_inputs))


def test_counts_outside_the_constraints_are_refused():
    with plugin_host(("prompt", PromptPlugin())):
        subject = testing.Subject(lambda: PromptNet(), prompt_inputs, counts={"prompts": [9]})
        with pytest.raises(AssertionError, match=r"counts for site 'prompts' are not allowed: .*above the maximum 8"):
            subject.trials(subject.build())
        subject.counts = {"nope": [1]}
        with pytest.raises(AssertionError, match=r"sites the model does not have: \['nope'\]"):
            subject.trials(subject.build())


def test_assert_same_model_compares_keys_values_and_counts():
    a, b = surgery.build("vit_tiny_reg_test"), surgery.build("vit_tiny_reg_test")
    b.load_state_dict(a.state_dict())
    testing.assert_same_model(a, b)
    surgery.resize(b, reg_tokens=3)
    with pytest.raises(AssertionError, match=r"counts \{'class_token': 1, 'reg_tokens': 2\} became .*'reg_tokens': 3"):
        testing.assert_same_model(a, b)
    surgery.resize(b, reg_tokens=2)
    with torch.no_grad():
        b.head.bias[0] += 1
    with pytest.raises(AssertionError, match=r"tensor head.bias: values differ \(max abs difference 1\)"):
        testing.assert_same_model(a, b)


def test_surgery_host_fixture_is_fresh_and_put_back(surgery_host):
    assert surgery.get_host() is surgery_host
    assert surgery_host.add_plugin(PromptPlugin(), "prompt")
    assert surgery.counts(PromptNet(prompts=3)) == {"prompts": 3}


def test_surgery_host_fixture_left_no_plugin_behind():
    assert "prompt" not in surgery.get_host().records


# -- the suite through pytest, as a plugin author runs it ------------------------------------------


SUITE_FILE = '''
import torch
from surgery.testing import ConformanceSuite
from prompt_support import PromptNet, PromptPlugin


class TestGoodPrompts(ConformanceSuite):
    plugins = [("prompt", PromptPlugin())]

    def make_model(self):
        return PromptNet()

    def make_inputs(self, model):
        return (torch.randn(2, 4, model.dim),)


class TestCounterOutsideJournal(TestGoodPrompts):
    plugins = [("prompt", PromptPlugin("counter set outside the journal"))]
'''


def test_suite_fails_a_broken_plugin_under_pytest(pytester):
    pytester.makepyfile(prompt_support=f"from {__name__} import PromptNet, PromptPlugin\n",
                        test_prompts=SUITE_FILE)
    result = pytester.runpytest("-q", "-rf", "-p", "no:cacheprovider", "test_prompts.py")
    outcomes = result.parseoutcomes()
    checks = len([name for name in dir(ConformanceSuite) if name.startswith("test_")])
    assert outcomes.get("passed") == 2 * checks - 3, result.stdout.str()
    assert outcomes.get("failed") == 3, result.stdout.str()
    result.stdout.fnmatch_lines([  # the good plugin passes all; the broken one fails where it undoes
        "FAILED test_prompts.py::TestCounterOutsideJournal::test_tokens_restores*",
        "FAILED test_prompts.py::TestCounterOutsideJournal::test_atomic_on_injected_failure*",
        "FAILED test_prompts.py::TestCounterOutsideJournal::test_atomic_on_failing_plugin*",
    ])
    result.stdout.fnmatch_lines(["E * AssertionError: after tokens(prompts=0): the model is not what it was:",
                                 "E * attribute <model>.num_prompts: 2 became 0"])
