"""The conformance kit on every tiny model the transformers plugin registers.

Each resized model is compared (among the kit's other checks) with the model transformers builds
at those counts holding the same weights, attributes (the configs field by field) and outputs.
The counts tried are few (the kit's minimum, a shrink and a growth): each model is built dozens
of times. ViT and DeiT have no count transformers can change; their sites are declared and every
change is refused, so the kit's checks that need a change cannot run on them (see
test_hf_vit.py for the refusals and the checks that do apply).
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from surgery.testing import ConformanceSuite  # noqa: E402

TestDinov2Registers = ConformanceSuite.for_model("hf_dinov2_reg_tiny", counts={"num_register_tokens": [0, 1, 4]})
TestBlip2Queries = ConformanceSuite.for_model("hf_blip2_tiny", counts={"num_query_tokens": [1, 3, 6]})
TestInstructBlipQueries = ConformanceSuite.for_model("hf_instructblip_tiny", counts={"num_query_tokens": [2, 6]})
TestDetrQueries = ConformanceSuite.for_model("hf_detr_tiny", counts={"num_queries": [1, 3, 7]})
TestPeftPromptTuning = ConformanceSuite.for_model("hf_peft_prompt_tiny", counts={"num_virtual_tokens": [1, 3, 6]})
TestPeftPrefixTuning = ConformanceSuite.for_model("hf_peft_prefix_tiny", counts={"num_virtual_tokens": [1, 3, 6]})
