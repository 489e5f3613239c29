"""The plugin's tests: token-surgery's conformance kit does the heavy lifting.

`surgery.testing` is a pytest plugin installed with token-surgery, so the kit is there in any
environment that has both packages; these tests run against the *installed* plugin (its entry
point), exactly as users get it.
"""

import torch

import surgery
from surgery.testing import ConformanceSuite, check_conformance
from surgery_toy_plugin import PromptTunedEncoder

# Every check, on the model the plugin registered (factory, example_inputs and forward come from
# the registration). Bind it to a Test* name so pytest collects it: one test per check.
TestPromptTunedTiny = ConformanceSuite.for_model("prompt_tuned_tiny")


class TestFromZeroPrompts(ConformanceSuite):
    """Any factory works too; `counts` says which counts to try per site. The kit also calls it
    with the count by site name, and compares each resized model with the one it builds."""

    counts = {"prompts": [1, 3, 8]}

    def make_model(self, prompts=0):
        return PromptTunedEncoder(num_prompts=prompts)

    def make_inputs(self, model):
        return (torch.randn(2, 5, model.dim, generator=torch.Generator().manual_seed(1)),)


def test_check_conformance_as_a_function():
    # the same checks in one call, for code that is not a test class
    check_conformance("prompt_tuned_tiny", counts={"prompts": [0, 2]})


def test_plugin_is_found_through_its_entry_point():
    record = surgery.get_host().records["prompt_tuned"]
    assert record.status == "loaded", record.error
    assert record.backbones == ["prompt_tuned"] and record.models == ["prompt_tuned_tiny"]
    model = surgery.build("prompt_tuned_tiny")
    assert surgery.counts(model) == {"prompts": 4}
    surgery.resize(model, prompts=6)
    assert model.num_prompts == 6 and model.prompts.shape == (6, 16)
