"""The token-surgery plugin for `PromptTunedEncoder`: one backbone, one site, one tiny model.

token-surgery imports this module through the `surgery.backbones` entry point (pyproject.toml)
and calls the hooks below. The engine resizes the site from its declaration alone, so there is
no resize code here: `prompts` is the tensor that holds the tokens (along axis 0) and
`num_prompts` is the counter that must follow it.
"""

from __future__ import annotations

import torch

from surgery import hookimpl
from surgery.site import Counter, TokenSite, TokenTensor

from .model import PromptTunedEncoder

BACKBONE = "prompt_tuned"


@hookimpl
def surgery_register_backbones(register):
    register(BACKBONE, lambda model: isinstance(model, PromptTunedEncoder),
             description="PromptTunedEncoder: learned prompt tokens before the input sequence")


@hookimpl
def surgery_token_sites(model, backbone):
    if backbone != BACKBONE:
        return None  # another plugin's model
    return [
        TokenSite(
            name="prompts",
            count=model.prompts.shape[0],  # read from the model every time: descriptors are snapshots
            tensors=[TokenTensor(model, "prompts", axis=0)],
            counters=[Counter(model, "num_prompts")],
            min=0,
            max=model.pos_embed.shape[1],
            default_init="normal",  # works from zero prompts too: N(0, 1e-6)
            description="learned prompt tokens prepended to the input sequence",
        )
    ]


def example_inputs(model, batch=2, length=6):
    """A fixed batch of input embeddings (seeded: the conformance kit compares outputs bit for bit)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, length, model.dim, generator=generator),)


def tiny(prompts: int = 4, **kwargs) -> PromptTunedEncoder:
    """The registered model's factory. It takes the count by its site's name, `prompts`: the
    conformance kit builds the model at every count it tries, to compare a resized model with it."""
    return PromptTunedEncoder(num_prompts=prompts, **kwargs)


@hookimpl
def surgery_register_models(register):
    register("prompt_tuned_tiny", tiny, BACKBONE,
             description="tiny prompt-tuned encoder (4 prompts, dim 16), random weights",
             example_inputs=example_inputs)
