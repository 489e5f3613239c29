"""`surgery inspect FOLDER` and `surgery resize FOLDER --set ... -o OUT` on Hugging Face folders.

The folders are written by transformers' own `save_pretrained` (tiny configs, random weights).
What `resize` writes is opened by transformers' own `from_pretrained` and compared with the
reference built here: the input folder opened by `from_pretrained` and resized with
`surgery.resize`. config.json's sizes are data: a folder claiming a million layers is refused
after building a few of them (counted by wrapping the layer class), and every refusal is one line
with nothing written.
"""

import json
import os
import shutil

import pytest

hf = pytest.importorskip("transformers")

import torch  # noqa: E402
from surgery_plugins.transformers_hf import detr, dinov2  # noqa: E402

import surgery  # noqa: E402
from surgery.cli import main  # noqa: E402

PIXELS = {"dinov2": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)),
          "detr": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}
CLASSES = {"dinov2": "Dinov2WithRegistersForImageClassification", "detr": "DetrForObjectDetection"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"dinov2": a folder with 2 registers, "detr": one with 5 queries}, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    dinov2.tiny(2).save_pretrained(root / "dinov2")
    detr.tiny(5).save_pretrained(root / "detr")
    return {"dinov2": root / "dinov2", "detr": root / "detr"}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, expected_code, err, *mentions):
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.startswith("surgery: ")]
    assert len(lines) == 1 and lines[0].startswith("surgery: error: ") and "Traceback" not in err, err
    for text in mentions:
        assert text in lines[0], err


def outputs(model, pixels):
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    found = []
    for value in out.to_tuple():
        found.extend(value if isinstance(value, tuple) else [value])
    return [t for t in found if isinstance(t, torch.Tensor)]


def snapshot(folder):
    """{name: bytes} of a folder's files, and the names beside it: what a refused command must leave."""
    files = {p.name: p.read_bytes() if p.is_file() else "folder" for p in folder.iterdir()} if folder.exists() else None
    return files, sorted(os.listdir(folder.parent))


def hostile_copy(folder, tmp_path, name="hostile", **config):
    """A copy of `folder` whose config.json says `config` (the weights stay the folder's)."""
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    data = json.loads((copy / "config.json").read_text())
    data.update(config)
    (copy / "config.json").write_text(json.dumps(data))
    return copy


# -- inspect ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, backbone, counts, tensor", [
    ("dinov2", "hf_dinov2_registers", {"class_token": 1, "num_register_tokens": 2},
     "dinov2_with_registers.embeddings.register_tokens"),
    ("detr", "hf_detr", {"num_queries": 5}, "model.query_position_embeddings.weight"),
])
def test_inspect_shows_the_folders_backbone_counts_and_sites(folders, capsys, family, backbone, counts, tensor):
    code, out, err = run_cli(capsys, "inspect", folders[family], "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["backbone"] == backbone and info["counts"] == counts
    assert info["model"] == CLASSES[family] and info["layout"]["plugin"] == "transformers"
    site = next(s for s in info["sites"] if s["name"] == list(counts)[-1])
    reference = getattr(hf, CLASSES[family]).from_pretrained(folders[family])
    shape = list(reference.state_dict()[tensor].shape)
    assert any(t["key"] == tensor and list(t["shape"]) == shape for t in site["tensors"]), site
    code, out, err = run_cli(capsys, "inspect", folders[family])  # the table a user reads
    assert code == 0, err
    assert f"backbone: {backbone}" in out and tensor in out and "recognised by plugin 'transformers'" in out


# -- resize -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, site, new, options", [
    ("dinov2", "num_register_tokens", 4, []),                                   # grows: default init
    ("detr", "num_queries", 7, ["--init", "normal", "--seed", "3"]),
    ("detr", "num_queries", 3, []),                                             # shrinks: truncate
])
def test_resize_writes_a_folder_from_pretrained_opens_at_the_new_count(folders, tmp_path, capsys, family, site, new,
                                                                       options):
    out = tmp_path / "resized"
    code, printed, err = run_cli(capsys, "resize", folders[family], "--set", f"{site}={new}", "-o", out, *options)
    assert code == 0, err
    assert f"wrote {out}" in printed
    assert json.loads((out / "config.json").read_text())[site] == new
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".surgery-")) == []  # no temporary left
    cls = getattr(hf, CLASSES[family])
    reopened = cls.from_pretrained(out).eval()
    assert getattr(reopened.config, site) == new
    # the reference: transformers opens the input folder, surgery resizes it in memory
    reference = cls.from_pretrained(folders[family]).eval()
    init = dict(zip(options[::2], options[1::2]))
    surgery.resize(reference, init=init.get("--init", "restore"), seed=int(init.get("--seed", 0)), **{site: new})
    mine, theirs = reopened.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for ours, ref in zip(outputs(reopened, PIXELS[family]), outputs(reference, PIXELS[family]), strict=True):
        # DETR's ResNet may sum in another order after another load path: float rounding only
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6 if family == "detr" else 0)


def test_force_replaces_a_model_folder_and_a_failed_write_leaves_it(folders, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(capsys, "resize", folders["dinov2"], "--set", "num_register_tokens=3", "-o", out)[0] == 0
    before = snapshot(out)
    # save_pretrained fails half-way through: OUT stays as it was, no temporary folder is left
    cls = getattr(hf, CLASSES["dinov2"])

    def failing(self, path, **kwargs):
        (path / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cls, "save_pretrained", failing)
    code, _, err = run_cli(capsys, "resize", folders["dinov2"], "--set", "num_register_tokens=5", "-o", out, "--force")
    assert_one_line(code, 1, err, "No space left on device")
    assert snapshot(out) == before
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "resize", folders["dinov2"], "--set", "num_register_tokens=5", "-o", out, "--force")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_register_tokens"] == 5
    assert cls.from_pretrained(out).config.num_register_tokens == 5


# -- refusals: one line, nothing written ----------------------------------------------------------------


@pytest.fixture
def layers_built(monkeypatch):
    """A list that grows by one for every DINOv2 layer built (on any device)."""
    from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as modeling

    built = []
    layer_init = modeling.Dinov2WithRegistersLayer.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        layer_init(self, *args, **kwargs)

    monkeypatch.setattr(modeling.Dinov2WithRegistersLayer, "__init__", counted)
    return built


def test_a_config_claiming_a_million_layers_is_refused_before_any_layer_is_built(folders, tmp_path, capsys,
                                                                                 layers_built):
    hostile = hostile_copy(folders["dinov2"], tmp_path, num_hidden_layers=10**6)
    out = tmp_path / "out"
    for command in (["inspect", hostile], ["resize", hostile, "--set", "num_register_tokens=4", "-o", out]):
        code, _, err = run_cli(capsys, *command)
        assert_one_line(code, 1, err, "config.json", "num_hidden_layers=1000000", "tensors (46)", "--allow-large")
    assert layers_built == []  # not one layer: the count was read against the weights first
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".surgery-")]
    # a sub-config's layer list (DETR's ResNet stages) and a number no tensor justifies, likewise
    for family, config, mention in [("detr", {"backbone_config": {"model_type": "resnet", "depths": [1] * 1000}},
                                      "backbone_config.depths"),
                                     ("dinov2", {"num_labels": 10**9}, "num_labels holds 1,000,000,000")]:
        hostile = hostile_copy(folders[family], tmp_path, f"hostile-{family}", **config)
        code, _, err = run_cli(capsys, "inspect", hostile)
        assert_one_line(code, 1, err, mention, "--allow-large")


def test_a_model_larger_than_its_weights_is_stopped_on_the_meta_device(folders, tmp_path, capsys, layers_built):
    # 2**20 features: the patch embedding's convolution already holds more elements than the
    # file's tensors plus the margin, so the build stops there, before the first layer
    hostile = hostile_copy(folders["dinov2"], tmp_path, hidden_size=1 << 20, intermediate_size=1 << 20)
    code, _, err = run_cli(capsys, "inspect", hostile)
    assert_one_line(code, 1, err, "elements", "the file's tensors", "nothing allocated", "--allow-large")
    assert layers_built == []
    # --allow-large reaches every check made while opening (the plugin's too): 50 layers are built,
    # and the folder's 2 layers of weights then do not fit them
    deep = hostile_copy(folders["dinov2"], tmp_path, "deep", num_hidden_layers=50)
    code, _, err = run_cli(capsys, "inspect", deep)
    assert_one_line(code, 1, err, "num_hidden_layers=50", "--allow-large")
    code, _, err = run_cli(capsys, "inspect", deep, "--allow-large")
    assert_one_line(code, 1, err, "does not fit the model", "missing keys")
    assert len(layers_built) >= 50


def test_an_unknown_model_type_is_one_line(folders, tmp_path, capsys):
    hostile = hostile_copy(folders["dinov2"], tmp_path, model_type="llama")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "inspect", hostile)
    assert_one_line(code, 1, err, "no plugin recognises its layout", "model_type")
    code, _, err = run_cli(capsys, "resize", hostile, "--set", "num_register_tokens=4", "-o", out)
    assert_one_line(code, 1, err, "no plugin recognises its layout")
    assert not out.exists()


def test_an_existing_out_is_refused_and_left_as_it_was(folders, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    resize = ["resize", folders["dinov2"], "--set", "num_register_tokens=4", "-o", out]
    code, _, err = run_cli(capsys, *resize)
    assert_one_line(code, 2, err, "already exists", "--force")
    assert snapshot(out) == before
    # --force replaces only a model folder (one with config.json, only files)
    code, _, err = run_cli(capsys, *resize, "--force")
    assert_one_line(code, 1, err, "no config.json")
    (out / "config.json").write_text("{}")
    (out / "sub").mkdir()
    before = snapshot(out)
    code, _, err = run_cli(capsys, *resize, "--force")
    assert_one_line(code, 1, err, "sub", "not regular files")
    assert snapshot(out) == before
    # nor a symbolic link to a model folder: the link's target is left as it was
    (tmp_path / "link").symlink_to(folders["detr"], target_is_directory=True)
    before = snapshot(folders["detr"])
    code, _, err = run_cli(capsys, "resize", folders["dinov2"], "--set", "num_register_tokens=4",
                           "-o", tmp_path / "link", "--force")
    assert_one_line(code, 1, err, "symbolic link")
    assert snapshot(folders["detr"]) == before and (tmp_path / "link").is_symlink()
    # a file is not replaced by a folder, even with --force
    code, _, err = run_cli(capsys, "resize", folders["dinov2"], "--set", "num_register_tokens=4",
                           "-o", out / "notes.txt", "--force")
    assert_one_line(code, 1, err, "not a folder")
    assert (out / "notes.txt").read_text() == "mine"
    # a folder is written back as a folder, never as a file of another format
    code, _, err = run_cli(capsys, "resize", folders["dinov2"], "--set", "num_register_tokens=4",
                           "-o", tmp_path / "resized.safetensors")
    assert_one_line(code, 2, err, "folder name, not a .safetensors file name")
    assert not (tmp_path / "resized.safetensors").exists()


@pytest.mark.parametrize("where", ["input", "inside", "around"])
def test_out_never_overlaps_the_input_folder(folders, tmp_path, capsys, where):
    source = tmp_path / "parent" / "model"
    shutil.copytree(folders["dinov2"], source)
    out = {"input": source, "inside": source / "resized", "around": tmp_path / "parent"}[where]
    before = snapshot(source)
    code, _, err = run_cli(capsys, "resize", source, "--set", "num_register_tokens=4", "-o", out, "--force")
    assert_one_line(code, 2, err, "input folder")
    assert snapshot(source) == before


def test_a_bad_count_writes_nothing(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "resize", folders["detr"], "--set", "num_queries=0", "-o", out)
    assert_one_line(code, 1, err, "num_queries")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".surgery-")]


def test_a_registered_tiny_model_saved_by_surgery_opens_by_its_name(tmp_path, capsys):
    # its metadata names the registered model, which is counted on the meta device before it is built
    model = surgery.build("hf_dinov2_reg_tiny")
    surgery.resize(model, num_register_tokens=3)
    surgery.save(model, tmp_path / "reg3.safetensors")
    code, out, err = run_cli(capsys, "inspect", tmp_path / "reg3.safetensors", "--json")
    assert code == 0, err
    assert json.loads(out)["counts"]["num_register_tokens"] == 3
