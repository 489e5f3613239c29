"""ImageBind-LLM's command module (entry point `surgery.commands`, named `imagebind_llm` as its
backbone plugin): it declares the model family `surgery generate` runs for this plugin's models.

`surgery generate` itself is registered by the LLaMA-Adapter V2 plugin, whose generation loop,
tokenizer and prompt template ImageBind-LLM shares; a family tells it what this plugin's models
take (`--image`, `--audio`, `--points`, mixed with weights), how the official files load
(`--imagebind FILE` selects this family) and where the functions that do it are (`generate.py`).
Imported by every `surgery` call: standard library and light modules only.
"""

from __future__ import annotations

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
