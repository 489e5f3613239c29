"""`surgery sweep`: one line per refusal, no traceback; results written; exit 1 when a cell failed."""

import csv

import pytest

from surgery.cli import main


def run(capsys, *argv):
    code = main(["sweep", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, code, message", [
    ([], 2, "name a MODEL (registered name or checkpoint file), or use --quick"),
    (["vit_tiny_test"], 2, "give the counts to sweep with --sites SITE=COUNTS"),
    (["--quick", "vit_tiny_test"], 2, "--quick sweeps its own model"),
    (["vit_tiny_test", "--sites", "reg_tokens=0,1", "--address", "auto"], 2, "--address is for --executor ray"),
    (["vit_tiny_test", "--sites", "reg_tokens"], 1, "expected SITE=COUNTS"),
    (["vit_tiny_test", "--sites", "reg_tokens=0..x"], 1, "expected integers or ranges like 0..8"),
    (["vit_tiny_test", "--sites", "registers=1", "--metrics", "drift"], 1, "has no token site 'registers'"),
    (["vit_tiny_test", "--sites", "reg_tokens=1", "--metrics", "bleu"], 1, "unknown metric 'bleu'"),
    (["vit_tiny_test", "--sites", "reg_tokens=1", "--inits", "magic"], 1, "magic"),
    (["no_such_model", "--sites", "reg_tokens=1"], 1, "no plugin can build a model named 'no_such_model'"),
    (["missing.safetensors", "--sites", "reg_tokens=1"], 1, "missing.safetensors"),
])
def test_refusals_are_one_line(capsys, tmp_path, argv, code, message):
    got, out, err = run(capsys, *argv, *(["--out", str(tmp_path)] if argv else []))
    assert got == code
    assert err.startswith("surgery: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "results.csv").exists()


def test_a_sweep_prints_its_summary_and_writes_results(capsys, tmp_path):
    code, out, err = run(capsys, "vit_tiny_test", "--sites", "reg_tokens=0..2", "--inits", "zeros,normal",
                         "--metrics", "drift", "--out", str(tmp_path), "--no-progress")
    assert code == 0, err
    assert out.startswith("# Sweep") and "results in" in out
    with open(tmp_path / "results.csv", newline="") as f:
        counts = {r["count"] for r in csv.DictReader(f)}
    assert counts == {"0", "1", "2"}
    code, out, _ = run(capsys, "vit_tiny_test", "--sites", "reg_tokens=0..2", "--inits", "zeros,normal",
                       "--metrics", "drift", "--out", str(tmp_path), "--no-progress")
    assert code == 0 and "5 of 5 cells were already finished" in out


def test_failed_cells_make_exit_status_1(capsys, tmp_path):
    code, out, err = run(capsys, "vit_tiny_test", "--sites", "class_token=0", "--sites", "reg_tokens=1",
                         "--metrics", "drift", "--out", str(tmp_path), "--no-progress")
    assert code == 1
    assert "1 of 3 cells failed" in err and err.count("\n") == 1
    assert "Failed cells (1)" in (tmp_path / "summary.md").read_text()


def test_the_readme_sweep_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "surgery.sweep(" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "baseline 0 none drift_cosine 0.0" and len(printed) == 6
    assert (tmp_path / "out" / "sweep" / "readme" / "summary.md").exists()
