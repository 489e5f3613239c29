"""ImageBind-LLM's released 7B.pth through `surgery inspect` / `resize` / `load` (the layout hook).

The files are `ibllm_files`' (upstream's 7B.pth names and shapes, scaled down), not our model's.
Upstream's semantics of query_layer L: `prefix_query` has one row per adapted layer, for the last L
layers, so shrinking keeps the last rows; nothing else in the file changes.
"""

from __future__ import annotations

import torch

import ibllm_files as F
import surgery
import surgery.state
from surgery.cli import main
from surgery.layouts import read_any
from surgery_plugins.imagebind_llm.loading import load_official
from surgery_plugins.llama_adapter.tokenizer import SHIPPED_TOKENIZER


def test_forms_of_7b_pth_are_recognised_with_their_kwargs(tmp_path):
    for phase, legacy, kwargs in (("finetune", False, {"query_layer": 4}),
                                  ("pretrain", True, {"query_layer": 4, "phase": "pretrain", "legacy_bridge": True})):
        torch.save({"model": F.checkpoint_state_dict(phase, legacy)}, tmp_path / "7B.pth")
        _, _, layout = read_any(tmp_path / "7B.pth")
        assert (layout.plugin, layout.model, dict(layout.model_kwargs), layout.partial) == \
            ("imagebind_llm", "imagebind_llm_tiny", kwargs, True)


def test_inspect_and_resize_7b_pth_end_to_end(tmp_path, capsys):
    files = F.write_official(tmp_path, SHIPPED_TOKENIZER)
    source = torch.load(files.checkpoint, weights_only=True)["model"]
    assert main(["inspect", str(files.checkpoint)]) == 0
    shown = capsys.readouterr().out
    assert "imagebind_llm_tiny (named by the file's layout)" in shown and "query_layer=4" in shown
    out = tmp_path / "q2.pth"
    assert main(["resize", str(files.checkpoint), "--set", "query_layer=2", "-o", str(out)]) == 0
    written = torch.load(out, weights_only=True)["model"]
    assert written.keys() == source.keys()
    assert torch.equal(written["prefix_query.weight"], source["prefix_query.weight"][2:])
    assert all(torch.equal(written[k], v) for k, v in source.items() if k != "prefix_query.weight")
    model = load_official(out, files.llama_dir, files.imagebind, imagebind="tiny_w3d")
    assert model.query_layer == 2
    # the encoder's sites are not the file's: refused, one line, nothing written
    refused = tmp_path / "v2.pth"
    assert main(["resize", str(files.checkpoint), "--set", "num_cls_tokens.vision=2", "-o", str(refused)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "are not in" in err[0] and "sites of this file: query_layer" in err[0]
    assert not refused.exists()


def test_a_broken_7b_pth_names_the_missing_key(tmp_path, capsys):
    files = F.write_official(tmp_path, SHIPPED_TOKENIZER, edit=lambda sd: sd.pop("image_bind_norm_2.weight"))
    assert main(["inspect", str(files.checkpoint)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks 1 key(s)" in err[0] and "image_bind_norm_2.weight" in err[0]


def test_a_model_from_load_official_saved_by_surgery_opens_by_name(tmp_path, capsys):
    files = F.write_official(tmp_path, SHIPPED_TOKENIZER)
    model = load_official(files.checkpoint, files.llama_dir, files.imagebind, imagebind="tiny_w3d")
    assert surgery.state.model_state(model).model_name == "imagebind_llm_tiny"
    surgery.save(model, tmp_path / "saved.safetensors")
    assert main(["inspect", str(tmp_path / "saved.safetensors")]) == 0
    assert "imagebind_llm_tiny (named by checkpoint metadata)" in capsys.readouterr().out
