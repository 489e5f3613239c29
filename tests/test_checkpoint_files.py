"""Checkpoint files and recipes from untrusted hands, and the errors they meet (issue 13 items 4-5,
issue 14 item 23).

A hostile recipe must cost no more than the file's own tensors: the resizes a load makes are
recorded (the engine's apply wrapped) and compared with the counts the file's tensors have.
Saved files are checked on disk: their mode against the umask, their names, what is left
beside them. Loaded models are compared tensor by tensor with the model that was saved.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import surgery
import surgery.checkpoint
from surgery.engine import Recipe
from surgery.transaction import Transaction
from surgery.errors import BackboneError, CheckpointError, RecipeError, ResizeError


def rewrite_metadata(path, **entry) -> None:
    """Change fields of a saved file's "surgery" metadata entry, keeping its tensors."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(metadata["surgery"])
    info.update(entry)
    metadata["surgery"] = json.dumps(info)
    save_file(tensors, str(path), metadata=metadata)


def step(site: str, old: int, new: int, init: str = "zeros") -> dict:
    return {"site": site, "from": old, "to": new, "init": init, "shrink": "truncate", "seed": 0}


@pytest.fixture
def resizes(monkeypatch):
    """Every {site: count} a load asks the engine to change (the sites whose count differs)."""
    asked: list[dict] = []

    class Recording(Transaction):
        def resize(self, requested, *args, **kwargs):
            changing = {n: c for n, c in requested.items() if n in self.declared and self.declared[n].count != c}
            asked.extend([changing] if changing else [])
            return super().resize(requested, *args, **kwargs)

    monkeypatch.setattr(surgery.checkpoint, "Transaction", Recording)
    return asked


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- item 13.4: a hostile recipe is bounded by the net change ----------------------------------------


def test_a_recipe_through_two_million_tokens_is_not_replayed(tmp_path, resizes):
    saved = surgery.build("vit_tiny_test")
    surgery.resize(saved, reg_tokens=2, init="normal")
    path = tmp_path / "reg2.safetensors"
    surgery.save(saved, path)
    hostile = [step("reg_tokens", 0, 2_000_000), step("reg_tokens", 2_000_000, 2)]
    rewrite_metadata(path, recipe={"backbone": "timm_vit", "steps": hostile})

    fresh = surgery.build("vit_tiny_test")
    result = surgery.load(path, fresh)
    assert max(c for asked in resizes for c in asked.values()) == 2  # never beyond the file's tensors
    assert_same_weights(fresh, saved)
    assert result.replayed and surgery.recipe(fresh).steps == tuple(hostile)  # kept as its history


def test_twenty_thousand_steps_cost_one_resize(tmp_path, resizes):
    saved = surgery.build("vit_tiny_test")
    surgery.resize(saved, reg_tokens=2)
    path = tmp_path / "reg2.safetensors"
    surgery.save(saved, path)
    walk = [step("reg_tokens", 0, 1)] + [step("reg_tokens", 1 + i % 2, 2 - i % 2) for i in range(19_998)]
    walk.append(step("reg_tokens", 1, 2))
    rewrite_metadata(path, recipe={"backbone": "timm_vit", "steps": walk})
    fresh = surgery.build("vit_tiny_test")
    surgery.load(path, fresh)
    assert resizes == [{"reg_tokens": 2}]
    assert len(surgery.recipe(fresh).steps) == 20_000
    assert_same_weights(fresh, saved)


@pytest.mark.parametrize("steps, mentions", [
    ([step("reg_tokens", 0, 5), step("reg_tokens", 3, 2)],
     "takes reg_tokens from 3, but the steps before leave it at 5"),
    ([step("no_such_site", 0, 2)], "names site 'no_such_site'"),
    ([step("class_token", 1, 7), step("class_token", 7, 1), step("reg_tokens", 0, 2)], "class_token=7"),
], ids=["broken-chain", "unknown-site", "count-not-allowed"])
def test_an_inconsistent_recipe_is_refused_and_changes_nothing(tmp_path, steps, mentions):
    saved = surgery.build("vit_tiny_test")
    surgery.resize(saved, reg_tokens=2)
    path = tmp_path / "reg2.safetensors"
    surgery.save(saved, path)
    rewrite_metadata(path, recipe={"backbone": "timm_vit", "steps": steps})
    fresh = surgery.build("vit_tiny_test")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=mentions):
        surgery.load(path, fresh)
    assert surgery.counts(fresh) == {"class_token": 1, "reg_tokens": 0} and surgery.recipe(fresh).steps == ()
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_recipe_that_does_not_reach_the_files_counts_is_not_kept(tmp_path):
    saved = surgery.build("vit_tiny_test")
    surgery.resize(saved, reg_tokens=2)
    path = tmp_path / "reg2.safetensors"
    surgery.save(saved, path)
    rewrite_metadata(path, recipe={"backbone": "timm_vit", "steps": [step("reg_tokens", 0, 6)]})
    fresh = surgery.build("vit_tiny_test")
    result = surgery.load(path, fresh)
    assert not result.replayed and surgery.counts(fresh)["reg_tokens"] == 2  # the tensors decide
    assert [(s["from"], s["to"]) for s in surgery.recipe(fresh).steps] == [(0, 2)]
    assert_same_weights(fresh, saved)


# -- item 14.23: malformed recipes and metadata are typed errors ---------------------------------------


@pytest.mark.parametrize("text, mentions", [
    ("{}", "a recipe is an object"),
    ('{"backbone": "timm_vit", "steps": [{"site": "reg_tokens", "fsom": 0, "to": 1, "init": "zeros", '
     '"shrink": "truncate", "seed": 0}]}', "step 1: expected the fields site, from, to, init, shrink, seed"),
    ('{"backbone": "timm_vit", "steps": [{"site": "reg_tokens", "from": 0, "to": "1", "init": "zeros", '
     '"shrink": "truncate", "seed": 0}]}', "step 1: to must be a count"),
    ('{"backbone": "timm_vit", "steps": [{"site": "reg_tokens", "from": 0, "to": 1, "init": "os.system", '
     '"shrink": "truncate", "seed": 0}]}', "unknown strategy 'os.system'"),
    ("[" * 100_000, "not valid JSON"),
    ("not json", "not valid JSON"),
], ids=["empty", "flipped-key", "mistyped-count", "unknown-strategy", "deep-nesting", "not-json"])
def test_recipe_from_json_names_what_is_wrong(text, mentions):
    with pytest.raises(RecipeError, match=mentions.replace("(", "\\(")):
        Recipe.from_json(text)


def test_a_flipped_bit_in_a_saved_recipe_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "reg2.safetensors"
    saved = surgery.build("vit_tiny_test")
    surgery.resize(saved, reg_tokens=2)
    surgery.save(saved, path)
    raw = path.read_bytes()
    flipped = raw.replace(b'\\"from\\"', b'\\"fsom\\"', 1)  # one bit: 'r' (0x72) -> 's' (0x73)
    assert flipped != raw
    path.write_bytes(flipped)
    with pytest.raises(CheckpointError, match="recipe step 1: expected the fields"):
        surgery.load(path, surgery.build("vit_tiny_test"))


def test_deeply_nested_metadata_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"surgery": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="nested too deeply"):
        surgery.checkpoint.read_checkpoint(path)


def test_wrong_backbone_is_a_backbone_error():
    vit = surgery.build("vit_tiny_test")
    for backbone, mentions in (("llama_adapter_v2", "does not recognise a model of type VisionTransformer"),
                               ("no_such", "is not a registered backbone; known: "), (3, "backbone=3")):
        for call in (lambda: surgery.resize(vit, reg_tokens=1, backbone=backbone),
                     lambda: surgery.sites(vit, backbone), lambda: surgery.counts(vit, backbone),
                     lambda: surgery.tokens(vit, reg_tokens=1, backbone=backbone).__enter__()):
            with pytest.raises(BackboneError, match=mentions):
                call()
    assert surgery.counts(vit, "timm_vit") == {"class_token": 1, "reg_tokens": 0}


def test_bytes_paths_save_and_load(tmp_path):
    saved = surgery.build("vit_tiny_test")
    surgery.resize(saved, reg_tokens=1)
    path = os.fsencode(tmp_path / "b.safetensors")
    surgery.save(saved, path)
    fresh = surgery.build("vit_tiny_test")
    surgery.load(path, fresh)
    assert_same_weights(fresh, saved)
    with pytest.raises(CheckpointError, match="must be a str, bytes or os.PathLike, not a int"):
        surgery.load(3, fresh)


def test_a_huge_count_fails_with_one_line_and_no_cpp_stack():
    code = ("import surgery\n"
            "m = surgery.build('vit_tiny_test')\n"
            "try:\n"
            "    surgery.resize(m, reg_tokens=2**50)\n"  # 2**57 bytes: beyond any address space
            "except surgery.errors.ResizeError as e:\n"
            "    print(repr(str(e)))\n")
    env = {**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "1", "TORCH_DISABLE_ADDR2LINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    message = result.stdout.strip()
    assert "can't allocate memory" in message, result.stderr[-2000:]
    assert "\\n" not in message and "CapturedTraceback" not in message and "frame #" not in message


def test_a_plugin_error_carrying_a_cpp_stack_is_cut_to_its_message(toy_host, monkeypatch):
    from toy_backbone import ToyModel

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory\nException raised from malloc at alloc.cpp:1 (most recent call first):\n"
                           "frame #0: c10::Error::Error()")

    monkeypatch.setitem(surgery.strategies.GROWTH, "zeros", fails)
    with pytest.raises(ResizeError) as caught:
        surgery.resize(ToyModel(), prompts=4, init="zeros")
    assert "RuntimeError: out of memory" in str(caught.value)
    assert "\n" not in str(caught.value) and "frame #" not in str(caught.value)


# -- item 13.5: files honour the umask; temporary names stay short ---------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_have_the_umasks_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = surgery.save(surgery.build("vit_tiny_test"), tmp_path / "m.safetensors")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # any new file, for reference
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode) == 0o666 & ~umask


def test_a_long_file_name_saves(tmp_path):
    name = "m" * (250 - len(".safetensors")) + ".safetensors"  # 250 bytes: the file system takes 255
    path = surgery.save(surgery.build("vit_tiny_test"), tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    fresh = surgery.build("vit_tiny_test")
    surgery.load(path, fresh)
