"""Tiny files in the official LLaMA-Adapter V2 layout, for the loader's tests.

    root/llama/7B/params.json               Meta's params (dim 64, 4 layers, 4 heads, vocab_size -1)
    root/llama/7B/consolidated.00.pth       Meta key names + rope.freqs (or .00/.01: model-parallel shards)
    root/llama/tokenizer.model              a tiny trained sentencepiece model
    root/BIAS.pth / LORA.pth                {'model': adapter subset, 'config': {...}}
    root/clip.pth / clip.safetensors        OpenAI CLIP image tower (visual.* or clip.visual.*)

The key names and 7B shapes below are the released ones (tests/data/keys/*.txt, from OpenGVLab/
LLaMA-Adapter `llama_adapter_v2_multimodal7b/llama/llama_adapter.py` and
`util/extract_adapter_from_checkpoint.py`, collapsed over the layer / block index), scaled down by
mapping each 7B extent to its tiny counterpart. They are written out here, not taken from our
model, so the loader is tested against the upstream layout and not against itself;
`test_loading.py` checks them against the key lists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch

KEYS = Path(__file__).resolve().parents[2] / "data" / "keys"  # the released key lists (README.md there)
# name pattern, 7B shape; "B" rows are in the BIAS-7B list, "L" rows only in LORA-BIAS-7B's
# ({L}: llama layer 0..31, {B}: visual block 0..7)
ADAPTER_7B = """\
B visual_blocks.{B}.norm1.weight (768,)
B visual_blocks.{B}.norm1.bias (768,)
B visual_blocks.{B}.attn.qkv.weight (2304, 768)
B visual_blocks.{B}.attn.qkv.bias (2304,)
B visual_blocks.{B}.attn.proj.weight (768, 768)
B visual_blocks.{B}.attn.proj.bias (768,)
B visual_blocks.{B}.norm2.weight (768,)
B visual_blocks.{B}.norm2.bias (768,)
B visual_blocks.{B}.mlp.fc1.weight (3072, 768)
B visual_blocks.{B}.mlp.fc1.bias (3072,)
B visual_blocks.{B}.mlp.fc2.weight (768, 3072)
B visual_blocks.{B}.mlp.fc2.bias (768,)
B llama.layers.{L}.attention.gate (1, 32, 1, 1)
B llama.layers.{L}.attention.wq.bias (4096,)
B llama.layers.{L}.attention.wo.bias (4096,)
B llama.layers.{L}.feed_forward.w1.bias (11008,)
B llama.layers.{L}.feed_forward.w2.bias (4096,)
B llama.layers.{L}.feed_forward.w3.bias (11008,)
B llama.layers.{L}.attention_norm.weight (4096,)
B llama.layers.{L}.ffn_norm.weight (4096,)
L llama.layers.{L}.attention.lora_wq_l1.weight (16, 4096)
L llama.layers.{L}.attention.lora_wq_l2.weight (4096, 16)
L llama.layers.{L}.attention.lora_wk_l1.weight (16, 4096)
L llama.layers.{L}.attention.lora_wk_l2.weight (4096, 16)
L llama.layers.{L}.attention.lora_wv_l1.weight (16, 4096)
L llama.layers.{L}.attention.lora_wv_l2.weight (4096, 16)
L llama.layers.{L}.attention.lora_wo_l1.weight (16, 4096)
L llama.layers.{L}.attention.lora_wo_l2.weight (4096, 16)
L llama.layers.{L}.feed_forward.lora_w1_l1.weight (16, 4096)
L llama.layers.{L}.feed_forward.lora_w1_l2.weight (11008, 16)
L llama.layers.{L}.feed_forward.lora_w2_l1.weight (16, 11008)
L llama.layers.{L}.feed_forward.lora_w2_l2.weight (4096, 16)
L llama.layers.{L}.feed_forward.lora_w3_l1.weight (16, 4096)
L llama.layers.{L}.feed_forward.lora_w3_l2.weight (11008, 16)
L llama.layers.{L}.attention.new_gate (1, 1, 1, 1)
B clip_proj_norm.weight (768,)
B clip_proj_norm.bias (768,)
B visual_proj_norm.weight (4096,)
B visual_proj_norm.bias (4096,)
B visual_proj.weight (4096, 768)
B visual_proj.bias (4096,)
B clip_proj.weight (768, 768)
B clip_proj.bias (768,)
B llama.norm.weight (4096,)
B visual_query.weight (10, 768)
B adapter_query.weight (310, 4096)
"""

# Meta's consolidated.00.pth (the llama.* base keys of the full state dict, without the prefix)
BASE_7B = """\
tok_embeddings.weight (32000, 4096)
layers.{L}.attention.wq.weight (4096, 4096)
layers.{L}.attention.wk.weight (4096, 4096)
layers.{L}.attention.wv.weight (4096, 4096)
layers.{L}.attention.wo.weight (4096, 4096)
layers.{L}.feed_forward.w1.weight (11008, 4096)
layers.{L}.feed_forward.w2.weight (4096, 11008)
layers.{L}.feed_forward.w3.weight (11008, 4096)
layers.{L}.attention_norm.weight (4096,)
layers.{L}.ffn_norm.weight (4096,)
norm.weight (4096,)
output.weight (32000, 4096)
"""

# OpenAI CLIP ViT-L/14 (the clip.* keys of the full state dict, {R}: resblock 0..23); text-side keys last
CLIP_7B = """\
visual.class_embedding (1024,)
visual.positional_embedding (257, 1024)
visual.proj (1024, 768)
visual.conv1.weight (1024, 3, 14, 14)
visual.ln_pre.weight (1024,)
visual.ln_pre.bias (1024,)
visual.transformer.resblocks.{R}.attn.in_proj_weight (3072, 1024)
visual.transformer.resblocks.{R}.attn.in_proj_bias (3072,)
visual.transformer.resblocks.{R}.attn.out_proj.weight (1024, 1024)
visual.transformer.resblocks.{R}.attn.out_proj.bias (1024,)
visual.transformer.resblocks.{R}.ln_1.weight (1024,)
visual.transformer.resblocks.{R}.ln_1.bias (1024,)
visual.transformer.resblocks.{R}.mlp.c_fc.weight (4096, 1024)
visual.transformer.resblocks.{R}.mlp.c_fc.bias (4096,)
visual.transformer.resblocks.{R}.mlp.c_proj.weight (1024, 4096)
visual.transformer.resblocks.{R}.mlp.c_proj.bias (1024,)
visual.transformer.resblocks.{R}.ln_2.weight (1024,)
visual.transformer.resblocks.{R}.ln_2.bias (1024,)
visual.ln_post.weight (1024,)
visual.ln_post.bias (1024,)
positional_embedding (77, 768)
text_projection (768, 768)
logit_scale ()
token_embedding.weight (49408, 768)
ln_final.weight (768,)
ln_final.bias (768,)
"""


def parse(table: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(tag, pattern, 7B shape)] of one of the tables above (tag '' where the table has none)."""
    rows = []
    for line in table.strip().splitlines():
        head, shape = line.split(" (", 1)
        tag, _, pattern = head.rpartition(" ")
        rows.append((tag, pattern, tuple(int(d) for d in shape.rstrip(")").split(",") if d.strip())))
    return rows


@dataclasses.dataclass
class TinySpec:
    """The tiny architecture the files are written for."""

    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    multiple_of: int = 32
    norm_eps: float = 1e-6
    v_embed_dim: int = 32
    v_depth: int = 2
    v_mlp_ratio: float = 4.0
    v_num_heads: int = 4
    query_len: int = 10
    query_layer: int = 2
    lora_rank: int = 2
    clip_width: int = 64   # OpenAI's ViT has width // 64 heads
    clip_layers: int = 2
    clip_patch: int = 8
    clip_grid: int = 2     # image 16 x 16
    clip_out: int = 48     # visual.proj columns: clip_proj's input width
    text_width: int = 24
    text_vocab: int = 50

    @property
    def ffn_hidden(self) -> int:  # Meta's FeedForward: multiple_of * ceil(int(8 dim / 3) / multiple_of)
        return self.multiple_of * math.ceil(int(2 * 4 * self.dim / 3) / self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _scaled(pattern: str, shape: tuple[int, ...], spec: TinySpec, vocab: int) -> tuple[int, ...]:
    """A 7B shape mapped extent by extent onto the tiny spec (clip_proj's input is CLIP's width)."""
    v = spec.v_embed_dim
    table = {4096: spec.dim, 11008: spec.ffn_hidden, 32000: vocab, 768: v, 2304: 3 * v,
             3072: int(v * spec.v_mlp_ratio), 32: spec.n_heads, 16: spec.lora_rank, 10: spec.query_len,
             310: spec.query_len * spec.query_layer, 1: 1}
    if pattern.startswith(("visual.", "positional_embedding", "text_projection", "token_embedding", "ln_final")):
        w = spec.clip_width
        table = {1024: w, 3072: 3 * w, 4096: 4 * w, 257: spec.clip_grid ** 2 + 1, 3: 3, 14: spec.clip_patch,
                 768: spec.clip_out if pattern == "visual.proj" else spec.text_width, 77: 7, 49408: spec.text_vocab}
        if pattern == "text_projection":
            return (spec.text_width, spec.clip_out)
    if pattern == "clip_proj.weight":
        return (v, spec.clip_out)
    return tuple(table[d] for d in shape)


def _value(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Distinct, plausible values: norms and gates around 1 / non-zero, weights small."""
    t = torch.randn(shape, generator=gen)
    if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_pre.weight", "ln_post.weight",
                     "ln_1.weight", "ln_2.weight", "ln_final.weight", "new_gate")):
        return 1 + 0.1 * t
    if key.endswith("attention.gate"):
        return 0.5 * t
    return 0.05 * t


def vocab_size(tokenizer_model: Path) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model)).vocab_size()


def base_state_dict(spec: TinySpec, vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Meta's consolidated checkpoint of the tiny LLaMA, fp16, with the rope tables some releases keep."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for _, pattern, shape in parse(BASE_7B):
        for layer in range(spec.n_layers) if "{L}" in pattern else [None]:
            key = pattern.format(L=layer)
            sd[key] = _value(key, _scaled(pattern, shape, spec, vocab), gen).half()
    half = spec.head_dim // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(0, spec.head_dim, 2)[:half].float() / spec.head_dim))
    sd["rope.freqs"] = freqs.half()
    for layer in range(spec.n_layers):  # the other layout (issue #130)
        sd[f"layers.{layer}.attention.inner_attention.rope.freqs"] = freqs.half()
    return sd


def split_meta(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Meta's model-parallel layout: column-parallel rows split, row-parallel columns split, norms
    (and rope tables) replicated."""
    shards = [{} for _ in range(n)]
    for key, t in sd.items():
        name = key.split(".")[-2] if key.endswith(".weight") else ""
        if name in ("wq", "wk", "wv", "w1", "w3", "output"):
            parts = t.chunk(n, 0)
        elif name in ("wo", "w2", "tok_embeddings"):
            parts = t.chunk(n, 1)
        else:
            parts = [t] * n
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def write_llama_dir(root: Path, spec: TinySpec, tokenizer_model: Path, *, shards: int = 1,
                    llama_type: str = "7B", seed: int = 1) -> Path:
    """`root/<llama_type>/{params.json, consolidated.NN.pth}` and `root/tokenizer.model`; returns root."""
    folder = root / llama_type
    folder.mkdir(parents=True, exist_ok=True)
    params = {"dim": spec.dim, "multiple_of": spec.multiple_of, "n_heads": spec.n_heads,
              "n_layers": spec.n_layers, "norm_eps": spec.norm_eps, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tokenizer_model, root / "tokenizer.model")
    sd = base_state_dict(spec, vocab_size(tokenizer_model), seed)
    for i, shard in enumerate(split_meta(sd, shards) if shards > 1 else [sd]):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return root


def adapter_state_dict(spec: TinySpec, style: str = "BIAS", seed: int = 2) -> dict[str, torch.Tensor]:
    """The adapter checkpoint's 'model' entry, BIAS-7B or LORA-BIAS-7B key set, fp32."""
    if style not in ("BIAS", "LORA"):
        raise ValueError(style)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for tag, pattern, shape in parse(ADAPTER_7B):
        if tag == "L" and style != "LORA":
            continue
        for index in range(spec.n_layers) if "{L}" in pattern else range(spec.v_depth) if "{B}" in pattern else [0]:
            key = pattern.format(L=index, B=index)
            sd[key] = _value(key, _scaled(pattern, shape, spec, 0), gen)
    return sd


def write_adapter(path: Path, spec: TinySpec, style: str = "BIAS", *, config: dict | None = None,
                  seed: int = 2, edit=None) -> Path:
    """`{'model': ..., 'config': ...}` as upstream's extract_adapter_from_checkpoint writes it;
    `edit(sd)` may change the state dict first (add or drop keys)."""
    sd = adapter_state_dict(spec, style, seed)
    if edit is not None:
        edit(sd)
    if config is None:
        config = {"w_bias": True, "w_lora": style == "LORA", "lora_rank": spec.lora_rank if style == "LORA" else 16}
    torch.save({"model": sd, "config": config}, path)
    return path


def clip_state_dict(spec: TinySpec, *, prefix: str = "visual.", text: bool = True,
                    seed: int = 3) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's state dict (fp16, as OpenAI ships it), image tower under `prefix`, text side optional."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for _, pattern, shape in parse(CLIP_7B):
        visual = pattern.startswith("visual.")
        if not visual and not text:
            continue
        for block in range(spec.clip_layers) if "{R}" in pattern else [None]:
            name = pattern.format(R=block)
            key = prefix + name[len("visual."):] if visual else ("clip." + name if prefix.startswith("clip.") else name)
            sd[key] = _value(key, _scaled(pattern, shape, spec, 0), gen).half()
    return sd


def write_clip(path: Path, spec: TinySpec, *, prefix: str = "visual.", text: bool = True, seed: int = 3) -> Path:
    sd = clip_state_dict(spec, prefix=prefix, text=text, seed=seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@dataclasses.dataclass
class OfficialFiles:
    spec: TinySpec
    llama_dir: Path
    adapter: Path
    clip: Path


def write_official(root: Path, tokenizer_model: Path, spec: TinySpec | None = None, *, style: str = "BIAS",
                   shards: int = 1, clip_name: str = "clip.pth", config: dict | None = None) -> OfficialFiles:
    """Everything load_official needs, under `root`."""
    spec = spec or TinySpec()
    root.mkdir(parents=True, exist_ok=True)
    llama_dir = write_llama_dir(root / "llama", spec, tokenizer_model, shards=shards)
    adapter = write_adapter(root / f"{style}.pth", spec, style, config=config)
    clip = write_clip(root / clip_name, spec)
    return OfficialFiles(spec, llama_dir, adapter, clip)
