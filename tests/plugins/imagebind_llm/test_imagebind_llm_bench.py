"""benchmarks/imagebind_llm_decode.py runs (on the tiny model, quick budget) and refuses to time
paths whose greedy tokens differ."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from surgery.errors import OutputMismatchError

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "imagebind_llm_decode.py"


def load_script():
    spec = importlib.util.spec_from_file_location("imagebind_llm_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_writes_a_row_per_path_and_point(tmp_path):
    bench = load_script()
    assert bench.main(["--quick", "--model", "imagebind_llm_tiny", "--ks", "1,2", "--batches", "1,2",
                       "--prompt-len", "6", "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "imagebind_llm_decode.json").read_text())["rows"]
    assert {(r["k"], r["batch"], r["path"]) for r in rows} == {
        (k, b, p) for k in (1, 2) for b in (1, 2) for p in ("floor", "ours", "upstream")}
    assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert "| float32 | 2 | 2 |" in (tmp_path / "summary.md").read_text()


def test_a_path_that_generates_other_tokens_is_not_timed(tmp_path, monkeypatch):
    bench = load_script()
    model = bench.build("imagebind_llm_tiny", 1, torch.float32, torch.device("cpu"))
    original = type(model).generate_tokens

    def skewed(self, *args, cache_adapter=True, **kwargs):
        out = original(self, *args, cache_adapter=cache_adapter, **kwargs)
        return out if cache_adapter else [[t + 1 for t in row] for row in out]

    monkeypatch.setattr(type(model), "generate_tokens", skewed)
    with pytest.raises(OutputMismatchError, match="greedy tokens differ"):
        bench.measure(model, 1, 6, torch.device("cpu"), bench.Budget.quick(), 1)
