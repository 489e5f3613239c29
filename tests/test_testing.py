"""The conformance kit (`surgery.testing`): every built-in plugin passes it, broken plugins fail it.

The broken plugins are variants of one small prompt model, each with one mistake a plugin
author makes (a forgotten coupled tensor, a forgotten or wrong counter, a change made outside
the journal, an error swallowed); each must fail the check that is about that mistake, with a
message that says what went wrong. One of them also runs through pytest itself (`pytester`), as
a plugin author's `ConformanceSuite` subclass would. A register model whose forward reads its
count from a config (as transformers' Dinov2WithRegisters does) shows the counter only a fresh
build at the target count gives away; a BLIP-2-style model shows inputs that depend on a count.
"""

import pytest
import timm  # noqa: F401 - here, not later: pytester drops the modules imported after it is set up,
import torch  # and the native extensions that come with timm (triton's) do not survive that
from torch import nn

import surgery
from surgery import testing
from surgery.site import Counter, TokenSite, TokenTensor
from surgery.testing import CHECKS, ConformanceSuite, check_conformance, plugin_host
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

    def make_model(self, **counts):
        return ToyModel(**{"prompts": 2, "query_len": 3, "query_layer": 2, "memory": 2, **counts})

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
    return testing.Subject(PromptNet, prompt_inputs, counts={"prompts": [0, 1, 3, 4]}, **options)


def test_correct_prompt_plugin_passes_every_check():
    with plugin_host(("prompt", PromptPlugin())):
        check_conformance(PromptNet, prompt_inputs)


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
            check_conformance(PromptNet, prompt_inputs)


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
        subject = testing.Subject(PromptNet, prompt_inputs, counts={"prompts": [9]})
        with pytest.raises(AssertionError, match=r"counts for site 'prompts' are not allowed: .*above the maximum 8"):
            subject.trials(subject.build())
        subject.counts = {"nope": [1]}
        with pytest.raises(AssertionError, match=r"sites the model does not have: \['nope'\]"):
            subject.trials(subject.build())


# -- a fresh build at the target count: the counter the outputs do not give away -------------------


class RegisterConfig:
    """A plain config object, as transformers models keep one (`model.config`)."""

    def __init__(self, num_register_tokens=2, hidden_size=8, patch_dim=6, num_labels=3):
        self.num_register_tokens, self.hidden_size = num_register_tokens, hidden_size
        self.patch_dim, self.num_labels = patch_dim, num_labels


class RegisterNet(nn.Module):
    """[cls, registers, patches] through one attention mix; like Dinov2WithRegisters' classifier,
    the head reads the class token and the mean of the patch tokens, found after
    `1 + config.num_register_tokens`: a stale config pools registers as patches."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.register_tokens = nn.Parameter(torch.randn(1, config.num_register_tokens, d))
        self.patch = nn.Linear(config.patch_dim, d)
        self.mix = nn.Linear(d, d)
        self.classifier = nn.Linear(2 * d, config.num_labels)

    def forward(self, patches):  # (B, N, patch_dim) -> (B, num_labels)
        b = patches.shape[0]
        h = torch.cat([self.cls_token.expand(b, -1, -1), self.register_tokens.expand(b, -1, -1),
                       self.patch(patches)], dim=1)
        h = h + torch.softmax(h @ h.transpose(1, 2), dim=-1) @ self.mix(h)
        patch_tokens = h[:, 1 + self.config.num_register_tokens:]
        return self.classifier(torch.cat([h[:, 0], patch_tokens.mean(1)], dim=-1))


def register_net(register_tokens=2):
    return RegisterNet(RegisterConfig(num_register_tokens=register_tokens))


def register_inputs(model):
    return (torch.randn(2, 5, model.config.patch_dim, generator=torch.Generator().manual_seed(0)),)


class RegisterPlugin:
    """Declares the register tokens; with `config_counter=False` it forgets `config.num_register_tokens`."""

    def __init__(self, config_counter=True):
        self.config_counter = config_counter

    @surgery.hookimpl
    def surgery_register_backbones(self, register):
        register("register_net", lambda m: isinstance(m, RegisterNet))

    @surgery.hookimpl
    def surgery_token_sites(self, model, backbone):
        if backbone != "register_net":
            return None
        counters = [Counter(model.config, "num_register_tokens")] if self.config_counter else []
        return [TokenSite("register_tokens", model.register_tokens.shape[1], counters=counters, min=0,
                          tensors=[TokenTensor(model, "register_tokens", axis=1)])]


def test_kit_fails_a_config_counter_that_only_a_fresh_build_gives_away():
    """Without the config counter the outputs still change with the count, the model round-trips
    and restores: every check but the fresh-build comparison passes (as the whole kit did before)."""
    subject = testing.Subject(register_net, register_inputs)
    with plugin_host(("registers", RegisterPlugin(config_counter=False))):
        for check in CHECKS:
            if check is not testing.check_matches_fresh_build:
                check(subject)
        with pytest.raises(AssertionError, match=r"^check_matches_fresh_build: inside tokens\(register_tokens=0\): the "
                           r"resized model is not the fresh build .*\n.*attribute <model>.config.num_register_tokens "
                           r"still holds 2, as before the resize; a fresh build at these counts holds 0"):
            check_conformance(register_net, register_inputs)


def test_declared_config_counter_passes_the_kit():
    with plugin_host(("registers", RegisterPlugin())):
        check_conformance(register_net, register_inputs)


def test_fresh_build_names_a_stale_attribute_and_the_outputs():
    """The toy-example mistake (the counter the head slices with, left out): outputs change, so only
    the fresh build tells; its message names the attribute and the outputs."""
    with plugin_host(("prompt", PromptPlugin("missing counter"))):
        with pytest.raises(AssertionError, match=r"inside tokens\(prompts=0\): .*\n  attribute <model>.num_prompts "
                           r"still holds 2, as before the resize; a fresh build at these counts holds 0"):
            testing.check_matches_fresh_build(prompt_subject())


def test_fresh_build_compares_state_dict_keys_and_shapes():
    with plugin_host(("prompt", PromptPlugin("missing coupled tensor"))):
        with pytest.raises(AssertionError, match=r"inside tokens\(prompts=0\): its state_dict does not fit a fresh "
                           r"build at these counts:\n  tensor prompt_pos: \(2, 8\) in the resized model, \(0, 8\)"):
            testing.check_matches_fresh_build(prompt_subject())


def test_factory_keywords_for_the_counts():
    """Counts go to the factory by site name; `count_kwargs` spells them otherwise; a factory that
    cannot take them, or builds other counts, is told how."""
    def prompt_net(num=2):
        return PromptNet(prompts=num)

    with plugin_host(("prompt", PromptPlugin())):
        with pytest.raises(AssertionError, match=r"the factory cannot build the model at \{'prompts': 0\}: called with "
                           r"\{'prompts': 0\} it raised TypeError: .*'prompts'.*; .*or give count_kwargs"):
            testing.check_matches_fresh_build(testing.Subject(prompt_net, prompt_inputs))
        testing.check_matches_fresh_build(testing.Subject(prompt_net, prompt_inputs,
                                                          count_kwargs=lambda counts: {"num": counts["prompts"]}))
        with pytest.raises(AssertionError, match=r"called with \{'prompts': 0\}, built a model with counts "
                           r"\{'prompts': 2\}, not \{'prompts': 0\}"):
            testing.check_matches_fresh_build(testing.Subject(lambda **ignored: PromptNet(), prompt_inputs))
    subject = testing.Subject(PromptNet, prompt_inputs)
    assert subject.factory_kwargs({"num_cls_tokens.vision": 2, "num_cls_tokens.audio": 0, "prompts": 1}) == \
        {"num_cls_tokens": {"vision": 2, "audio": 0}, "prompts": 1}


def test_suite_count_kwargs_is_a_plain_function():
    class Suite(ConformanceSuite):
        plugins = [("prompt", PromptPlugin())]
        count_kwargs = staticmethod(lambda counts: {"num": counts["prompts"]})

        def make_model(self, num=2):
            return PromptNet(prompts=num)

        def make_inputs(self, model):
            return prompt_inputs(model)

    class Inherited(Suite):
        pass

    bare = ConformanceSuite.for_model("vit_tiny_test", count_kwargs=lambda counts: dict(counts))()
    assert bare.subject().count_kwargs({"a": 1}) == {"a": 1}
    with plugin_host(("prompt", PromptPlugin())):
        Inherited().test_matches_fresh_build()


def test_snapshots_read_into_config_objects():
    """A count kept in a config object is an attribute like any other (here: changed outside the
    journal, so `tokens(...)` cannot put it back)."""
    class ConfigOutsideJournal(RegisterPlugin):
        @surgery.hookimpl
        def surgery_apply_count(self, model, backbone, change):
            change.apply_default()
            model.config.num_register_tokens = change.new  # not through change.edit: never undone
            return True

    with plugin_host(("registers", ConfigOutsideJournal(config_counter=False))):
        with pytest.raises(AssertionError, match=r"after tokens\(register_tokens=0\): .*\n.*attribute "
                           r"<model>.config.num_register_tokens: 2 became 0"):
            testing.check_tokens_restores(testing.Subject(register_net, register_inputs))


# -- inputs that depend on a count (BLIP-2's image tokens) -----------------------------------------

IMAGE_TOKEN = 1  # the placeholder id a processor repeats once per query token


class QueryPromptNet(nn.Module):
    """BLIP-2-style: `query_tokens` (1, Q, D) read the image; the prompt's `input_ids` hold one
    IMAGE_TOKEN per query token (as transformers' Blip2Processor writes `num_query_tokens` of
    them), replaced by the queries' outputs. A prompt written for another Q is an error."""

    def __init__(self, query_tokens=3, dim=8, vocab=16, num_classes=3):
        super().__init__()
        self.config = RegisterConfig(hidden_size=dim)  # a plain config: only num_query_tokens is read
        self.config.num_query_tokens = query_tokens
        self.query_tokens = nn.Parameter(torch.randn(1, query_tokens, dim))
        self.vision = nn.Linear(dim, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, image, input_ids):  # image (B, D), input_ids (B, T) -> (B, num_classes)
        queries = torch.tanh(self.query_tokens + self.vision(image)[:, None])  # (B, Q, D)
        placeholders = input_ids == IMAGE_TOKEN
        if (placeholders.sum(1) != self.config.num_query_tokens).any():
            raise ValueError(f"the prompt has {placeholders.sum(1).tolist()} image tokens, the model "
                             f"{self.config.num_query_tokens} query tokens")
        h = self.embed(input_ids).masked_scatter(placeholders[..., None], queries)
        return self.head(h.mean(1))


class QueryPlugin:
    @surgery.hookimpl
    def surgery_register_backbones(self, register):
        register("query_prompt", lambda m: isinstance(m, QueryPromptNet))

    @surgery.hookimpl
    def surgery_token_sites(self, model, backbone):
        if backbone != "query_prompt":
            return None
        return [TokenSite("query_tokens", model.query_tokens.shape[1], min=1,
                          tensors=[TokenTensor(model, "query_tokens", axis=1)],
                          counters=[Counter(model.config, "num_query_tokens")])]


def text_ids(batch=2, length=5):
    return torch.randint(2, 16, (batch, length), generator=torch.Generator().manual_seed(3))


def image_features(model):
    return torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(4))


def test_inputs_written_for_one_count_fail_with_the_pattern():
    """The kit makes the inputs once: a prompt holding the original count of image tokens cannot
    feed the model at another count, and the failure says where such inputs belong."""
    def prompt_for_the_built_model(model):
        image_tokens = torch.full((2, model.config.num_query_tokens), IMAGE_TOKEN)
        return image_features(model), torch.cat([image_tokens, text_ids()], dim=1)

    with plugin_host(("query", QueryPlugin())):
        with pytest.raises(AssertionError, match=r"forward failed inside tokens\(query_tokens=1\): ValueError: "
                           r"the prompt has \[3, 3\] image tokens, the model 1 query tokens\n"
                           r"\(the kit makes the inputs once.*"
                           r"reuses them at every count.*belongs in forward\(model, \*inputs\)"):
            check_conformance(QueryPromptNet, prompt_for_the_built_model)


class TestCountDependentInputs(ConformanceSuite):
    """The pattern: `make_inputs` gives what does not depend on a count (the image, the text), and
    `forward` writes the prompt for the count the model has at the time of the call."""

    plugins = [("query", QueryPlugin())]
    counts = {"query_tokens": [1, 2, 5]}

    def make_model(self, query_tokens=3):
        return QueryPromptNet(query_tokens)

    def make_inputs(self, model):
        return image_features(model), text_ids()

    def forward(self, model, image, text):
        image_tokens = torch.full((text.shape[0], model.config.num_query_tokens), IMAGE_TOKEN)
        return model(image, torch.cat([image_tokens, text], dim=1))


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

    def make_model(self, prompts=2):
        return PromptNet(prompts)

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
