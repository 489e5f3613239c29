"""surgery/bench/report.py: tables on disk, Markdown, plots, the environment of a run."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from surgery.bench import report


def test_environment_names_the_machine_versions_commit_and_time():
    env = report.environment(torch.device("cpu"), 2, extra="x")
    assert env["threads"] == 2 and env["torch"] == torch.__version__ and env["extra"] == "x"
    assert env["device_name"] and env["device"] == "cpu"
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?|unknown", env["git_commit"])
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", env["timestamp"])


def test_git_commit_outside_a_checkout(tmp_path):
    assert report.git_commit(tmp_path) == "unknown"


def test_write_table_csv_and_json_agree(tmp_path):
    env = {"device_name": "cpu-x", "torch": "t", "triton": None, "git_commit": "abc", "timestamp": "now", "threads": 1}
    rows = [{"op": "a", "ms": 1.5, "note": None, "dims": {"Q": 1}}, {"op": "b", "ms": 2.0, "extra": True}]
    csv_path, json_path = report.write_table(tmp_path / "sub", "t", rows, env)
    with open(csv_path, newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["op"] for r in read] == ["a", "b"]
    assert read[0]["device_name"] == "cpu-x" and read[0]["note"] == "" and json.loads(read[0]["dims"]) == {"Q": 1}
    assert read[0]["extra"] == "" and read[1]["extra"] == "True"  # the union of the fields
    data = json.loads(json_path.read_text())
    assert data["meta"] == env and data["rows"][1]["ms"] == 2.0 and data["rows"][0]["git_commit"] == "abc"
    assert report.read_json_rows(json_path) == data["rows"]


def test_markdown():
    table = report.markdown_table(["a", "b"], [["x", 1.23456], ["y", None], ["z", False]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 1.235 |", "| y | - |", "| z | **no** |"]
    assert report.fmt(0.00001234) == "1.23e-05"


def test_plots_are_pngs(tmp_path):
    rows = [{"op": op, "backend": b, "bytes": n, "op_bytes": n, "gbps": g}
            for op in ("query_concat", "adapter_add") for b, g in (("copy", 10.0), ("fill", 12.0), ("cpp", 8.0))
            for n in (1e3, 1e6)]
    path = report.plot_bandwidth(rows, tmp_path / "k.png", "title", peak_gbps=20.0,
                                 references={"copy": "copy limit", "fill": "write-only floor"})
    assert path.read_bytes()[:4] == b"\x89PNG"
    path = report.plot_lines({"ours": [(1, 2.0), (10, 3.0)]}, tmp_path / "l.png", "t", "x", "y", logx=True)
    assert path.read_bytes()[:4] == b"\x89PNG"
    path = report.plot_bars(["q=10 b=1"], {"floor": [3.0], "ours": [2.9]}, tmp_path / "b.png", "t", "tokens/s")
    assert path.read_bytes()[:4] == b"\x89PNG"  # one group is still a figure
    with pytest.raises(ValueError, match="'ours' has 2 values for 1 groups"):
        report.plot_bars(["q=10 b=1"], {"ours": [1.0, 2.0]}, tmp_path / "x.png", "t", "y")


def test_summary(tmp_path):
    env = {"device_name": "cpu-x", "device": "cpu", "threads": 1, "cpu_count": 2, "torch": "t",
           "git_commit": "abc", "timestamp": "now"}
    path = report.write_summary(tmp_path, "Title", [("Part", "| a |\n|---|\n| 1 |")], env, [tmp_path / "f.csv"])
    text = path.read_text()
    assert text.startswith("# Title") and "cpu-x" in text and "## Part" in text and "`f.csv`" in text
