"""ImageBind's released state dicts through `surgery inspect` / `resize` / `load` (the layout hook).

`imagebind_w3D.pth`'s key list (imagebind_w3d_keys.txt, from upstream's module tree; without the
point keys it is imagebind_huge.pth's 1311) is recognised at its real shapes; tiny files of the same
layout run end to end. Upstream's semantics of a CLS-token count k: `cls_token` is (1, k, D) and the
positional table has k CLS rows before the patches' rows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import surgery
import surgery.state
from surgery.cli import main
from surgery.errors import CheckpointError
from surgery.layouts import read_any
from surgery_plugins.imagebind.loading import imagebind_huge

W3D_KEYS = Path(__file__).with_name("imagebind_w3d_keys.txt")


def w3d_state_dict() -> dict[str, torch.Tensor]:
    """imagebind_w3D.pth's keys at their shapes (one stored element each: stride 0)."""
    sd = {}
    for line in W3D_KEYS.read_text().splitlines():
        m = re.match(r"^(\S+) \(([\d, ]*)\)", line)
        if m:
            sd[m.group(1)] = torch.zeros(()).expand(tuple(int(d) for d in m.group(2).split(",") if d.strip()))
    return sd


def test_the_released_files_are_imagebind_huge_and_huge_w3d(tmp_path):
    full = w3d_state_dict()
    huge = {k: v for k, v in full.items() if not k.startswith("point_trunk.") and ".point." not in k}
    assert len(huge) == 1311
    for sd, model in ((full, "imagebind_huge_w3d"), (huge, "imagebind_huge")):
        torch.save(sd, tmp_path / "ib.pth")  # stride-0 tensors: a few kilobytes
        _, _, layout = read_any(tmp_path / "ib.pth")
        assert (layout.plugin, layout.model, dict(layout.model_kwargs), layout.partial) == \
            ("imagebind", model, {}, False)


@pytest.fixture
def tiny_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sd = surgery.build("imagebind_tiny_test", num_cls_tokens={"vision": 3}).state_dict()
    torch.save(sd, tmp_path / "tiny.pth")
    return tmp_path / "tiny.pth", sd


def test_inspect_and_resize_a_tiny_file_end_to_end(tiny_file, tmp_path, capsys):
    path, source = tiny_file
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "imagebind_tiny_test (named by the file's layout)" in shown and "num_cls_tokens.vision=3" in shown
    out = tmp_path / "v1.safetensors"
    assert main(["resize", str(path), "--set", "num_cls_tokens.vision=1", "-o", str(out)]) == 0
    fresh = surgery.build("imagebind_tiny_test")
    surgery.load(out, fresh)
    now = fresh.state_dict()
    pre = "modality_preprocessors.vision."
    assert torch.equal(now[pre + "cls_token"], source[pre + "cls_token"][:, :1])
    pos = source[pre + "pos_embedding_helper.pos_embed"]
    assert torch.equal(now[pre + "pos_embedding_helper.pos_embed"], torch.cat([pos[:, :1], pos[:, 3:]], 1))
    changed = {pre + "cls_token", pre + "pos_embedding_helper.pos_embed"}
    assert all(torch.equal(now[k], v) for k, v in source.items() if k not in changed)


def test_a_file_of_some_modalities_fits_with_those_and_a_broken_one_is_named(tmp_path):
    torch.manual_seed(0)
    sd = surgery.build("imagebind_tiny_test").state_dict()
    some = {k: v for k, v in sd.items() if ".vision." in k or ".text." in k}
    torch.save(some, tmp_path / "vt.pth")
    _, _, layout = read_any(tmp_path / "vt.pth")
    assert (layout.model, dict(layout.model_kwargs)) == ("imagebind_tiny_test", {"modalities": ["vision", "text"]})
    model = surgery.build("imagebind_tiny_test", modalities=("vision", "text"))
    surgery.load(tmp_path / "vt.pth", model)
    del some["modality_trunks.vision.blocks.1.attn.in_proj_weight"]
    torch.save(some, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"lacks 1 key\(s\).*modality_trunks\.vision\.blocks\.1\.attn"):
        read_any(tmp_path / "broken.pth")


def test_a_model_of_imagebind_huge_loader_saved_by_surgery_opens_by_name(tiny_file, tmp_path, capsys):
    path, _ = tiny_file
    model = imagebind_huge(path, config="tiny", num_cls_tokens={"audio": 2})
    state = surgery.state.model_state(model)
    assert (state.model_name, dict(state.model_kwargs)) == ("imagebind_tiny_test", {"num_cls_tokens": {"vision": 3}})
    surgery.save(model, tmp_path / "saved.safetensors")
    assert main(["inspect", str(tmp_path / "saved.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert "imagebind_tiny_test (named by checkpoint metadata)" in shown
    assert "num_cls_tokens.vision=3" in shown and "num_cls_tokens.audio=2" in shown
