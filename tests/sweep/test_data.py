"""Sweep data: image folders, JSONL and CSV manifests, the embedded digits, and what is refused."""

import json

import numpy as np
import pytest
from PIL import Image

from surgery.errors import MetricDataError
from surgery.sweep.data import class_indices, digits, load_data, open_image


def png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, dtype="uint8")).save(path)
    return path


def test_digits_ship_with_scikit_learn():
    data = digits()
    assert len(data.records) == 1797 and data.classes == [str(i) for i in range(10)]
    assert len(data.part("eval")) == 360 and len(data.part("train")) == 1437
    assert data.fields == {"image", "label", "split"}
    assert open_image(data.records[0]["image"]).size == (8, 8)
    assert digits().fingerprint == data.fingerprint and load_data(None).fingerprint == data.fingerprint


def test_image_folder_with_split_folders(tmp_path):
    for split, cls, i in [("train", "cat", 0), ("train", "dog", 1), ("val", "cat", 2), ("val", "dog", 3)]:
        png(tmp_path / split / cls / f"{i}.png", value=i)
    data = load_data(tmp_path)
    assert [(r["label"], r["split"]) for r in data.records] == [("cat", "train"), ("dog", "train"),
                                                                ("cat", "eval"), ("dog", "eval")]
    assert class_indices(data, data.part("eval"), 2) == [0, 1]  # folder names ranked, as ImageFolder


def test_image_folder_without_splits_is_split_deterministically(tmp_path):
    for i in range(10):
        png(tmp_path / ("a" if i % 2 else "b") / f"{i}.png")
    first, second = load_data(tmp_path, eval_fraction=0.3), load_data(tmp_path, eval_fraction=0.3)
    assert len(first.part("eval")) == 3
    assert [r["image"] for r in first.part("eval")] == [r["image"] for r in second.part("eval")]


def test_jsonl_and_csv_manifests_resolve_paths_beside_them(tmp_path):
    png(tmp_path / "imgs" / "x.png")
    png(tmp_path / "imgs" / "y.png")
    rows = [{"image": "imgs/x.png", "text": "a cat", "split": "train"},
            {"image": "imgs/y.png", "text": "a dog", "split": "test"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "pairs.csv").write_text("image,text,split\nimgs/x.png,a cat,train\nimgs/y.png,a dog,test\n")
    for name in ("pairs.jsonl", "pairs.csv"):
        data = load_data(tmp_path / name)
        assert data.fields == {"image", "text", "split"}
        assert [r["image"] for r in data.records] == [str(tmp_path / "imgs" / f) for f in ("x.png", "y.png")]
        assert [r["split"] for r in data.records] == ["train", "eval"]
    assert load_data(tmp_path / "pairs.csv").fingerprint == load_data(tmp_path / "pairs.jsonl").fingerprint


@pytest.mark.parametrize("line, message", [
    ({"image": "missing.png"}, r"image file 'missing.png' does not exist \(paths are relative to the manifest"),
    ({"text": "a", "caption": "b"}, "unknown field.* caption; fields: image, audio, text, label, split"),
    ({"text": "a", "split": "holdout"}, "split 'holdout'; allowed: train, eval, val"),
    ({"text": ["a"]}, "field 'text' must be a string"),
    ({"label": "cat"}, "a record needs an image, audio or text field"),
    ([1, 2], "a record must be an object"),
])
def test_manifest_errors_name_the_line_and_what_is_allowed(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(MetricDataError, match=rf"bad.jsonl:2: {message}"):
        load_data(path)


def test_sources_that_are_not_data(tmp_path):
    with pytest.raises(MetricDataError, match="does not exist; give an image folder, a .jsonl or .csv manifest"):
        load_data(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MetricDataError, match="neither a folder nor a .jsonl / .csv manifest"):
        load_data(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricDataError, match="holds no images in class subfolders"):
        load_data(tmp_path / "empty")
    (tmp_path / "all_train.jsonl").write_text(json.dumps({"text": "a", "split": "train"}) + "\n")
    with pytest.raises(MetricDataError, match="no eval records"):
        load_data(tmp_path / "all_train.jsonl")
    (tmp_path / "garbage.jsonl").write_text("{not json\n")
    with pytest.raises(MetricDataError, match="garbage.jsonl:1: not a JSON object"):
        load_data(tmp_path / "garbage.jsonl")
