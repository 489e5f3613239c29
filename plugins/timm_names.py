"""timm model names, and where a timm model's released weights are on this machine.

    arch = timm_arch("timm/deit3_small_patch16_224")   # "deit3_small_patch16_224"; None for a name timm lacks
    path = hub_weights(arch)                            # a file in the Hugging Face cache, or a CheckpointError

A name may come from a checkpoint's metadata, so it is only looked up in timm's own registry, never
as `hf-hub:` or `local-dir:` (with which `timm.create_model` would download or open what the name
chooses). Weights come only from the Hugging Face cache as it already is: nothing is downloaded, so
an offline machine gets an error naming the repository, the files and the folder at once.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from surgery.errors import BackboneError, CheckpointError

PREFIX = "timm/"
# ARCH or ARCH.TAG in word characters: every name timm registers; excludes timm's hf-hub: / local-dir:
NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
# What timm's hub repositories hold when the pretrained_cfg names no file: safetensors first, as timm reads them
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def timm_arch(name: str) -> str | None:
    """The timm model name (`arch` or `arch.tag`) that `name` means, or None when it is not a timm name.

    `timm/<name>` claims the name: one timm does not know is a `BackboneError` (with timm's closest
    names), as is an unknown pretrained tag. A plain name timm does not know is None (another plugin
    may know it)."""
    explicit = name.startswith(PREFIX)
    arch = name[len(PREFIX):] if explicit else name
    if not NAME.fullmatch(arch):
        if explicit:
            raise BackboneError(f"{name!r} is not a timm model name: after {PREFIX} give a timm model name, "
                                f"optionally with a pretrained tag (timm/vit_small_patch16_224.augreg_in21k)")
        return None
    import timm
    import timm.models

    if not timm.is_model(arch):
        if not explicit:
            return None
        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=3)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise BackboneError(f"timm {timm.__version__} has no model named {arch!r}{hint} "
                            f"(timm.list_models() lists them)")
    try:
        timm.models.get_pretrained_cfg(arch)  # an unknown tag raises; a known one selects its config
    except RuntimeError:
        base, _, tag = arch.partition(".")
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
        raise BackboneError(f"timm model {base!r} has no pretrained tag {tag!r}; its tags: "
                            f"{', '.join(tags) or 'none'}") from None
    return arch


def hub_weights(arch: str) -> Path:
    """The released weights of timm model `arch` in the local Hugging Face cache, never downloaded.

    A `CheckpointError` naming the repository, the files looked for and the cache folder when they
    are not there (or when timm names no hub repository for the model)."""
    import timm.models
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        raise CheckpointError(f"timm model {arch!r} has no release on the Hugging Face hub (its pretrained_cfg "
                              f"names no hf_hub_id); pass its weights as a checkpoint file")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
    cache = constants.HF_HUB_CACHE  # HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub
    for filename in files:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
        if isinstance(found, str):  # a path; None or the "known missing" marker otherwise
            return Path(found)
    raise CheckpointError(f"the weights of timm model {arch!r} are not in the Hugging Face cache: looked for "
                          f"{' or '.join(files)} of repository {repo} (revision {revision or 'main'}) in "
                          f"{cache}; nothing is downloaded: fetch them where there is a network "
                          f"(`hf download {repo}`), or pass a checkpoint file")
