"""load_official / save_official against tiny files in the official layout (official_files.py).

The files are written from upstream's key names (tests/data/keys/*.txt, collapsed and scaled down), never
from our model's state dict, and every check reads the expected values back from the files
with torch.load / safetensors: what the loader put where is compared with what the files hold.
The tiny models go through exactly the code path a real 7B checkpoint takes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import official_files as of
from surgery.errors import CheckpointError, UnsafeCheckpointError
from surgery_plugins.llama_adapter import loading
from surgery_plugins.llama_adapter.clip import ClipVisionConfig, to_openai_visual
from surgery_plugins.llama_adapter.loading import (
    adapter_hparams,
    load_official,
    merge_shards,
    read_adapter_checkpoint,
    save_official,
)


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def base_from_files(llama_dir: Path) -> dict[str, torch.Tensor]:
    """The merged Meta weights, merged here by hand from the shard files (no loader code)."""
    shards = [read(p) for p in sorted((llama_dir / "7B").glob("consolidated.*.pth"))]
    out = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        name = key.split(".")[-2] if key.endswith(".weight") else ""
        if len(parts) > 1 and name in ("wq", "wk", "wv", "w1", "w3", "output"):
            out[key] = torch.cat(parts, 0)
        elif len(parts) > 1 and name in ("wo", "w2", "tok_embeddings"):
            out[key] = torch.cat(parts, 1)
        else:
            out[key] = parts[0]
    return out


def load(files: of.OfficialFiles, **kwargs) -> nn.Module:
    return load_official(files.adapter, files.llama_dir, "7B", files.clip, **kwargs)


@pytest.fixture
def bias_files(tmp_path, tiny_tokenizer_path) -> of.OfficialFiles:
    return of.write_official(tmp_path, tiny_tokenizer_path, style="BIAS")


@pytest.fixture
def lora_files(tmp_path, tiny_tokenizer_path) -> of.OfficialFiles:
    return of.write_official(tmp_path, tiny_tokenizer_path, style="LORA")


# -- the fixture files are upstream's layout --------------------------------------------------------


def _collapse(path: Path, strip: str = "") -> list[tuple[str, tuple[int, ...]]]:
    rows, seen = [], set()
    for line in path.read_text().splitlines():
        name, rest = line.split(" ", 1)
        shape = tuple(int(d) for d in rest.rsplit(" ", 1)[0].strip("()").split(",") if d.strip())
        name = re.sub(r"^llama\.layers\.\d+\.", "llama.layers.{L}.", name)
        name = re.sub(r"^visual_blocks\.\d+\.", "visual_blocks.{B}.", name)
        name = re.sub(r"^clip\.visual\.transformer\.resblocks\.\d+\.", "clip.visual.transformer.resblocks.{R}.", name)
        if name not in seen:
            seen.add(name)
            rows.append((name, shape))
    return rows


def test_fixture_tables_are_the_released_key_lists():
    bias = _collapse(of.KEYS / "llama_adapter_v2_7b_bias_adapter_ckpt.txt")
    lora = _collapse(of.KEYS / "llama_adapter_v2_7b_lora_adapter_ckpt.txt")
    full = _collapse(of.KEYS / "llama_adapter_v2_7b_full_model_lora.txt")
    table = of.parse(of.ADAPTER_7B)
    assert sorted((p, s) for _, p, s in table) == sorted(lora)
    assert sorted((p, s) for t, p, s in table if t == "B") == sorted(bias)
    # Meta's weights: the llama.* weights that are not LoRA (the norms are in both)
    base = [(p[len("llama."):], s) for p, s in full
            if p.startswith("llama.") and p.endswith(".weight") and "lora_" not in p]
    assert sorted((p, s) for _, p, s in of.parse(of.BASE_7B)) == sorted(base)
    clip = [(p[len("clip."):], s) for p, s in full if p.startswith("clip.")]
    assert sorted((p, s) for _, p, s in of.parse(of.CLIP_7B)) == sorted(clip)
    # and the tiny files expand the patterns to the full lists (32 layers, 8 blocks)
    spec = of.TinySpec(n_layers=32, v_depth=8)
    names = {line.split(" ")[0] for line in (of.KEYS / "llama_adapter_v2_7b_bias_adapter_ckpt.txt")
             .read_text().splitlines()}
    assert set(of.adapter_state_dict(spec, "BIAS")) == names


# -- loading: every tensor from the right file into the right parameter --------------------------------


def test_bias_checkpoint_loads_every_tensor_from_the_files(bias_files, tiny_tokenizer):
    model = load(bias_files)
    got = model.state_dict()
    adapter = read(bias_files.adapter)
    base = base_from_files(bias_files.llama_dir)
    clip = read(bias_files.clip)
    assert "rope.freqs" in base and "layers.0.attention.inner_attention.rope.freqs" in base  # ignored

    seen = set()
    for key, value in adapter["model"].items():  # the adapter checkpoint, key for key
        assert torch.equal(got[key], value), key
        seen.add(key)
    for key, value in base.items():  # Meta's weights under llama.; the adapter's norms win
        if "rope.freqs" in key:
            continue
        mine = got["llama." + key]
        if "llama." + key in adapter["model"]:
            assert key.endswith("norm.weight")
            assert not torch.equal(mine, value.float()), key
        else:
            assert torch.equal(mine, value.float()), key
        seen.add("llama." + key)
    visual = {k: v for k, v in clip.items() if k.startswith("visual.")}
    ours = to_openai_visual({k[len("clip.visual."):]: v for k, v in got.items() if k.startswith("clip.visual.")})
    assert set(ours) == set(visual)
    for key, value in visual.items():
        assert torch.equal(ours[key], value.float()), key
    # and a few by hand, not through the key mapping
    assert torch.equal(model.clip.visual.patch_embed.proj.weight, clip["visual.conv1.weight"].float())
    assert torch.equal(model.clip.visual.head.weight, clip["visual.proj"].float().t())
    assert torch.equal(model.clip.visual.cls_token.flatten(), clip["visual.class_embedding"].float())
    seen |= {k for k in got if k.startswith("clip.visual.")}
    assert seen == set(got)  # nothing in the model that no file provided

    cfg = model.config
    spec = bias_files.spec
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.multiple_of, cfg.norm_eps) == (64, 4, 4, 32, 1e-6)
    assert cfg.vocab_size == tiny_tokenizer.n_words == model.llama.tok_embeddings.weight.shape[0]
    assert (model.query_len, model.query_layer) == (spec.query_len, spec.query_layer) == (10, 2)
    assert (cfg.v_embed_dim, cfg.v_depth, cfg.v_mlp_ratio) == (32, 2, 4.0)
    assert (cfg.w_bias, cfg.w_lora, cfg.w_new_gate) == (True, False, False)
    assert cfg.v_num_heads == model.visual_blocks[0].attn.num_heads == 16  # upstream's default
    assert cfg.clip == ClipVisionConfig(image_size=16, patch_size=8, width=64, layers=2, heads=1, output_dim=48)
    assert cfg.max_seq_len == 512 and not model.training
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in got.values())


def test_lora_checkpoint_infers_lora_rank_and_new_gate(lora_files):
    model = load(lora_files)
    adapter = read(lora_files.adapter)["model"]
    got = model.state_dict()
    assert (model.config.w_lora, model.config.lora_rank, model.config.w_new_gate) == (True, 2, True)
    assert model.llama.layers[0].attention.lora_wq_l1.weight.shape == (2, 64)
    for key, value in adapter.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(model.llama.layers[3].attention.new_gate, adapter["llama.layers.3.attention.new_gate"])


def test_counts_after_surgery_are_read_from_the_tensors(tmp_path, tiny_tokenizer_path):
    spec = of.TinySpec(query_len=5, query_layer=3, lora_rank=3, v_depth=3, v_embed_dim=48, v_mlp_ratio=2.0)
    files = of.write_official(tmp_path, tiny_tokenizer_path, spec, style="LORA")
    model = load(files)  # no flags
    assert (model.query_len, model.query_layer) == (5, 3)
    assert model.adapter_query.weight.shape == (15, 64) and model.visual_query.weight.shape == (5, 48)
    assert (model.config.v_depth, model.config.v_embed_dim, model.config.v_mlp_ratio) == (3, 48, 2.0)
    assert model.config.lora_rank == 3
    assert torch.equal(model.adapter_query.weight, read(files.adapter)["model"]["adapter_query.weight"])


def test_two_model_parallel_shards_merge_to_the_one_shard_weights(tmp_path, tiny_tokenizer_path):
    one = of.write_official(tmp_path / "one", tiny_tokenizer_path, shards=1)
    two = of.write_official(tmp_path / "two", tiny_tokenizer_path, shards=2)
    shards = [read(p) for p in sorted((two.llama_dir / "7B").glob("consolidated.*.pth"))]
    assert len(shards) == 2
    assert shards[0]["layers.0.attention.wq.weight"].shape == (32, 64)  # really split
    assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shards[0]["tok_embeddings.weight"].shape[1] == 32
    a, b = load(one).state_dict(), load(two).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_merge_shards_rules():
    wq = torch.arange(8.0).reshape(4, 2)
    wo = torch.arange(8.0).reshape(2, 4)
    norm = torch.ones(2)
    shards = [{"layers.0.attention.wq.weight": wq[:2], "layers.0.attention.wo.weight": wo[:, :2], "norm.weight": norm},
              {"layers.0.attention.wq.weight": wq[2:], "layers.0.attention.wo.weight": wo[:, 2:], "norm.weight": norm}]
    merged = merge_shards(shards)
    assert torch.equal(merged["layers.0.attention.wq.weight"], wq)
    assert torch.equal(merged["layers.0.attention.wo.weight"], wo)
    assert torch.equal(merged["norm.weight"], norm)
    bad = [{"norm.weight": torch.ones(2)}, {"norm.weight": torch.zeros(2)}]
    with pytest.raises(CheckpointError, match="different values of the replicated norm.weight"):
        merge_shards(bad)
    single = {"norm.weight": norm}
    assert merge_shards([single]) is single


def test_file_tensors_become_the_parameters_without_a_copy(bias_files, monkeypatch):
    """Built on the meta device and assigned: with the file's dtype on the CPU, each base weight
    is the very tensor torch.load returned (no random init, no second copy of the weights)."""
    seen = {}
    real = loading.read_base_shards

    def spy(folder, n_layers):
        merged, files = real(folder, n_layers)
        seen.update({k: v.data_ptr() for k, v in merged.items()})
        return merged, files

    monkeypatch.setattr(loading, "read_base_shards", spy)
    model = load(bias_files, dtype=torch.float16)  # the shard's dtype
    got = model.state_dict()
    assert got["llama.tok_embeddings.weight"].data_ptr() == seen["tok_embeddings.weight"]
    assert got["llama.layers.2.feed_forward.w2.weight"].data_ptr() == seen["layers.2.feed_forward.w2.weight"]
    assert got["llama.norm.weight"].data_ptr() != seen["norm.weight"]  # the adapter's norm replaced it
    assert {t.dtype for t in got.values()} == {torch.float16}


def test_safetensors_clip_with_upstream_prefix_and_dtype(bias_files, tmp_path):
    path = of.write_clip(tmp_path / "clip.safetensors", bias_files.spec, prefix="clip.visual.")
    model = load_official(bias_files.adapter, bias_files.llama_dir, clip_weights=path, dtype=torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    from safetensors.torch import load_file

    conv = load_file(str(path))["clip.visual.conv1.weight"]
    assert torch.equal(model.clip.visual.patch_embed.proj.weight, conv.to(torch.bfloat16))


def test_v_num_heads_from_argument_and_config(bias_files, tmp_path):
    assert load(bias_files, v_num_heads=4).visual_blocks[0].attn.num_heads == 4
    ckpt = read(bias_files.adapter)
    ckpt["config"]["v_num_heads"] = 8
    torch.save(ckpt, tmp_path / "with_heads.pth")
    model = load_official(tmp_path / "with_heads.pth", bias_files.llama_dir, clip_weights=bias_files.clip)
    assert model.config.v_num_heads == model.visual_blocks[1].attn.num_heads == 8
    with pytest.raises(CheckpointError, match="v_num_heads = 5 does not divide v_embed_dim = 32"):
        load(bias_files, v_num_heads=5)


def test_generation_runs_after_load(lora_files):
    model = load(lora_files)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = model.generate_tokens(images, ["Describe this image.", "What is in the picture?"], max_gen_len=4,
                                temperature=0)
    again = model.generate_tokens(images, ["Describe this image.", "What is in the picture?"], max_gen_len=4,
                                  temperature=0)
    assert out == again and all(len(o) <= 4 for o in out)  # (an early EOS may cut one short)
    logits = model.forward_inference(model.forward_visual(images), torch.tensor([[1, 5, 6], [1, 7, 8]]), 0)
    assert logits.shape == (2, model.config.vocab_size) and torch.isfinite(logits).all()
    assert all(isinstance(s, str) for s in model.generate(images[:1], ["Describe this image."], max_gen_len=3,
                                                          temperature=0))


# -- save_official ---------------------------------------------------------------------------------


def _regrow(model: nn.Module, query_len: int, query_layer: int) -> None:
    """Change the counts as surgery would (new rows from a seeded generator)."""
    gen = torch.Generator().manual_seed(7)
    model.visual_query = nn.Embedding(query_len, model.visual_query.weight.shape[1])
    model.adapter_query = nn.Embedding(query_len * query_layer, model.adapter_query.weight.shape[1])
    with torch.no_grad():
        model.visual_query.weight.normal_(generator=gen)
        model.adapter_query.weight.normal_(generator=gen)
    model.query_len = model.config.query_len = query_len
    model.query_layer = model.config.query_layer = query_layer
    model.drop_caches()


@pytest.mark.parametrize("style", ["BIAS", "LORA"])
def test_save_official_round_trip_after_changing_counts(tmp_path, tiny_tokenizer_path, style):
    files = of.write_official(tmp_path, tiny_tokenizer_path, style=style)
    model = load(files, v_num_heads=4)
    _regrow(model, 5, 3)
    path = save_official(model, tmp_path / "edited.pth")

    saved = read(path)  # plain containers and tensors: readable weights-only
    assert set(saved) == {"model", "config"}
    # exactly the released key set of this style, at the new counts
    assert set(saved["model"]) == set(of.adapter_state_dict(files.spec, style))
    assert saved["model"]["adapter_query.weight"].shape == (15, 64)
    cfg = saved["config"]
    assert (cfg["w_bias"], cfg["w_lora"], cfg["w_new_gate"]) == (True, style == "LORA", style == "LORA")
    assert (cfg["query_len"], cfg["query_layer"], cfg["v_num_heads"], cfg["v_depth"]) == (5, 3, 4, 2)

    again = load_official(path, files.llama_dir, clip_weights=files.clip)  # no flags
    assert (again.query_len, again.query_layer, again.config.v_num_heads) == (5, 3, 4)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_save_official_after_surgery_resize(tmp_path, bias_files):
    import surgery
    from surgery.plugins import PluginHost, get_host, reset_host
    from surgery_plugins.llama_adapter import plugin

    model = load(bias_files)
    old = None
    if plugin.BACKBONE not in get_host().backbones:  # not installed as an entry point (yet): add it here
        host = PluginHost()
        host.add_plugin(plugin, "llama_adapter")
        old = reset_host(host)
    try:
        surgery.resize(model, query_len=5, query_layer=3)
    finally:
        if old is not None:
            reset_host(old)
    path = save_official(model, tmp_path / "resized.pth")
    again = load_official(path, bias_files.llama_dir, clip_weights=bias_files.clip)
    assert (again.query_len, again.query_layer) == (5, 3)
    assert torch.equal(again.adapter_query.weight, model.adapter_query.weight)
    assert torch.equal(again.visual_query.weight, model.visual_query.weight)


def test_save_official_refuses_counts_out_of_step(bias_files, tmp_path):
    model = load(bias_files)
    model.query_len = 4  # changed by hand, the tensors not
    with pytest.raises(CheckpointError, match="query_len = 4 disagrees with its tensors"):
        save_official(model, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


# -- errors --------------------------------------------------------------------------------------


def test_unexpected_adapter_keys_are_listed(tmp_path, tiny_tokenizer_path):
    def edit(sd):
        sd["llama.layers.0.attention.bogus"] = torch.zeros(1)
        sd["extra_head.weight"] = torch.zeros(2, 2)

    files = of.write_official(tmp_path, tiny_tokenizer_path)
    of.write_adapter(files.adapter, files.spec, edit=edit)
    with pytest.raises(CheckpointError, match="2 unexpected key") as info:
        load(files)
    assert "llama.layers.0.attention.bogus" in str(info.value) and "extra_head.weight" in str(info.value)


def test_lora_keys_in_some_layers_only_are_missing_keys(tmp_path, tiny_tokenizer_path):
    files = of.write_official(tmp_path, tiny_tokenizer_path, style="LORA")
    of.write_adapter(files.adapter, files.spec, "LORA",
                     edit=lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("llama.layers.2.") and "lora" in k])
    with pytest.raises(CheckpointError, match="lacks 14 adapter key") as info:
        load(files)
    assert "llama.layers.2.attention.lora_wq_l1.weight" in str(info.value)


@pytest.mark.parametrize("key", ["visual_query.weight", "adapter_query.weight", "clip_proj.weight"])
def test_adapter_without_its_essential_parts(tmp_path, tiny_tokenizer_path, key):
    files = of.write_official(tmp_path, tiny_tokenizer_path)
    of.write_adapter(files.adapter, files.spec, edit=lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load(files)


@pytest.mark.parametrize("key", ["llama.layers.1.attention.gate", "visual_blocks.1.mlp.fc2.bias",
                                 "visual_proj_norm.bias", "llama.layers.3.feed_forward.w2.bias"])
def test_missing_adapter_keys_are_listed(tmp_path, tiny_tokenizer_path, key):
    files = of.write_official(tmp_path, tiny_tokenizer_path)
    of.write_adapter(files.adapter, files.spec, edit=lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"lacks 1 adapter key.*" + re.escape(key)):
        load(files)


def test_unexpected_base_key_is_an_error_but_rope_freqs_are_not(bias_files):
    path = bias_files.llama_dir / "7B" / "consolidated.00.pth"
    sd = read(path)
    assert "rope.freqs" in sd
    sd["layers.0.attention.extra.weight"] = torch.zeros(2)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*layers\.0\.attention\.extra\.weight"):
        load(bias_files)
    del sd["layers.0.attention.extra.weight"], sd["layers.3.ffn_norm.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"lack keys.*layers\.3\.ffn_norm\.weight"):
        load(bias_files)


def test_config_that_contradicts_the_tensors(bias_files, tmp_path):
    ckpt = read(bias_files.adapter)
    ckpt["config"]["w_lora"] = True  # but no LoRA tensors
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="config says w_lora = True but its tensors hold w_lora = False"):
        load_official(tmp_path / "bad.pth", bias_files.llama_dir, clip_weights=bias_files.clip)


def test_adapter_for_another_model_size(tmp_path, tiny_tokenizer_path):
    files = of.write_official(tmp_path, tiny_tokenizer_path)
    of.write_adapter(files.adapter, of.TinySpec(dim=128))
    with pytest.raises(CheckpointError, match=r"dim 128 .* holds dim 64.*wrong llama_type"):
        load(files)
    of.write_adapter(files.adapter, of.TinySpec(n_layers=6))
    with pytest.raises(CheckpointError, match="6 LLaMA layers but .* n_layers = 4"):
        load(files)


def test_clip_of_the_wrong_width(bias_files, tmp_path):
    path = of.write_clip(tmp_path / "other.pth", of.TinySpec(clip_out=40))
    with pytest.raises(CheckpointError, match="40-wide features but the adapter's clip_proj takes 48"):
        load_official(bias_files.adapter, bias_files.llama_dir, clip_weights=path)


def test_missing_files(bias_files, tmp_path):
    with pytest.raises(CheckpointError, match=r"params\.json does not exist.*llama_type"):
        load_official(bias_files.adapter, bias_files.llama_dir, "13B", bias_files.clip)
    with pytest.raises(CheckpointError, match="LLaMA folder .* does not exist"):
        load_official(bias_files.adapter, tmp_path / "nowhere", "7B", bias_files.clip)
    with pytest.raises(CheckpointError, match="adapter checkpoint .* does not exist"):
        load_official(tmp_path / "none.pth", bias_files.llama_dir, "7B", bias_files.clip)
    with pytest.raises(CheckpointError, match=r"does not exist; BIAS-7B is the name of an upstream release.*"
                                              r"releases/download/v\.2\.0\.0/7fa55208"):
        load_official("BIAS-7B", bias_files.llama_dir, "7B", bias_files.clip)
    with pytest.raises(CheckpointError, match="no CLIP weights: pass clip_weights="):
        load_official(bias_files.adapter, bias_files.llama_dir, "7B")
    (bias_files.llama_dir / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer .*tokenizer\.model does not exist"):
        load(bias_files)


def test_missing_or_misnamed_shards(bias_files):
    folder = bias_files.llama_dir / "7B"
    (folder / "consolidated.00.pth").rename(folder / "weights.pth")
    with pytest.raises(CheckpointError, match=r"no LLaMA weights .* found weights\.pth"):
        load(bias_files)
    (folder / "weights.pth").rename(folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="not consolidated.00.pth .* in sequence"):
        load(bias_files)


def test_params_json_problems(bias_files):
    params = bias_files.llama_dir / "7B" / "params.json"
    params.write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load(bias_files)
    params.write_text(json.dumps({"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2}))
    with pytest.raises(CheckpointError, match="does not implement: n_kv_heads"):
        load(bias_files)
    params.write_text(json.dumps({"dim": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 32000}))
    with pytest.raises(CheckpointError, match="vocab_size = 32000 but .* has 200 pieces"):
        load(bias_files)


@pytest.mark.parametrize("which", ["adapter", "shard", "clip", "tokenizer"])
def test_corrupt_files_are_clear_errors(bias_files, which):
    path = {"adapter": bias_files.adapter, "clip": bias_files.clip,
            "shard": bias_files.llama_dir / "7B" / "consolidated.00.pth",
            "tokenizer": bias_files.llama_dir / "tokenizer.model"}[which]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=re.escape(path.name)):
        load(bias_files)


class _Trap:
    """Pickles as a call of Path.touch: a file appears if the pickle is ever run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("which", ["adapter", "shard", "clip"])
def test_malicious_pickles_are_refused_unrun(bias_files, tmp_path, which):
    marker = tmp_path / "ran"
    path = {"adapter": bias_files.adapter, "clip": bias_files.clip,
            "shard": bias_files.llama_dir / "7B" / "consolidated.00.pth"}[which]
    obj = read(path)
    obj["trap"] = _Trap(marker)
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load(bias_files)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_clip_is_refused_with_the_conversion(bias_files, tmp_path):
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript archive") as info:
        load_official(bias_files.adapter, bias_files.llama_dir, clip_weights=path)
    assert "torch.jit.load('ViT-L-14.pt'" in str(info.value) and "clip_weights=" in str(info.value)


def test_clip_file_with_foreign_keys(bias_files, tmp_path):
    sd = read(bias_files.clip)
    sd["something.else"] = torch.zeros(1)
    torch.save(sd, tmp_path / "clip.pth")
    with pytest.raises(CheckpointError, match="not CLIP's: something.else"):
        load_official(bias_files.adapter, bias_files.llama_dir, clip_weights=tmp_path / "clip.pth")


def test_random_clip_only_when_asked(bias_files):
    cfg = ClipVisionConfig(image_size=16, patch_size=8, width=64, layers=1, heads=1, output_dim=48)
    model = load_official(bias_files.adapter, bias_files.llama_dir, allow_random_clip=True, clip_config=cfg)
    again = load_official(bias_files.adapter, bias_files.llama_dir, allow_random_clip=True, clip_config=cfg)
    assert torch.equal(model.clip.visual.head.weight, again.clip.visual.head.weight)  # seeded
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.equal(model.visual_query.weight, read(bias_files.adapter)["model"]["visual_query.weight"])


# -- helpers -------------------------------------------------------------------------------------


def test_adapter_hparams_reads_the_released_7b_shapes():
    """The inference rules on the real 7B key set (meta tensors: shapes only)."""
    sd = {}
    for tag, pattern, shape in of.parse(of.ADAPTER_7B):
        for i in range(32) if "{L}" in pattern else range(8) if "{B}" in pattern else [0]:
            sd[pattern.format(L=i, B=i)] = torch.empty(shape, device="meta")
    hp = adapter_hparams(sd, {"w_bias": True, "w_lora": True, "lora_rank": 16})
    assert hp == {"query_len": 10, "query_layer": 31, "v_embed_dim": 768, "dim": 4096, "v_depth": 8,
                  "v_mlp_ratio": 4.0, "clip_dim": 768, "n_layers_seen": 32, "w_bias": True, "w_lora": True,
                  "lora_rank": 16, "w_new_gate": True, "v_num_heads": 16}
    bias = {k: v for k, v in sd.items() if "lora" not in k and "new_gate" not in k}
    assert len(bias) == 363
    hp = adapter_hparams(bias, {"w_bias": True, "w_lora": False, "lora_rank": 16})
    assert (hp["w_lora"], hp["w_new_gate"]) == (False, False)


def test_read_adapter_checkpoint_accepts_a_bare_state_dict(tmp_path, bias_files):
    sd = read(bias_files.adapter)["model"]
    torch.save(sd, tmp_path / "bare.pth")
    got, cfg = read_adapter_checkpoint(tmp_path / "bare.pth")
    assert cfg == {} and got.keys() == sd.keys()
    assert loading.is_adapter_key("llama.layers.0.attention_norm.weight")
    assert not loading.is_adapter_key("llama.layers.0.attention.wq.weight")
    assert loading.is_adapter_key("llama.layers.0.attention.wq.bias")
    assert not loading.is_adapter_key("clip.visual.cls_token")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_straight_to_cuda(lora_files):
    """device='cuda': float16 by default, each tensor moved once (peak GPU memory = the model),
    and the same logits as the float32 CPU model, within float16's precision."""
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = load(lora_files, device="cuda")
    sd = model.state_dict()
    assert {t.device.type for t in sd.values()} == {"cuda"} and {t.dtype for t in sd.values()} == {torch.float16}
    size = sum(t.numel() * t.element_size() for t in sd.values())
    assert torch.cuda.max_memory_allocated() - before <= size * 1.05 + 2**20
    cpu = load(lora_files)
    images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[1, 5, 6, 7]])
    want = cpu.forward_inference(cpu.forward_visual(images), tokens, 0)
    got = model.forward_inference(model.forward_visual(images.cuda()), tokens.cuda(), 0)
    torch.testing.assert_close(got.cpu(), want, atol=2e-2, rtol=2e-2)
    assert len(model.generate_tokens(images.cuda(), ["Describe this image."], max_gen_len=3, temperature=0)[0]) <= 3
