"""Tiny files in ImageBind-LLM's official layout, for the loader's tests.

    root/llama/7B/params.json, consolidated.00.pth, root/llama/tokenizer.model   (LLaMA-Adapter's fixtures)
    root/7B.pth              {'model': the keys convert_ckpt.py keeps}, written from the table below
    root/imagebind.pth       the tiny ImageBind encoder's plain state dict (imagebind_w3D.pth's layout)

The 7B.pth rows are upstream's names and 7B shapes (the bridge and prefix from
imagebind_LLM/llama/llama_adapter.py, the LLaMA rows from the LLaMA-Adapter V2 LORA-BIAS list,
which share llama.py; no new_gate), scaled down extent by extent: they are not taken from our model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import official_files as of

BRIDGE_7B = """\
image_bind_proj.weight (4096, 1024)
image_bind_proj.bias (4096,)
image_bind_norm_{K}.weight (4096,)
image_bind_f1_{K}.weight (16384, 4096)
image_bind_f2_{K}.weight (4096, 16384)
image_bind_f3_{K}.weight (16384, 4096)
prefix_query.weight (32, 4096)
"""
LEGACY_7B = """\
image_bind_norm_{K}.bias (4096,)
image_bind_f1_{K}.bias (16384,)
image_bind_f2_{K}.bias (4096,)
image_bind_f3_{K}.bias (16384,)
"""
SPEC = of.TinySpec(dim=64, n_layers=4, n_heads=4, multiple_of=32, lora_rank=4)
JOINT_WIDTH = 24  # the tiny ImageBind's out_embed_dim (1024 at huge)


def llama_rows(phase: str) -> list[tuple[str, tuple[int, ...]]]:
    """The LLaMA's rows of 7B.pth: biases, gates, norms (and LoRA in the finetune phase)."""
    rows = []
    for tag, pattern, shape in of.parse(of.ADAPTER_7B):
        if not pattern.startswith("llama.") or pattern.endswith("new_gate"):
            continue
        if phase == "pretrain" and ("lora" in pattern or pattern.endswith(".bias")):
            continue
        rows.append((pattern, shape))
    return rows


def checkpoint_state_dict(phase: str = "finetune", legacy_bridge: bool = False, seed: int = 2,
                          spec: of.TinySpec = SPEC) -> dict[str, torch.Tensor]:
    scale = {4096: spec.dim, 11008: spec.ffn_hidden, 16384: 4 * spec.dim, 1024: JOINT_WIDTH,
             32: spec.n_heads, 16: spec.lora_rank, 1: 1}  # 32 is both n_heads and query_layer at 7B (4 here)
    rows = [*of.parse(BRIDGE_7B), *(of.parse(LEGACY_7B) if legacy_bridge else [])]
    rows = [(p, s) for _, p, s in rows] + llama_rows(phase)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for pattern, shape in rows:
        for index in range(spec.n_layers) if "{L}" in pattern else (1, 2, 3) if "{K}" in pattern else [0]:
            key = pattern.format(L=index, K=index)
            sd[key] = of._value(key, tuple(scale[d] for d in shape), gen)
    return sd


def encoder_state_dict(config: str = "tiny_w3d", seed: int = 3) -> dict[str, torch.Tensor]:
    from surgery_plugins.imagebind.config import ImageBindConfig
    from surgery_plugins.imagebind.model import ImageBindModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ImageBindModel(ImageBindConfig.named(config)).state_dict()


@dataclasses.dataclass
class Files:
    llama_dir: Path
    checkpoint: Path
    imagebind: Path


def write_official(root: Path, tokenizer_model: Path, *, phase: str = "finetune", legacy_bridge: bool = False,
                   edit=None) -> Files:
    """Everything load_official needs, under `root`; `edit(sd)` may change 7B.pth's dict first."""
    root.mkdir(parents=True, exist_ok=True)
    llama_dir = of.write_llama_dir(root / "llama", SPEC, tokenizer_model)
    sd = checkpoint_state_dict(phase, legacy_bridge)
    if edit is not None:
        edit(sd)
    torch.save({"model": sd}, root / "7B.pth")
    torch.save(encoder_state_dict(), root / "imagebind.pth")
    return Files(llama_dir, root / "7B.pth", root / "imagebind.pth")
