"""ImageBind-LLM's command module (entry point `surgery.commands`, named `imagebind_llm` as its
backbone plugin): it declares the model family `surgery generate` runs for this plugin's models,
and registers `surgery demo study`, the study's story (story.py), as a kind of the core's `demo`.

`surgery generate` itself is registered by the LLaMA-Adapter V2 plugin, whose generation loop,
tokenizer and prompt template ImageBind-LLM shares; a family tells it what this plugin's models
take (`--image`, `--audio`, `--points`, mixed with weights), how the official files load
(`--imagebind FILE` selects this family) and where the functions that do it are (`generate.py`).
Imported by every `surgery` call: standard library and light modules only.
"""

from __future__ import annotations

import surgery
from surgery_plugins.llama_adapter.generation import Family

HEAD_MODES = ("first", "mean", "all")


def add_family_arguments(group) -> None:
    group.add_argument("--imagebind", metavar="FILE", help="official files: the ImageBind encoder's weights "
                       "(imagebind_w3D.pth: ImageBind with point clouds)")
    group.add_argument("--imagebind-config", default="huge_w3d", metavar="NAME",
                       help="the encoder's configuration in the imagebind plugin (default huge_w3d, the released one)")
    group.add_argument("--head-mode", choices=HEAD_MODES, help="how the encoder's heads read CLS tokens: 'all' "
                       "gives one visual token per CLS token (with --set num_cls_tokens.vision=k: k visual tokens)")


GENERATION_FAMILY = Family(name="ImageBind-LLM", backbone="imagebind_llm", modalities=("image", "audio", "points"),
                           mixes=True, encoder_option="--imagebind", functions=__package__ + ".generate",
                           add_arguments=add_family_arguments)


# -- `surgery demo study`: the study's story (story.py, imported only when it runs) -----------------

STORY_SIZES = ("tiny", "bench")  # story.SIZES: the models each size uses
STORY_DESCRIPTION = """\
The study's story, on models with random weights (seeded), in seconds on a CPU: LLaMA-Adapter V2
generates from a picture and a prompt while query_len goes 10 -> 1 -> 64 (prefill ms and decode
tokens/s each time); ImageBind's vision CLS tokens go 1 -> 4 with the head in mode 'all' (the
tensors that change, the drift of the original token); ImageBind-LLM reads them as 4 visual tokens
in every adapted layer and generates; then that change's guarantees: undo bit-exact, save and load
into a fresh model, the recipe. A failed check prints MISMATCH and exits 1. `surgery demo` typed
alone runs this story (the first one registered). The text is gibberish: the weights are untrained.
"""


def add_story_arguments(p) -> None:
    p.add_argument("--size", choices=STORY_SIZES, default=STORY_SIZES[0],
                   help="tiny (default, seconds) or bench (7B's shape ratios: timings closer to 7B's; slower)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens per generation (default 16)")
    p.add_argument("--out", metavar="DIR", help="keep the story's checkpoint in DIR (default: a temporary folder)")


def run_story(args) -> int:
    from .story import run

    return run(args)


@surgery.hookimpl
def surgery_register_commands(register):
    register("study", run_story, group="demo", description=STORY_DESCRIPTION, add_arguments=add_story_arguments,
             help="the study's story: query_len swapped while LLaMA-Adapter V2 generates, ImageBind's 4 CLS tokens "
                  "as ImageBind-LLM's 4 visual tokens, the guarantees")
