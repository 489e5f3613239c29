"""The data a sweep measures on: the user's files, or an embedded default with real signal.

    load_data(None)                    # scikit-learn's digits: 1797 8x8 images of 0..9 (shipped, no download)
    load_data("photos/")               # an image folder, or a JSONL / CSV manifest

A data set is a list of records (`image`, `audio`, `text`, `label`, `split`); metrics refuse one
without the fields they need, and plugins turn fields into inputs with their own loaders. Records
without a split are split by a fixed permutation, so results with and without training compare.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import MetricDataError

FIELDS = ("image", "audio", "text", "label", "split")
FILE_FIELDS = ("image", "audio")  # fields naming a file (relative to the manifest)
SPLITS = {"train": "train", "eval": "eval", "val": "eval", "valid": "eval", "validation": "eval", "test": "eval"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS = "digits"
SPLIT_SEED = 0  # the permutation that splits records without a `split` field (fixed: same data, same split)


@dataclass
class SweepData:
    """Records plus where they came from; `fingerprint` identifies them in the cells' keys."""

    name: str
    records: list[dict[str, Any]]
    fingerprint: str
    description: str = ""
    fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        if not self.records:
            raise MetricDataError(f"data {self.name!r} has no records")
        self.fields = frozenset.intersection(*(frozenset(k for k, v in r.items() if v is not None)
                                               for r in self.records))

    def part(self, split: str) -> list[dict[str, Any]]:
        """The `train` or `eval` records."""
        return [r for r in self.records if r["split"] == split]

    @property
    def classes(self) -> list[str]:
        """The labels, sorted (numerically when every label is an integer)."""
        labels = {str(r["label"]) for r in self.records if r.get("label") is not None}
        return sorted(labels, key=lambda s: (int(s), s) if _is_int(s) else (float("inf"), s))

    def has(self, *names: str) -> bool:
        return all(n in self.fields for n in names)

    def describe_fields(self) -> str:
        return ", ".join(sorted(self.fields - {"split"})) or "none"


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def load_data(source: str | os.PathLike | None = None, *, eval_fraction: float = 0.2) -> SweepData:
    """The embedded digits (None or "digits"), an image folder, or a .jsonl / .csv manifest."""
    if not 0 < eval_fraction < 1:
        raise MetricDataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if source is None or str(source) == DIGITS:
        return digits()
    path = Path(source)
    if path.is_dir():
        records, description = _image_folder(path), f"image folder {path}"
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        records = _jsonl(path) if path.suffix.lower() == ".jsonl" else _csv(path)
        description = f"manifest {path} ({len(records)} records)"
    elif not path.exists():
        raise MetricDataError(f"data {str(source)!r} does not exist; give an image folder, a .jsonl or .csv "
                              f"manifest, or nothing for the embedded digits")
    else:
        raise MetricDataError(f"data {str(source)!r} is neither a folder nor a .jsonl / .csv manifest")
    _assign_splits(records, eval_fraction)
    return SweepData(str(path), records, _fingerprint(records), description)


# -- the embedded default --------------------------------------------------------------------------


def digits() -> SweepData:
    """scikit-learn's digits (UCI optical digits): 1797 grey 8x8 images in [0, 1], labels "0".."9";
    every fifth image is an eval image (360), the rest train (1437). Shipped with scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as exc:
        raise MetricDataError("the embedded default data set is scikit-learn's digits; install scikit-learn "
                              "(pip install scikit-learn, or token-surgery[dev]) or give --data") from exc
    bunch = load_digits()
    images = (bunch.images / 16.0).astype("float32")  # pixel values 0..16
    records = [{"image": image, "label": str(int(label)), "split": "eval" if i % 5 == 0 else "train"}
               for i, (image, label) in enumerate(zip(images, bunch.target))]
    digest = hashlib.sha256(images.tobytes() + bunch.target.tobytes()).hexdigest()[:12]
    return SweepData(DIGITS, records, f"{DIGITS}-{digest}", "scikit-learn digits (1797 8x8 images, 10 classes)")


# -- files -----------------------------------------------------------------------------------------


def _image_folder(root: Path) -> list[dict[str, Any]]:
    """root/<class>/<image>, or root/<split>/<class>/<image> for split folders (train, val, ...)."""
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    split_folders = [p for p in subfolders if p.name.lower() in SPLITS]
    if split_folders and len(split_folders) == len(subfolders):
        records = [dict(r, split=SPLITS[p.name.lower()]) for p in split_folders for r in _class_folders(p)]
    else:
        records = _class_folders(root)
    if not records:
        raise MetricDataError(f"image folder {root} holds no images in class subfolders (<class>/<image>, "
                              f"suffixes {', '.join(IMAGE_SUFFIXES)})")
    return records


def _class_folders(root: Path) -> list[dict[str, Any]]:
    return [{"image": str(f), "label": d.name} for d in sorted(p for p in root.iterdir() if p.is_dir())
            for f in sorted(d.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MetricDataError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
            records.append(_record(row, path, number))
    return records


def _csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return [_record({k: v for k, v in row.items() if v not in (None, "")}, path, number)
                for number, row in enumerate(reader, 2)]


def _record(row: Any, path: Path, number: int) -> dict[str, Any]:
    """One manifest row checked: known fields, string values, files that exist."""
    where = f"{path}:{number}"
    if not isinstance(row, dict):
        raise MetricDataError(f"{where}: a record must be an object with fields {', '.join(FIELDS)}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise MetricDataError(f"{where}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(FIELDS)}")
    record: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise MetricDataError(f"{where}: field {key!r} must be a string, got {json.dumps(value)[:40]}")
        record[key] = str(value)
    for key in FILE_FIELDS:
        if key in record:
            file = (path.parent / record[key]).resolve()
            if not file.is_file():
                raise MetricDataError(f"{where}: {key} file {record[key]!r} does not exist (paths are relative "
                                      f"to the manifest's folder {path.parent})")
            record[key] = str(file)
    if "split" in record:
        split = SPLITS.get(record["split"].lower())
        if split is None:
            raise MetricDataError(f"{where}: split {record['split']!r}; allowed: {', '.join(SPLITS)}")
        record["split"] = split
    if not set(record) - {"split", "label"}:
        raise MetricDataError(f"{where}: a record needs an image, audio or text field")
    return record


def _assign_splits(records: list[dict[str, Any]], eval_fraction: float) -> None:
    """Records without a split: a fixed permutation sends `eval_fraction` of them to eval."""
    loose = [r for r in records if "split" not in r]
    order = list(range(len(loose)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_eval = max(1, round(len(loose) * eval_fraction)) if loose else 0
    for rank, i in enumerate(order):
        loose[i]["split"] = "eval" if rank < n_eval else "train"
    if not any(r["split"] == "eval" for r in records):
        raise MetricDataError("the data has no eval records (every record has split 'train')")


def _fingerprint(records: Sequence[dict[str, Any]]) -> str:
    """Identity of the records: their fields and the files' sizes and times (not their bytes: cheap)."""
    digest = hashlib.sha256()
    for r in records:
        stats = [os.stat(r[k]) for k in FILE_FIELDS if k in r]
        digest.update(json.dumps([r, [(s.st_size, s.st_mtime_ns) for s in stats]], sort_keys=True).encode())
    return digest.hexdigest()[:12]


# -- helpers for plugins' loaders ------------------------------------------------------------------


def open_image(value: Any):
    """A record's image as a PIL image: a file (opened and read now), or an array (H, W) or (H, W, C)
    with values in [0, 1] (the embedded digits) or 0..255."""
    from PIL import Image

    if isinstance(value, (str, os.PathLike)):
        try:
            with Image.open(value) as image:
                image.load()
                return image.copy()
        except OSError as exc:
            raise MetricDataError(f"image {str(value)!r} cannot be read: {exc}") from None
    import numpy as np

    array = np.asarray(value)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def class_indices(data: SweepData, records: Sequence[dict[str, Any]], num_classes: int | None) -> list[int]:
    """The class index of each record: the label itself when every label is an integer (the model's
    own classes), else its rank among the sorted labels (an image folder's convention)."""
    classes = data.classes
    numeric = all(_is_int(c) for c in classes)
    index = {c: int(c) if numeric else i for i, c in enumerate(classes)}
    top = max(index.values()) + 1
    if num_classes is not None and top > num_classes:
        raise MetricDataError(f"data {data.name!r} has labels up to class {top - 1} ({len(classes)} classes), but the "
                              f"model's head has {num_classes} outputs")
    return [index[str(r["label"])] for r in records]


__all__ = ["SweepData", "load_data", "digits", "open_image", "class_indices", "FIELDS"]
