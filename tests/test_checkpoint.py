"""Checkpoints: save/load with token counts, timm checkpoints of other counts, refusals, atomicity.

References are independent of the code under test: models created directly by timm with the
target counts and loaded with plain `torch.nn.Module.load_state_dict`, state dicts sliced by
hand, files compared byte for byte, models compared tensor by tensor with `torch.equal`.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import surgery
from surgery.checkpoint import state_dict_counts
from surgery.engine import model_state
from surgery.errors import CheckpointError, SurgeryError, UnsafeCheckpointError

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def vit(reg: int = 0, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=reg, **TINY, **kw).eval()


def images(model: nn.Module) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(images(model))


def snapshot(model: nn.Module) -> dict:
    """Everything a load may touch: tensors (cloned), keys, parameter objects, counters, engine state."""
    state = model.state_dict(keep_vars=True)
    return {
        "tensors": {k: v.detach().clone() for k, v in state.items()},
        "params": {k: id(p) for k, p in model.named_parameters()},
        "counters": (model.num_prefix_tokens, getattr(model, "num_reg_tokens", None), model.has_class_token,
                     dict(model.__dict__.get("_model_args") or {})),
        "counts": surgery.counts(model),
        "engine": (model_state(model).recipe,
                   {k: tuple(c.values.clone() for c in v) for k, v in model_state(model).stash.items()}),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert list(after["tensors"]) == list(before["tensors"])
    for key, value in before["tensors"].items():
        now = after["tensors"][key]
        assert now.dtype == value.dtype and torch.equal(now, value), key
    for name in ("params", "counters", "counts"):
        assert after[name] == before[name], name
    assert after["engine"][0] == before["engine"][0]
    assert after["engine"][1].keys() == before["engine"][1].keys()
    assert all(len(after["engine"][1][k]) == len(v) and all(map(torch.equal, after["engine"][1][k], v))
               for k, v in before["engine"][1].items())


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# -- round trips -----------------------------------------------------------------------------------


def test_save_load_round_trip_replays_recipe(tmp_path):
    edited = surgery.build("vit_tiny_reg_test")
    surgery.resize(edited, reg_tokens=5, init="mean")
    surgery.resize(edited, class_token=0)
    path = tmp_path / "edited.safetensors"
    surgery.save(edited, path, metadata={"note": "hello"})

    _, meta = surgery.read_checkpoint(path)
    info = meta["surgery"]
    assert meta["note"] == "hello"
    assert info["format"] == 1 and info["backbone"] == "timm_vit" and info["model"] == "vit_tiny_reg_test"
    assert info["counts"] == {"class_token": 0, "reg_tokens": 5}
    assert [(s["site"], s["from"], s["to"]) for s in info["recipe"]["steps"]] == [
        ("reg_tokens", 2, 5), ("class_token", 1, 0)]

    torch.manual_seed(123)  # other random weights than `edited`
    fresh = surgery.build("vit_tiny_reg_test")
    result = surgery.load(path, fresh)
    assert result.replayed and result.counts == {"class_token": 0, "reg_tokens": 5}
    assert result.changes == {"class_token": (1, 0), "reg_tokens": (2, 5)}
    assert surgery.recipe(fresh).steps == surgery.recipe(edited).steps
    assert torch.equal(out(fresh), out(edited))

    # independent reference: timm builds the target counts itself and torch loads the edited weights
    reference = vit(5, class_token=False, no_embed_class=True, global_pool="avg")
    reference.load_state_dict(edited.state_dict())
    assert torch.equal(out(fresh), out(reference))
    assert fresh.num_prefix_tokens == reference.num_prefix_tokens == 5


def test_eva_round_trip(tmp_path):
    edited = surgery.build("eva_tiny_test")
    surgery.resize(edited, reg_tokens=3)
    surgery.save(edited, tmp_path / "eva.safetensors")
    torch.manual_seed(7)
    fresh = surgery.build("eva_tiny_test")
    surgery.load(tmp_path / "eva.safetensors", fresh)
    assert surgery.counts(fresh) == {"class_token": 1, "reg_tokens": 3}
    assert torch.equal(out(fresh), out(edited))
    reference = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=14,
                                  embed_dim=32, depth=2, num_heads=2, num_classes=10, num_reg_tokens=3).eval()
    reference.load_state_dict(edited.state_dict())
    assert torch.equal(out(fresh), out(reference))


@pytest.mark.parametrize("container", ["plain", "model", "state_dict", "model_state_dict"])
def test_timm_pth_with_registers_loads_into_reg0_model(tmp_path, container):
    source = vit(4, seed=1)
    sd = source.state_dict()
    saved = {"plain": sd, "model": {"model": sd}, "state_dict": {"state_dict": sd, "epoch": 3},
             "model_state_dict": {"model_state_dict": sd, "optimizer": {"lr": 0.1}}}[container]
    path = tmp_path / "reg4.pth"
    torch.save(saved, path)
    model = vit(0, seed=2)
    result = surgery.load(path, model)
    assert result.changes == {"reg_tokens": (0, 4)} and not result.replayed
    assert surgery.counts(model) == {"class_token": 1, "reg_tokens": 4}
    assert model.num_prefix_tokens == 5 and model.pos_embed.shape == source.pos_embed.shape
    assert torch.equal(out(model), out(source))


@pytest.mark.parametrize("source_cls, model_cls", [(True, False), (False, True)])
def test_class_token_presence_follows_checkpoint(tmp_path, source_cls, model_cls):
    source = vit(0, seed=1, class_token=source_cls, global_pool="avg")
    torch.save(source.state_dict(), tmp_path / "src.pth")
    model = vit(0, seed=2, class_token=model_cls, global_pool="avg")
    surgery.load(tmp_path / "src.pth", model)
    assert surgery.counts(model)["class_token"] == int(source_cls)
    assert (model.cls_token is None) == (not source_cls)
    assert torch.equal(out(model), out(source))


def test_state_dict_counts_reads_timm_layouts():
    model = vit(0)
    assert state_dict_counts(model, vit(3).state_dict()) == {"class_token": 1, "reg_tokens": 3}
    avg = vit(0, global_pool="avg")
    assert state_dict_counts(avg, vit(2, class_token=False, global_pool="avg").state_dict()) == {
        "class_token": 0, "reg_tokens": 2}


def test_dtype_is_the_models_and_ddp_prefix_is_not_stripped():
    checkpoint = vit(4, seed=1).state_dict()
    model = vit(0, seed=2).to(torch.bfloat16)
    surgery.load_state_dict(model, checkpoint)
    assert model.reg_token.dtype == torch.bfloat16
    assert torch.equal(model.reg_token, checkpoint["reg_token"].to(torch.bfloat16))

    model = vit(0, seed=2)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="start with 'module.'"):
        surgery.load_state_dict(model, {f"module.{k}": v for k, v in checkpoint.items()})
    assert_unchanged(model, before)


def test_format_is_read_from_the_bytes_not_the_name(tmp_path):
    source = vit(2, seed=1)
    surgery.save(source, tmp_path / "weights.bin")  # safetensors content under a torch-like name
    model = vit(0, seed=2)
    assert surgery.read_checkpoint(tmp_path / "weights.bin")[1]["surgery"]["counts"]["reg_tokens"] == 2
    assert surgery.load(tmp_path / "weights.bin", model).changes == {"reg_tokens": (0, 2)}
    assert torch.equal(out(model), out(source))


# -- mismatch="checkpoint" ---------------------------------------------------------------------------


def test_mismatch_checkpoint_fits_checkpoint_to_model_counts():
    checkpoint = vit(4, seed=1).state_dict()
    model = vit(2, seed=2)
    result = surgery.load_state_dict(model, checkpoint, mismatch="checkpoint")
    assert surgery.counts(model) == {"class_token": 1, "reg_tokens": 2} and result.changes == {}
    assert result.converted == {"reg_tokens": (4, 2)}
    # reference by hand: the first two registers, and the pos rows of [cls, reg0, reg1, patches...]
    assert torch.equal(model.reg_token, checkpoint["reg_token"][:, :2])
    pos = checkpoint["pos_embed"]
    assert torch.equal(model.pos_embed, torch.cat([pos[:, :3], pos[:, 5:]], dim=1))
    reference = vit(2, seed=3)
    reference.load_state_dict({**checkpoint, "reg_token": checkpoint["reg_token"][:, :2],
                               "pos_embed": torch.cat([pos[:, :3], pos[:, 5:]], dim=1)})
    assert torch.equal(out(model), out(reference))


def test_mismatch_checkpoint_grows_with_init():
    checkpoint = vit(1, seed=1).state_dict()
    model = vit(3, seed=2)
    surgery.load_state_dict(model, checkpoint, mismatch="checkpoint", init="zeros")
    assert torch.equal(model.reg_token, torch.cat([checkpoint["reg_token"], torch.zeros(1, 2, 32)], dim=1))
    assert torch.equal(model.head.weight, checkpoint["head.weight"])


def test_load_drops_stale_stash():
    model = vit(4, seed=1)
    dropped = model.reg_token[:, 2:].detach().clone()
    surgery.resize(model, reg_tokens=2)  # stashes registers 2 and 3
    surgery.load_state_dict(model, vit(2, seed=5).state_dict())
    assert model_state(model).stash == {}
    surgery.resize(model, reg_tokens=4)  # nothing to restore: the site's default growth
    assert not torch.equal(model.reg_token[:, 2:], dropped)


def test_strict_false_reports_what_it_left():
    model = vit(0, seed=1)
    before_bias = model.head.bias.detach().clone()
    sd = {k: v for k, v in vit(4, seed=2).state_dict().items() if k != "head.bias"}
    result = surgery.load_state_dict(model, {**sd, "extra": torch.ones(1)}, strict=False)
    assert result.missing_keys == ("head.bias",) and result.unexpected_keys == ("extra",)
    assert torch.equal(model.head.bias, before_bias) and torch.equal(model.head.weight, sd["head.weight"])


# -- refusals: the model and the file stay exactly as they were ---------------------------------------


class Marker:
    """A pickle payload that would create a file if it ever ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_file(tmp_path, case, good):
    """Write the file of one refusal case from a good state dict `good`; returns (path, expected
    error, message pattern)."""
    st = tmp_path / f"{case}.safetensors"
    pth = tmp_path / f"{case}.pth"
    if case == "missing_key":
        safetensors.torch.save_file({k: v for k, v in good.items() if k != "head.bias"}, st)
        return st, CheckpointError, r"missing keys \(1\): head\.bias"
    if case == "extra_key":
        torch.save({**good, "extra.weight": torch.ones(2)}, pth)
        return pth, CheckpointError, r"unexpected keys \(1\): extra\.weight"
    if case == "wrong_shape":
        torch.save({**good, "head.weight": torch.zeros(5, 32)}, pth)
        return pth, CheckpointError, r"shape mismatches.*head\.weight \(checkpoint \(5, 32\), model \(10, 32\)\)"
    if case in ("truncated_safetensors", "corrupt_safetensors"):
        safetensors.torch.save_file(good, st)
        data = bytearray(st.read_bytes())
        if case == "truncated_safetensors":
            data = data[: len(data) // 2]
        else:
            data[9:40] = b"\xff" * 31  # the JSON header: no longer UTF-8
        st.write_bytes(bytes(data))
        return st, CheckpointError, r"not a readable safetensors file"
    if case == "truncated_pth":
        torch.save(good, pth)
        pth.write_bytes(pth.read_bytes()[:-200])
        return pth, CheckpointError, r"cannot be read by torch\.load"
    if case == "junk_pth":
        pth.write_bytes(b"this is not a checkpoint\n" * 20)
        return pth, CheckpointError, r"neither safetensors nor a torch checkpoint"
    if case in ("empty_safetensors", "empty_pth"):
        path = st if case == "empty_safetensors" else pth
        path.write_bytes(b"")
        return path, CheckpointError, r"empty"
    if case == "other_model":
        torch.save(nn.Linear(4, 3).state_dict(), pth)
        return pth, CheckpointError, r"does not fit the model.*missing keys.*unexpected keys.*weight, bias"
    if case == "non_tensor_entry":
        torch.save({**good, "epoch": 3}, pth)
        return pth, CheckpointError, r"not tensors: 'epoch' \(int\)"
    if case == "other_backbone":
        meta = {"surgery": json.dumps({"format": 1, "backbone": "other_vit", "counts": {}, "recipe": None})}
        safetensors.torch.save_file(good, st, metadata=meta)
        return st, CheckpointError, r"'other_vit'.*'timm_vit'"
    if case == "missing_file":
        return tmp_path / "nope.safetensors", CheckpointError, r"does not exist"
    if case == "directory":
        (tmp_path / "dir.pth").mkdir()
        return tmp_path / "dir.pth", CheckpointError, r"not a file"
    raise AssertionError(case)


CASES = ["missing_key", "extra_key", "wrong_shape", "truncated_safetensors", "corrupt_safetensors",
         "truncated_pth", "junk_pth", "empty_safetensors", "empty_pth", "other_model", "non_tensor_entry",
         "other_backbone", "missing_file", "directory"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["vit_tiny_test", "vit_tiny_reg_test"])
def test_bad_checkpoint_leaves_model_and_file_unchanged(tmp_path, case, name):
    torch.manual_seed(9)
    path, error, pattern = _bad_file(tmp_path, case, surgery.build(name).state_dict())
    data = path.read_bytes() if path.is_file() else None
    torch.manual_seed(0)
    model = surgery.build(name)
    surgery.resize(model, reg_tokens=3)
    surgery.resize(model, reg_tokens=1)  # a recipe and a stash that must survive
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        surgery.load(path, model)
    assert_unchanged(model, before)
    assert (path.read_bytes() if path.is_file() else None) == data


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "ran.txt"
    path = tmp_path / f"evil{suffix}"
    torch.save({"cls_token": torch.zeros(1, 1, 32), "payload": Marker(str(marker))}, path)
    raw = tmp_path / f"evil_raw{suffix}"
    raw.write_bytes(pickle.dumps({"payload": Marker(str(marker))}, protocol=2))
    model = vit(0)
    before = snapshot(model)
    for bad in (path, raw):
        data = digest(bad)
        with pytest.raises(UnsafeCheckpointError, match="refused"):
            surgery.load(bad, model)
        assert digest(bad) == data
    assert not marker.exists()
    assert_unchanged(model, before)


def test_whole_module_pickle_is_refused(tmp_path):
    torch.save(vit(0), tmp_path / "module.pt")
    with pytest.raises(UnsafeCheckpointError, match="state_dict"):
        surgery.read_checkpoint(tmp_path / "module.pt")


def test_bad_state_dict_leaves_model_and_dict_unchanged():
    model = vit(0, seed=1)
    before = snapshot(model)
    checkpoint = vit(4, seed=2).state_dict()
    user = {**checkpoint, "head.weight": torch.zeros(3, 32)}
    user_items = [(k, id(v), v.clone()) for k, v in user.items()]
    with pytest.raises(CheckpointError, match=r"head\.weight"):
        surgery.load_state_dict(model, user)
    assert_unchanged(model, before)
    assert [(k, id(v)) for k, v in user.items()] == [(k, i) for k, i, _ in user_items]
    assert all(torch.equal(user[k], c) for k, _, c in user_items)


def test_failure_after_resize_rolls_back_everything(tmp_path):
    torch.save({**vit(4, seed=2).state_dict(), "surplus": torch.ones(3)}, tmp_path / "reg4_extra.pth")
    model = vit(0, seed=1)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"token counts \{'class_token': 1, 'reg_tokens': 4\}.*surplus"):
        surgery.load(tmp_path / "reg4_extra.pth", model)
    assert model.reg_token is None and surgery.counts(model)["reg_tokens"] == 0
    assert_unchanged(model, before)


def test_failure_midway_through_copy_puts_every_value_back(monkeypatch):
    model = vit(0, seed=1)
    before = snapshot(model)
    late = model.blocks[1].mlp.fc2  # torch copies the modules before it first

    def copy_then_fail(*args, **kwargs):
        type(late)._load_from_state_dict(late, *args, **kwargs)
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(late, "_load_from_state_dict", copy_then_fail)
    with pytest.raises(CheckpointError, match="RuntimeError: disk vanished; the model was left as it was"):
        surgery.load_state_dict(model, vit(4, seed=2).state_dict())
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert torch.equal(out(model), out(vit(0, seed=1)))


def test_bad_options_are_refused_before_anything():
    model = vit(0)
    with pytest.raises(CheckpointError, match="mismatch must be"):
        surgery.load_state_dict(model, vit(2).state_dict(), mismatch="neither")
    with pytest.raises(SurgeryError, match="bogus"):
        surgery.load_state_dict(model, vit(2).state_dict(), init="bogus")
    assert surgery.counts(model)["reg_tokens"] == 0


# -- saving ------------------------------------------------------------------------------------------


def test_save_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    surgery.save(vit(0, seed=1), path)
    data = digest(path)

    def half_then_fail(model, filename, metadata=None, force_contiguous=True):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", half_then_fail)
    with pytest.raises(CheckpointError, match="disk full"):
        surgery.save(vit(3, seed=2), path)
    assert digest(path) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_save_refuses_reserved_metadata_and_directories(tmp_path):
    with pytest.raises(CheckpointError, match="reserved"):
        surgery.save(vit(0), tmp_path / "a.safetensors", metadata={"surgery": "{}"})
    with pytest.raises(CheckpointError, match="directory"):
        surgery.save(vit(0), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tied_tensors_are_written_once_and_loaded_into_both_names(tmp_path):
    def tied(seed):
        model = vit(0, seed=seed)
        model.blocks[1].norm1.weight = model.blocks[0].norm1.weight
        return model

    source = tied(1)
    with torch.no_grad():
        source.blocks[0].norm1.weight.add_(0.5)
    surgery.save(source, tmp_path / "tied.safetensors")
    stored, _ = surgery.read_checkpoint(tmp_path / "tied.safetensors")
    assert len(stored) == len(source.state_dict()) - 1
    model = tied(2)
    surgery.load(tmp_path / "tied.safetensors", model)
    assert model.blocks[1].norm1.weight is model.blocks[0].norm1.weight
    assert torch.equal(model.blocks[1].norm1.weight, source.blocks[0].norm1.weight)
    assert torch.equal(out(model), out(source))


# -- plugins: events and count_in_state_dict --------------------------------------------------------


def test_view_sites_need_count_in_state_dict(toy_host, monkeypatch):
    import toy_backbone

    torch.manual_seed(0)
    model = toy_backbone.ToyModel(query_len=3)
    torch.manual_seed(1)
    source = toy_backbone.ToyModel(query_len=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="count_in_state_dict"):
        surgery.load_state_dict(model, source.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    plain_sites = toy_backbone.toy_sites

    def with_readers(m):
        declared = plain_sites(m)
        key = surgery.site.module_paths(m)[id(m.adapter)] + ".weight"
        for site in declared:
            if site.name == "query_len":
                site.count_in_state_dict = lambda sd, paths: sd[key].shape[0] // m.query_layer
            if site.name == "query_layer":
                site.count_in_state_dict = lambda sd, paths: None  # cannot tell: keep the model's
        return declared

    monkeypatch.setattr(toy_backbone, "toy_sites", with_readers)
    toy_host.events.clear()
    result = surgery.load_state_dict(model, source.state_dict())
    assert result.changes == {"query_len": (3, 5)} and model.query_len == 5
    assert toy_host.events == [("before", "toy", {"query_len": (3, 5)}), ("after", "toy", {"query_len": (3, 5)})]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(x), source(x))

    # a failure after the resize: the rollback is announced like any change of counts
    toy_host.events.clear()
    with pytest.raises(CheckpointError, match="unexpected keys"):
        surgery.load_state_dict(model, {**toy_backbone.ToyModel(query_len=2).state_dict(), "stray": torch.ones(1)})
    assert model.query_len == 5 and torch.equal(model(x), source(x))
    assert toy_host.events == [("before", "toy", {"query_len": (5, 2)}), ("before", "toy", {"query_len": (2, 5)}),
                               ("after", "toy", {"query_len": (2, 5)})]
