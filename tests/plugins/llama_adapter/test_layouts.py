"""The released adapter checkpoints through `surgery inspect` / `resize` / `load` (the layout hook).

The files are written from the released key lists (tests/data/keys, upstream's names and 7B shapes)
and from `official_files` (the same layout scaled down), not from our model; the resized file is
checked against upstream's semantics of the two counts, written out here: `visual_query` keeps its
first rows, `adapter_query` seen as (query_layer, query_len, dim) keeps the first queries of every
layer, and only those two tensors change.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import official_files as of
import surgery
import surgery.state
from surgery.cli import main
from surgery.layouts import read_any
from surgery_plugins.llama_adapter.loading import load_official
from surgery_plugins.llama_adapter.tokenizer import SHIPPED_TOKENIZER

KEYS = Path(__file__).resolve().parents[2] / "data" / "keys"
# the official files of llama_adapter_v2_tiny's architecture (its config "tiny"), 5 queries instead of 3
TINY = of.TinySpec(dim=64, n_layers=4, n_heads=4, multiple_of=32, v_embed_dim=32, v_depth=2, v_num_heads=2,
                   query_len=5, query_layer=3, lora_rank=4, clip_width=128, clip_layers=2, clip_patch=14,
                   clip_grid=2, clip_out=32)
TINY_CONFIG = {"w_bias": True, "w_lora": True, "lora_rank": 4, "v_num_heads": 2}


def released(name: str) -> dict[str, torch.Tensor]:
    """A released key list as tensors of its shapes (one stored element each: stride 0)."""
    sd = {}
    for line in (KEYS / name).read_text().splitlines():
        m = re.match(r"^(\S+) \(([\d, ]*)\)", line)
        if m:
            sd[m.group(1)] = torch.zeros(()).expand(tuple(int(d) for d in m.group(2).split(",") if d.strip()))
    return sd


@pytest.mark.parametrize("name, kwargs", [
    ("llama_adapter_v2_7b_bias_adapter_ckpt.txt", {"query_len": 10, "query_layer": 31}),
    ("llama_adapter_v2_7b_lora_adapter_ckpt.txt", {"query_len": 10, "query_layer": 31, "w_lora": True,
                                                    "w_new_gate": True}),
])
def test_the_released_7b_adapters_are_llama_adapter_v2_7b(tmp_path, name, kwargs):
    path = tmp_path / "adapter.pth"
    torch.save({"model": released(name), "config": {"w_bias": True, "w_lora": "lora" in name, "lora_rank": 16}},
               path)
    _, _, layout = read_any(path)
    assert (layout.plugin, layout.model, dict(layout.model_kwargs), layout.partial) == \
        ("llama_adapter_v2", "llama_adapter_v2_7b", kwargs, True)


@pytest.fixture
def tiny_adapter(tmp_path) -> Path:
    return of.write_adapter(tmp_path / "LORA.pth", TINY, "LORA", config=TINY_CONFIG)


def test_inspect_and_resize_a_tiny_adapter_end_to_end(tiny_adapter, tmp_path, capsys):
    source = torch.load(tiny_adapter, weights_only=True)["model"]
    assert main(["inspect", str(tiny_adapter)]) == 0
    shown = capsys.readouterr().out
    assert "llama_adapter_v2_tiny (named by the file's layout)" in shown
    assert "counts:   query_len=5, query_layer=3" in shown and "partial" in shown
    out = tmp_path / "q2.pth"
    assert main(["resize", str(tiny_adapter), "--set", "query_len=2", "-o", str(out)]) == 0
    written = torch.load(out, weights_only=True)
    assert written["model"].keys() == source.keys()
    assert torch.equal(written["model"]["visual_query.weight"], source["visual_query.weight"][:2])
    table = source["adapter_query.weight"].view(3, 5, 64)[:, :2].reshape(6, 64)
    assert torch.equal(written["model"]["adapter_query.weight"], table)
    changed = {"visual_query.weight", "adapter_query.weight"}
    assert all(torch.equal(written["model"][k], v) for k, v in source.items() if k not in changed)
    assert (written["config"]["query_len"], written["config"]["query_layer"]) == (2, 3)
    # the file is the official layout: the official loader takes it, with the rest of the official files
    llama_dir = of.write_llama_dir(tmp_path / "llama", TINY, SHIPPED_TOKENIZER)
    clip = of.write_clip(tmp_path / "clip.pth", TINY)
    model = load_official(out, llama_dir, clip_weights=clip)
    assert (model.query_len, model.query_layer) == (2, 3)


def test_a_model_from_load_official_saved_by_surgery_opens_by_name(tiny_adapter, tmp_path, capsys):
    llama_dir = of.write_llama_dir(tmp_path / "llama", TINY, SHIPPED_TOKENIZER)
    clip = of.write_clip(tmp_path / "clip.pth", TINY)
    model = load_official(tiny_adapter, llama_dir, clip_weights=clip)
    assert surgery.state.model_state(model).model_name == "llama_adapter_v2_tiny"
    surgery.save(model, tmp_path / "saved.safetensors")
    assert main(["inspect", str(tmp_path / "saved.safetensors")]) == 0
    assert "llama_adapter_v2_tiny (named by checkpoint metadata)" in capsys.readouterr().out
    fresh = surgery.build("llama_adapter_v2_tiny")
    surgery.load(tmp_path / "saved.safetensors", fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_broken_adapter_is_one_line_and_nothing_is_written(tmp_path, capsys):
    broken = of.write_adapter(tmp_path / "broken.pth", TINY, "LORA", config=TINY_CONFIG,
                              edit=lambda sd: sd.pop("llama.layers.2.attention.gate"))
    out = tmp_path / "out.pth"
    assert main(["resize", str(broken), "--set", "query_len=2", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks 1 adapter key(s)" in err[0] and "llama.layers.2.attention.gate" in err[0]
    assert not out.exists()


def test_an_out_of_another_format_is_refused_before_writing(tiny_adapter, tmp_path, capsys):
    out = tmp_path / "q2.safetensors"
    assert main(["resize", str(tiny_adapter), "--set", "query_len=2", "-o", str(out)]) == 1
    assert "give OUT a .pth name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tiny_adapter]


def test_an_adapter_of_no_registered_architecture_needs_model(tmp_path, capsys):
    path = of.write_adapter(tmp_path / "BIAS.pth", of.TinySpec(), "BIAS")  # dim 64, v_num_heads 16: none fits
    _, _, layout = read_any(path)
    assert layout.model is None and layout.partial
    assert main(["inspect", str(path)]) == 1
    assert "no registered model has; pass --model NAME" in capsys.readouterr().err
