"""Load and save LLaMA-Adapter V2 multimodal checkpoints in the official (upstream) layout.

    model = load_official("BIAS-7B.pth", "/weights/llama", "7B", "ViT-L-14-visual.safetensors")
    save_official(model, "edited-adapter.pth")          # {'model': adapter subset, 'config': {...}}

Upstream hard-codes the architecture when it loads, so a checkpoint with other counts loads wrongly
or not at all; here every hyper-parameter the files determine is read from them (`adapter_hparams`),
so a checkpoint saved after surgery loads with no flags. Files are read weights-only (OpenAI's
TorchScript `ViT-L-14.pt` is refused with the command that converts it), and the model is built on
the meta device and takes their tensors, so a 7B model is never held twice (docs/llama_adapter.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from surgery.checkpoint_io import listing, natural_key, read_checkpoint, read_torch, write_atomically
from surgery.errors import CheckpointError, UnsafeCheckpointError

LLAMA = "llama."  # where the LLaMA backbone sits in LLaMA_adapter's state dict (upstream and ours)
LOG = logging.getLogger(__name__)  # one INFO line per file read (`surgery generate` shows them on stderr)

RELEASE_URL = "https://github.com/OpenGVLab/LLaMA-Adapter/releases/download/"
RELEASES = {  # upstream `_MODELS`: nothing is downloaded here; the names only make errors helpful
    "BIAS-7B": "v.2.0.0/7fa55208379faf2dd862565284101b0e4a2a72114d6490a95e432cf9d9b6c813_BIAS-7B.pth",
    "LORA-BIAS-7B": "v.2.0.0/1bcbffc43484332672092e0024a8699a6eb5f558161aebf98a7c6b1db67224d1_LORA-BIAS-7B.pth",
    "CAPTION-7B": "v.2.0.0/5088aeb63a89746b90bcfd5cb819e1c7411b2771b267c6d131ce73e250a8abf0_CAPTION-7B.pth",
    "LORA-BIAS-7B-v21": "v.2.1.0/d26d107eec32127ac86ef1997cf7169de1c56a59c539fc1258c6798b969e289c_LORA-BIAS-7B-v21.pth",
}

# Architecture fields of Meta's params.json that the LLaMA-Adapter V2 LLaMA implements.
PARAMS_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "norm_eps")
PARAMS_REQUIRED = ("dim", "n_layers", "n_heads")

DEFAULT_V_NUM_HEADS = 16  # upstream `load()`; not inferable from the weights (qkv is (3C, C) for any head count)

CONVERT_CLIP_HINT = (
    "convert it once, in an environment where you trust the file, to a plain state dict of its image tower:\n"
    "    python -c \"import torch, safetensors.torch as st; "
    "sd = torch.jit.load('ViT-L-14.pt', map_location='cpu').state_dict(); "
    "st.save_file({k: v.contiguous() for k, v in sd.items() if k.startswith('visual.')}, "
    "'ViT-L-14-visual.safetensors')\"\n"
    "and pass clip_weights='ViT-L-14-visual.safetensors' (a .pth of that dict works too)")

# -- key names of Meta's base checkpoint (consolidated.NN.pth) -----------------------------------------

# rope tables some Meta releases store (issue #130); the model computes its own, so they are dropped
_IGNORED_BASE = re.compile(r"^(layers\.\d+\.attention\.inner_attention\.)?rope\.freqs$")
# Meta's model-parallel split (fairscale): column-parallel layers are split along the output
# rows (dim 0), row-parallel ones along the input columns (dim 1), the embedding (a
# ParallelEmbedding) along the embedding dim (dim 1); norms are replicated on every rank.
_COLUMN_PARALLEL = re.compile(r"^(layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])|output)\.weight$")
_ROW_PARALLEL = re.compile(r"^(layers\.\d+\.(attention\.wo|feed_forward\.w2)|tok_embeddings)\.weight$")
_REPLICATED = re.compile(r"^(layers\.\d+\.(attention_norm|ffn_norm)|norm)\.weight$")
# base weights that an adapter checkpoint does not carry (the norms it does: they are fine-tuned)
_FROZEN_BASE = re.compile(r"^(layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|tok_embeddings|output)\.weight$")


def base_keys(n_layers: int) -> list[str]:
    """The keys of a (merged) Meta LLaMA checkpoint with `n_layers` layers, rope tables aside."""
    per_layer = [*(f"attention.w{p}.weight" for p in "qkvo"), *(f"feed_forward.w{i}.weight" for i in (1, 2, 3)),
                 "attention_norm.weight", "ffn_norm.weight"]
    return ["tok_embeddings.weight", *(f"layers.{i}.{k}" for i in range(n_layers) for k in per_layer),
            "norm.weight", "output.weight"]


def is_base_key(key: str) -> bool:
    """A key of the model's state dict that Meta's LLaMA checkpoint provides (`llama.` + Meta name)."""
    return key.startswith(LLAMA) and bool(_FROZEN_BASE.match(key[len(LLAMA):]) or _REPLICATED.match(key[len(LLAMA):]))


def is_adapter_key(key: str, clip_prefix: str = "clip.") -> bool:
    """A key the official adapter checkpoint carries (BIAS/LORA lists): everything but the frozen
    LLaMA weights and CLIP. The LLaMA norms count: upstream fine-tunes them ('norm' in the name)."""
    if key.startswith(clip_prefix):
        return False
    return not (key.startswith(LLAMA) and _FROZEN_BASE.match(key[len(LLAMA):]))


# -- reading the files ---------------------------------------------------------------------------------


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (torch.jit.save, e.g. OpenAI's ViT-L-14.pt): a zip with `constants.pkl`."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.split("/")[-1] == "constants.pkl" and name.count("/") <= 1 for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _refuse_torchscript(path: Path, what: str, hint: str) -> None:
    if _is_torchscript(path):
        raise UnsafeCheckpointError(
            f"{what} {path} is a TorchScript archive (torch.jit.save, as OpenAI's CLIP release files are); it "
            f"cannot be read weights-only, and loading it would run the code it contains; {hint}")


def read_params(llama_dir: Path, llama_type: str) -> dict[str, Any]:
    """The architecture fields of `<llama_dir>/<llama_type>/params.json`, checked."""
    path = llama_dir / llama_type / "params.json"
    if not path.is_file():
        types = sorted(p.parent.name for p in llama_dir.glob("*/params.json")) if llama_dir.is_dir() else []
        hint = (f"; llama_dir holds {', '.join(types)} (pass llama_type=...)" if types
                else "; expected the layout <llama_dir>/<llama_type>/params.json with llama_type like '7B'")
        raise CheckpointError(f"LLaMA params file {path} does not exist" + hint)
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"LLaMA params file {path} is not readable JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise CheckpointError(f"LLaMA params file {path} holds a {type(params).__name__}, not a JSON object")
    unknown = sorted(set(params) - set(PARAMS_FIELDS))
    if unknown:  # n_kv_heads, ffn_dim_multiplier, rope_theta, ...: another architecture
        raise CheckpointError(f"LLaMA params file {path} has fields the LLaMA-Adapter V2 model does not implement: "
                              f"{', '.join(unknown)} (it supports {', '.join(PARAMS_FIELDS)}: LLaMA-1/2 7B/13B layout)")
    missing = [f for f in PARAMS_REQUIRED if f not in params]
    if missing:
        raise CheckpointError(f"LLaMA params file {path} lacks {', '.join(missing)}")
    for field in PARAMS_FIELDS:
        value = params.get(field)
        expect = float if field == "norm_eps" else int
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or (expect is int and value != int(value))):
            raise CheckpointError(f"LLaMA params file {path}: {field} = {value!r} is not a number of the right kind")
        if value is not None:
            params[field] = expect(value)
    return params


def read_adapter_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) of an official adapter checkpoint `{'model': {...}, 'config': {...}}`.

    Read with `torch.load(weights_only=True)` (or safetensors). A bare state dict is accepted
    too (config {}). Training checkpoints that pickle argparse `args` are refused as unsafe.
    """
    path = Path(path)
    if not path.exists():
        hint = ""
        if str(path) in RELEASES:
            hint = (f"; {path} is the name of an upstream release: download it from "
                    f"{RELEASE_URL}{RELEASES[str(path)]} and pass the file's path (nothing is downloaded here)")
        raise CheckpointError(f"adapter checkpoint {path} does not exist{hint}")
    if path.is_file() and path.stat().st_size > 0:
        _refuse_torchscript(path, "adapter checkpoint", "save its state dict as {'model': ..., 'config': ...} instead")
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(b"PK\x03\x04") or (head.startswith(b"\x80") and path.suffix != ".safetensors"
                                                and not head[8:9] == b"{"):  # torch.save: zip, or a raw pickle
            try:
                raw = read_torch(path)
            except UnsafeCheckpointError as exc:
                raise UnsafeCheckpointError(
                    f"{exc}. (A training checkpoint of upstream's main_finetune.py pickles its argparse args: "
                    f"extract the adapter first, as upstream's util/extract_adapter_from_checkpoint.py does, in "
                    f"an environment where you trust the file)") from exc.__cause__
            if not isinstance(raw, Mapping):
                raise CheckpointError(f"adapter checkpoint {path} holds a {type(raw).__name__}, not "
                                      f"{{'model': state dict, 'config': dict}}")
            model = raw.get("model", raw)
            config = raw.get("config", {}) if "model" in raw else {}
            if not isinstance(model, Mapping):
                raise CheckpointError(f"adapter checkpoint {path}: its 'model' entry is a {type(model).__name__}, "
                                      f"not a state dict")
            if not isinstance(config, Mapping):
                raise CheckpointError(f"adapter checkpoint {path}: its 'config' entry is a "
                                      f"{type(config).__name__}, not a dict")
            bad = [f"{k!r} ({type(v).__name__})" for k, v in model.items()
                   if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
            if bad:
                raise CheckpointError(f"adapter checkpoint {path} has entries that are not tensors: {listing(bad)}")
            return dict(model), dict(config)
    state_dict, _ = read_checkpoint(path)  # safetensors, raw pickles, and every error message for bad files
    return state_dict, {}


def read_clip_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's image-tower tensors from a state dict file, under OpenAI's names without
    prefix (`conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`, `proj`, ...).

    Accepts `visual.*` (a CLIP state dict), `clip.visual.*` (an upstream LLaMA_adapter state
    dict) or bare names; CLIP's text-tower keys are ignored; anything else is an error.
    """
    path = Path(path)
    if path.is_file():
        _refuse_torchscript(path, "CLIP weights file", "to use it, " + CONVERT_CLIP_HINT)
    state_dict, _ = read_checkpoint(path)
    names = {key: key[len("clip."):] if key.startswith("clip.") else key for key in state_dict}
    if not any(name.startswith("visual.") for name in names.values()):
        return state_dict  # the image tower's own state dict, without prefix (checked by the conversion)
    visual, unknown = {}, []
    for key, name in names.items():
        if name.startswith("visual."):
            visual[name[len("visual."):]] = state_dict[key]
        elif not _CLIP_TEXT.match(name):  # CLIP's text side is not used by LLaMA-Adapter
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"CLIP weights file {path} has keys that are not CLIP's: {listing(unknown)} "
                              f"(expected OpenAI names: visual.* or clip.visual.*)")
    return visual


_CLIP_TEXT = re.compile(r"^(positional_embedding|text_projection|logit_scale|token_embedding\.weight|"
                        r"ln_final\.(weight|bias)|transformer\..*)$")


def read_base_shards(folder: Path, n_layers: int) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Meta's `consolidated.NN.pth` files, checked and merged into one state dict (Meta key names)."""
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        others = sorted(p.name for p in folder.glob("*.pth"))
        raise CheckpointError(f"no LLaMA weights in {folder}: expected consolidated.00.pth (and .01, ... for "
                              f"model-parallel sizes)" + (f"; found {', '.join(others)}" if others else ""))
    numbers = [f.name[len("consolidated."):-len(".pth")] for f in files]
    if numbers != [f"{i:02d}" for i in range(len(files))]:
        raise CheckpointError(f"LLaMA weights in {folder} are not consolidated.00.pth ... consolidated."
                              f"{len(files) - 1:02d}.pth in sequence: found {', '.join(f.name for f in files)}")
    expected = set(base_keys(n_layers))
    shards = []
    for number, file in enumerate(files, 1):
        LOG.info("reading LLaMA weights %s (shard %d of %d, %.2f GB)", file, number, len(files),
                 file.stat().st_size / 1e9)
        shard, _ = read_checkpoint(file)
        for key in [k for k in shard if _IGNORED_BASE.match(k)]:
            del shard[key]
        unexpected = sorted(set(shard) - expected, key=natural_key)
        missing = sorted(expected - set(shard), key=natural_key)
        if unexpected:
            raise CheckpointError(f"LLaMA weights {file} have unexpected keys for a {n_layers}-layer LLaMA "
                                  f"(params.json): {listing(unexpected)}")
        if missing:
            raise CheckpointError(f"LLaMA weights {file} lack keys of a {n_layers}-layer LLaMA (params.json): "
                                  f"{listing(missing)}")
        shards.append(shard)
    return merge_shards(shards, files), files


def merge_shards(shards: list[dict[str, torch.Tensor]], names: Iterable[Any] = ()) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel shards (each with the same keys).

    Column-parallel weights (wq, wk, wv, w1, w3, output) are concatenated along dim 0, row-parallel
    ones (wo, w2, tok_embeddings) along dim 1; norms are replicated and must be equal. One shard
    is returned as it is. The shards are emptied as they are merged, so the peak memory is the
    weights plus one tensor.
    """
    if len(shards) == 1:
        return shards[0]
    names = [str(n) for n in names] or [f"shard {i}" for i in range(len(shards))]
    keys = list(shards[0])
    for name, shard in zip(names[1:], shards[1:]):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys), key=natural_key)
            raise CheckpointError(f"LLaMA shards {names[0]} and {name} do not have the same keys: {listing(diff)}")
    merged = {}
    for key in keys:
        parts = [shard.pop(key) for shard in shards]
        if _COLUMN_PARALLEL.match(key) or _ROW_PARALLEL.match(key):
            dim = 0 if _COLUMN_PARALLEL.match(key) else 1
            if len({p.dim() for p in parts}) != 1 or len({p.shape[:dim] + p.shape[dim + 1:] for p in parts}) != 1:
                raise CheckpointError(f"LLaMA shards disagree on the shape of {key}: "
                                      f"{', '.join(str(tuple(p.shape)) for p in parts)}")
            merged[key] = torch.cat(parts, dim)
        elif _REPLICATED.match(key):
            for name, part in zip(names[1:], parts[1:]):
                if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
                    raise CheckpointError(f"LLaMA shards {names[0]} and {name} hold different values of the "
                                          f"replicated {key}")
            merged[key] = parts[0]
        else:
            raise CheckpointError(f"LLaMA shards: {key} is not a key of Meta's LLaMA layout, so it cannot be merged")
        del parts
    return merged


# -- hyper-parameters read from the adapter checkpoint -------------------------------------------------


def adapter_hparams(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                    where: str = "adapter checkpoint") -> dict[str, Any]:
    """The architecture an adapter state dict (official key names) was trained with.

    Read from the tensors: query_len (visual_query rows), v_embed_dim (its width), query_layer
    (adapter_query rows / query_len), dim (adapter_query width), v_depth (visual_blocks indices),
    v_mlp_ratio (mlp.fc1 rows / v_embed_dim), clip_dim (clip_proj input width), w_bias (wq.bias
    present), w_lora (lora_* present), lora_rank (lora_wq_l1 rows), w_new_gate (new_gate present),
    n_layers_seen (highest llama.layers index + 1). `config` entries with the same names must
    agree (an error otherwise); v_num_heads is taken from it when there (not inferable).
    """
    config = dict(config or {})

    def need(key: str, ndim: int) -> torch.Tensor:
        t = state_dict.get(key)
        if t is None:
            raise CheckpointError(f"{where} lacks {key}: it is not a LLaMA-Adapter V2 multimodal adapter "
                                  f"(expected the BIAS-7B / LORA-BIAS-7B key layout)")
        if t.dim() != ndim:
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, expected {ndim} dimensions")
        return t

    query = need("visual_query.weight", 2)
    table = need("adapter_query.weight", 2)
    query_len, v_embed_dim = int(query.shape[0]), int(query.shape[1])
    if query_len == 0 or table.shape[0] % query_len:
        raise CheckpointError(f"{where}: adapter_query has {table.shape[0]} rows, not a multiple of query_len = "
                              f"{query_len} (visual_query rows)")
    hp: dict[str, Any] = {"query_len": query_len, "query_layer": int(table.shape[0]) // query_len,
                          "v_embed_dim": v_embed_dim, "dim": int(table.shape[1])}
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"^visual_blocks\.(\d+)\.", k))}
    if blocks != set(range(len(blocks))):
        raise CheckpointError(f"{where}: visual_blocks indices are not 0..n-1: {sorted(blocks)}")
    hp["v_depth"] = len(blocks)
    if blocks:
        hidden = int(need("visual_blocks.0.mlp.fc1.weight", 2).shape[0])
        hp["v_mlp_ratio"] = hidden / v_embed_dim
        if int(v_embed_dim * hp["v_mlp_ratio"]) != hidden:  # timm's Mlp has int(dim * mlp_ratio) units
            hp["v_mlp_ratio"] = (hidden + 0.5) / v_embed_dim  # the ratio that rounds to it despite float error
    else:
        hp["v_mlp_ratio"] = float(config.get("v_mlp_ratio", 4.0))
    hp["clip_dim"] = int(need("clip_proj.weight", 2).shape[1])
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"^llama\.layers\.(\d+)\.", k))}
    hp["n_layers_seen"] = max(layers) + 1 if layers else None
    # w_bias / w_lora / w_new_gate from the keys. Upstream's load() passes w_new_gate=cfg.get('w_lora')
    # (the released LoRA checkpoints have new_gate, the BIAS ones do not), and ignores w_bias in
    # favour of phase == 'finetune'; the keys say what the checkpoint really holds.
    hp["w_bias"] = any(re.match(r"^llama\.layers\.\d+\.attention\.wq\.bias$", k) for k in state_dict)
    lora = [k for k in state_dict if re.match(r"^llama\.layers\.\d+\.(attention|feed_forward)\.lora_", k)]
    hp["w_lora"] = bool(lora)
    if lora:  # every l1 is (rank, in): lora_wq_l1's rows in the releases
        ranks = {int(state_dict[k].shape[0]) for k in lora if k.endswith("_l1.weight") and state_dict[k].dim() == 2}
        if len(ranks) != 1:
            raise CheckpointError(f"{where}: the LoRA matrices do not share one rank (lora_*_l1 rows: "
                                  f"{sorted(ranks) or 'none'})")
        hp["lora_rank"] = ranks.pop()
    else:
        hp["lora_rank"] = int(config.get("lora_rank", 16))  # unused without LoRA; kept for the record
    hp["w_new_gate"] = any(re.match(r"^llama\.layers\.\d+\.attention\.new_gate$", k) for k in state_dict)
    for field in ("query_len", "query_layer", "v_embed_dim", "v_depth", "v_mlp_ratio", "w_bias", "w_lora",
                  "w_new_gate") + (("lora_rank",) if lora else ()):
        said = config.get(field)
        if field == "v_mlp_ratio" and isinstance(said, (int, float)) and blocks:
            agree = int(v_embed_dim * said) == int(v_embed_dim * hp[field])  # the same Mlp width
        else:
            agree = said is None or said == hp[field]
        if not agree:
            raise CheckpointError(f"{where}: its config says {field} = {config[field]!r} but its tensors hold "
                                  f"{field} = {hp[field]!r}; the file is inconsistent")
    hp["v_num_heads"] = config.get("v_num_heads", DEFAULT_V_NUM_HEADS)
    return hp


# -- load ----------------------------------------------------------------------------------------------


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; float16 on an accelerator, as upstream runs LLaMA there."""
    return torch.float32 if device.type in ("cpu", "meta") else torch.float16


def _model_prefix(model: nn.Module, kind: type) -> str:
    """The state-dict prefix of the (first) submodule of type `kind`, with a trailing dot."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            return f"{name}." if name else ""
    raise CheckpointError(f"the model has no {kind.__name__} submodule")


VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")  # (vocab, dim): their rows are the tokenizer's pieces


def shape_error(key: str, tensor: torch.Tensor, expected: torch.Tensor, source: str, tokenizer_path: Path,
                built_from: str) -> CheckpointError:
    """The error for a file's tensor of a shape the model does not take. A vocabulary that differs
    from the tokenizer's (the likeliest cause: a tokenizer.model of another LLaMA) says so."""
    if key.endswith(VOCAB_KEYS) and tensor.dim() == 2 and tensor.shape[1:] == expected.shape[1:]:
        return CheckpointError(f"{source}: {key} has {tensor.shape[0]} vocabulary rows but {tokenizer_path} has "
                               f"{expected.shape[0]} pieces: the tokenizer is not this LLaMA's")
    return CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model built from {built_from} "
                           f"needs {tuple(expected.shape)}")


def load_official(adapter_ckpt: str | os.PathLike, llama_dir: str | os.PathLike, llama_type: str = "7B",
                  clip_weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, max_seq_len: int = 512, max_batch_size: int = 1,
                  v_num_heads: int | None = None, allow_random_clip: bool = False,
                  clip_config: Any = None, seed: int = 0) -> nn.Module:
    """A `LLaMAAdapter` from the official files, in eval mode, on `device` in `dtype`.

    adapter_ckpt   the adapter checkpoint (BIAS-7B.pth, LORA-BIAS-7B.pth, ... or one written by
                   `save_official`): its architecture is read from its tensors (`adapter_hparams`)
    llama_dir      the folder holding `<llama_type>/params.json`, `<llama_type>/consolidated.NN.pth`
                   (merged when there are several) and `tokenizer.model` (its size is vocab_size)
    clip_weights   OpenAI CLIP image-tower weights (`visual.*` / `clip.visual.*`, .pth or
                   .safetensors); its config (ViT-L/14 for the releases) is read from the shapes.
                   None is an error unless `allow_random_clip` (tests, benchmarks): then the tower
                   is built from `clip_config` (default ViT-L/14 with the adapter's clip width),
                   randomly initialised with `seed`
    dtype          every floating tensor is cast to it; default float32 on the CPU, float16 elsewhere
    v_num_heads    the visual blocks' head count, which weights cannot tell; default: the
                   checkpoint's config entry, else upstream's 16
    max_seq_len    honoured (upstream's load() ignores its argument and uses 512)

    Every problem (a missing or unsafe file, keys that do not belong, a missing adapter part,
    shapes that disagree between the files) raises CheckpointError naming the file and the keys.
    """
    from .clip import ClipVision, ClipVisionConfig, convert_openai_visual
    from .model import LLaMAAdapter
    from .tokenizer import Tokenizer

    llama_dir = Path(llama_dir)
    if not llama_dir.is_dir():
        raise CheckpointError(f"LLaMA folder {llama_dir} does not exist (expected <llama_dir>/{llama_type}/"
                              f"params.json, consolidated.00.pth and <llama_dir>/tokenizer.model)")
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    # small files first, so that a wrong argument fails before gigabytes are read
    params = read_params(llama_dir, llama_type)
    tokenizer_path = llama_dir / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise CheckpointError(f"LLaMA tokenizer {tokenizer_path} does not exist (the official layout keeps "
                              f"tokenizer.model in llama_dir, next to the {llama_type}/ folder)")
    tokenizer = Tokenizer(tokenizer_path)
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != tokenizer.n_words:
        raise CheckpointError(f"{llama_dir / llama_type / 'params.json'} says vocab_size = {params['vocab_size']} "
                              f"but {tokenizer_path} has {tokenizer.n_words} pieces")

    where = f"adapter checkpoint {adapter_ckpt}"
    adapter_sd, adapter_cfg = read_adapter_checkpoint(adapter_ckpt)
    hp = adapter_hparams(adapter_sd, adapter_cfg, where)
    if v_num_heads is not None:
        hp["v_num_heads"] = v_num_heads
    _check_fit(hp, params, where, llama_dir / llama_type)

    clip_sd: dict[str, torch.Tensor] | None = None
    if clip_weights is not None:
        visual = read_clip_weights(clip_weights)
        try:
            clip_cfg = ClipVisionConfig.from_state_dict(visual, prefix="")
        except ValueError as exc:
            raise CheckpointError(f"CLIP weights file {clip_weights}: {exc}") from exc
        clip_sd = convert_openai_visual(visual, prefix="")
        del visual
        clip_where = f"CLIP weights file {clip_weights}"
    elif allow_random_clip:
        clip_cfg = clip_config if clip_config is not None else ClipVisionConfig(output_dim=hp["clip_dim"])
        clip_where = f"the random CLIP tower ({clip_cfg})"
    else:
        raise CheckpointError("no CLIP weights: pass clip_weights= a state dict file of OpenAI CLIP ViT-L/14's "
                              "image tower (visual.* keys, .pth or .safetensors; OpenAI's TorchScript "
                              "ViT-L-14.pt must be converted first: surgery_plugins.llama_adapter.loading."
                              "CONVERT_CLIP_HINT shows how), or "
                              "allow_random_clip=True for a randomly initialised tower (tests, benchmarks)")
    if clip_cfg.output_dim != hp["clip_dim"]:
        raise CheckpointError(f"{clip_where} gives {clip_cfg.output_dim}-wide features but the adapter's "
                              f"clip_proj takes {hp['clip_dim']} ({where}): not the CLIP it was trained with")

    config = adapter_config(
        hp, clip_cfg, dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        vocab_size=tokenizer.n_words, multiple_of=params.get("multiple_of", 256),
        norm_eps=params.get("norm_eps", 1e-5),  # upstream defaults
        max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    with torch.device("meta"):  # shapes only: the files' tensors become the parameters below
        model = LLaMAAdapter(config, tokenizer)
    expected = model.state_dict()
    clip_prefix = _model_prefix(model, ClipVision)
    check_adapter_keys(adapter_sd, expected, clip_prefix, hp, where)
    state: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor, source: str) -> None:
        if tensor.shape != expected[key].shape:
            raise shape_error(key, tensor, expected[key], source, tokenizer_path,
                              f"{llama_dir / llama_type / 'params.json'}, {where} and the CLIP weights")
        if tensor.is_floating_point():  # cast and move one tensor at a time: the file's copy is freed here
            tensor = tensor.to(device=device, dtype=dtype)
        state[key] = tensor

    if clip_sd is not None:
        for key in list(clip_sd):
            put(clip_prefix + key, clip_sd.pop(key), clip_where)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tower = ClipVision(clip_cfg)
        for key, tensor in tower.state_dict().items():
            put(clip_prefix + key, tensor, clip_where)
        del tower
    for key in list(adapter_sd):
        put(key, adapter_sd.pop(key), where)
    base, files = read_base_shards(llama_dir / llama_type, params["n_layers"])
    base_where = f"LLaMA weights {files[0] if len(files) == 1 else llama_dir / llama_type / 'consolidated.*.pth'}"
    for key in list(base):
        tensor = base.pop(key)
        if LLAMA + key not in state:  # the adapter's fine-tuned norms replace the base ones
            put(LLAMA + key, tensor, base_where)
        del tensor
    unfilled = [k for k in expected if k not in state]
    if unfilled:  # a key no file provides (not one of the official layout's)
        raise CheckpointError(f"no file provides {len(unfilled)} tensor(s) of the model: {listing(unfilled)}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # keys and shapes were checked; this would be a bug
        raise CheckpointError(f"loading the official files failed: {exc}") from exc
    state.clear()  # the model holds the tensors now
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    left += [f"{name}.{attr}" if name else attr for name, module in model.named_modules()  # plain attributes
             for attr, value in vars(module).items() if isinstance(value, torch.Tensor) and value.is_meta]
    if left:
        raise CheckpointError(f"tensors left on the meta device after loading: {listing(left)}")
    _mark_registered(model, config, expected)
    return model.to(device).eval()


def adapter_config(hp: Mapping[str, Any], clip: Any, **llama: Any) -> Any:
    """The `AdapterConfig` of an adapter whose hyper-parameters are `hp` (`adapter_hparams`), with
    CLIP tower `clip` and the LLaMA fields given (params.json's, or those the adapter shows)."""
    from .model import AdapterConfig

    return AdapterConfig(
        **llama, w_bias=hp["w_bias"], w_lora=hp["w_lora"], lora_rank=hp["lora_rank"], w_new_gate=hp["w_new_gate"],
        clip=clip, v_embed_dim=hp["v_embed_dim"], v_depth=hp["v_depth"], v_num_heads=hp["v_num_heads"],
        v_mlp_ratio=hp["v_mlp_ratio"], query_len=hp["query_len"], query_layer=hp["query_layer"])


def check_adapter_keys(adapter_sd: Mapping[str, torch.Tensor], expected: Iterable[str], clip_prefix: str,
                       hp: Mapping[str, Any], where: str) -> None:
    """An adapter checkpoint's keys against the state-dict keys `expected` of the model its tensors
    describe: every key must be the model's (none of CLIP's), and the adapter's own part complete
    (the frozen LLaMA weights and CLIP excepted). `load_official` and the checkpoint layout both check so."""
    expected = list(expected)
    known = set(expected)
    unexpected = [k for k in adapter_sd if k not in known or k.startswith(clip_prefix)]
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} unexpected key(s) for the architecture its tensors "
                              f"describe ({_describe(hp)}): {listing(sorted(unexpected, key=natural_key))}")
    missing = [k for k in expected if is_adapter_key(k, clip_prefix) and not is_base_key(k) and k not in adapter_sd]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} adapter key(s) of the architecture its tensors "
                              f"describe ({_describe(hp)}): {listing(missing)}")


def _mark_registered(model: nn.Module, config: Any, expected: Mapping[str, torch.Tensor]) -> None:
    """Record the registered model this one is (name and safe keyword arguments, as `surgery.build`
    does), when one fits, so that `surgery.save` files of it name their model for the command line."""
    from surgery.state import mark_built

    from .layouts import registered_fit

    fit = registered_fit({k: tuple(v.shape) for k, v in expected.items()}, config, complete=True)
    if fit is not None:
        mark_built(model, *fit)


def _describe(hp: Mapping[str, Any]) -> str:
    flags = [f for f in ("w_bias", "w_lora", "w_new_gate") if hp.get(f)]
    return (f"query_len={hp['query_len']}, query_layer={hp['query_layer']}, v_depth={hp['v_depth']}"
            + (f", lora_rank={hp['lora_rank']}" if hp.get("w_lora") else "") + "".join(f", {f}" for f in flags))


def _check_fit(hp: Mapping[str, Any], params: Mapping[str, Any], where: str, folder: Path) -> None:
    """The adapter and the LLaMA folder describe one model; the visual branch is consistent."""
    if hp["dim"] != params["dim"]:
        raise CheckpointError(f"{where} is for a LLaMA of dim {hp['dim']} (adapter_query width) but {folder} "
                              f"holds dim {params['dim']}: another model size (wrong llama_type?)")
    seen = hp["n_layers_seen"]
    if seen is not None and seen != params["n_layers"]:
        raise CheckpointError(f"{where} has per-layer tensors for {seen} LLaMA layers but {folder}/params.json "
                              f"says n_layers = {params['n_layers']}")
    if not 1 <= hp["query_layer"] <= params["n_layers"]:
        raise CheckpointError(f"{where}: query_layer = {hp['query_layer']} is not within 1..{params['n_layers']}")
    heads = hp["v_num_heads"]
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or hp["v_embed_dim"] % heads:
        raise CheckpointError(f"{where}: v_num_heads = {heads!r} does not divide v_embed_dim = {hp['v_embed_dim']}")
    if params["dim"] % params["n_heads"]:
        raise CheckpointError(f"{folder}/params.json: dim {params['dim']} is not divisible by n_heads "
                              f"{params['n_heads']}")


# -- save ----------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of `model`'s state dict an official adapter checkpoint holds (the BIAS / LORA key
    lists: visual branch, adapter_query, gates, biases, norms, LoRA), as plain CPU tensors."""
    from .clip import ClipVision

    clip_prefix = _model_prefix(model, ClipVision)
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for k, v in model.state_dict().items() if is_adapter_key(k, clip_prefix)}


def official_config(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The 'config' entry `save_official` writes: upstream's w_bias / w_lora / lora_rank, and every
    hyper-parameter of the adapter (read from the tensors, so it cannot disagree with them),
    including v_num_heads, which the weights cannot tell."""
    sd = adapter_state_dict(model) if state_dict is None else state_dict
    hp = adapter_hparams(sd, where="the model")
    blocks = getattr(model, "visual_blocks", None)
    heads = int(blocks[0].attn.num_heads) if blocks is not None and len(blocks) else model.config.v_num_heads
    for attr in ("query_len", "query_layer"):
        if getattr(model, attr, hp[attr]) != hp[attr]:
            raise CheckpointError(f"the model's {attr} = {getattr(model, attr)} disagrees with its tensors "
                                  f"({hp[attr]}); resize it with surgery.resize, not by hand")
    return {"w_bias": hp["w_bias"], "w_lora": hp["w_lora"], "lora_rank": hp["lora_rank"],
            "w_new_gate": hp["w_new_gate"], "query_len": hp["query_len"], "query_layer": hp["query_layer"],
            "v_embed_dim": hp["v_embed_dim"], "v_depth": hp["v_depth"], "v_num_heads": heads,
            "v_mlp_ratio": float(hp["v_mlp_ratio"])}


def save_official(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `model`'s adapter as an official checkpoint `{'model': subset, 'config': {...}}`.

    The subset is what the released BIAS / LORA checkpoints hold (per the model's w_bias / w_lora),
    on the CPU, in `dtype` (default: as in the model; the releases are float32). Only plain
    tensors, dicts and numbers are pickled, so `load_official` (and upstream's `llama.load`) reads
    it weights-only, and the config carries every hyper-parameter, so it loads with no flags
    whatever the counts. Atomic: the file appears complete or not at all.
    """
    sd = adapter_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    payload = {"model": sd, "config": official_config(model, sd)}
    path = Path(path)
    write_atomically(path, lambda tmp: torch.save(payload, tmp))
    return path


__all__ = [
    "load_official",
    "save_official",
    "adapter_hparams",
    "adapter_config",
    "check_adapter_keys",
    "adapter_state_dict",
    "official_config",
    "read_adapter_checkpoint",
    "read_clip_weights",
    "read_params",
    "read_base_shards",
    "merge_shards",
    "base_keys",
    "is_adapter_key",
    "is_base_key",
    "CONVERT_CLIP_HINT",
    "RELEASES",
]
