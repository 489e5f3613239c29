"""surgery.sweep: the grid's cells, tidy results, plots and summary, resume, failing cells,
same seeds same numbers, the model put back after every cell, head modes, the quick default."""

import csv
import json

import pytest
import torch

import surgery
from surgery.errors import SweepError
from surgery.sweep.grid import Grid, Training, cells
from surgery.sweep.runner import Plan, Session

REQUIRED = ["model", "site", "count", "init", "seed", "steps", "metric", "value", "seconds", "versions", "git_commit"]


@pytest.fixture(scope="module")
def digit_manifest(tmp_path_factory):
    """40 digits as PNG files and a JSONL manifest (decoding 40 files is quicker than 1797 arrays)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digits")
    bunch = load_digits()
    lines = []
    for i in range(40):
        Image.fromarray((bunch.images[i] * 255 / 16).astype("uint8")).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "label": str(bunch.target[i]),
                                 "split": "eval" if i % 4 == 0 else "train"}))
    (folder / "digits.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "digits.jsonl")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- the grid ------------------------------------------------------------------------------------


def test_cells_baseline_first_duplicates_merged():
    grid = Grid(("m",), {"reg_tokens": (0, 1, 2, 4)}, inits=("normal", "zeros"), seeds=(0, 1))
    got = cells(grid, Training(), {"m": {"class_token": 1, "reg_tokens": 1}})
    assert got[0].baseline and got[0].counts == {"reg_tokens": 1} and got[0].init == "none"
    described = {(c.counts["reg_tokens"], c.init, c.seed) for c in got[1:]}
    # count 0 grows nothing (one cell, no strategy); count 1 is the baseline; growth with `zeros`
    # draws nothing (first seed only), `normal` draws (every seed)
    assert described == {(0, "none", 0), (2, "normal", 0), (2, "normal", 1), (2, "zeros", 0),
                         (4, "normal", 0), (4, "normal", 1), (4, "zeros", 0)}
    trained = cells(grid, Training(steps=5), {"m": {"class_token": 1, "reg_tokens": 1}})
    assert {(c.counts["reg_tokens"], c.init, c.seed) for c in trained[1:]} >= {(2, "zeros", 1)}  # batches draw


def test_cells_joint_is_the_product_and_rows_all_keeps_the_baseline_count():
    grid = Grid(("m",), {"class_token": (0, 1), "reg_tokens": (0, 2)}, joint=True)
    got = cells(grid, Training(), {"m": {"class_token": 1, "reg_tokens": 0}})
    assert [c.counts for c in got] == [{"class_token": 1, "reg_tokens": 0}, {"class_token": 0, "reg_tokens": 0},
                                       {"class_token": 0, "reg_tokens": 2}, {"class_token": 1, "reg_tokens": 2}]
    assert {c.label for c in got[1:]} == {"class_token+reg_tokens"}
    all_rows = cells(Grid(("m",), {"reg_tokens": (0,)}), Training(steps=3, rows="all"), {"m": {"reg_tokens": 0}})
    assert [(c.baseline, c.training.steps) for c in all_rows] == [(True, 0), (False, 3)]


# -- a sweep end to end --------------------------------------------------------------------------


def test_sweep_writes_tidy_rows_plots_and_summary(tmp_path):
    result = surgery.sweep("vit_tiny_test", {"reg_tokens": [0, 2, 4]}, inits=["normal", "zeros"], metrics="drift",
                           out=tmp_path, progress=False)
    assert not result.failed and len(result.cells) == 5  # the baseline (0 registers), 2 counts x 2 inits
    rows = read_csv(tmp_path / "results.csv")
    assert all(field in rows[0] for field in REQUIRED)
    assert len(rows) == 1 * 3 + 4 * 3  # the baseline's three drift values, then four grown cells'
    baseline = [r for r in rows if r["baseline"] == "True"]
    assert {r["metric"]: float(r["value"]) for r in baseline} == {"drift_cosine": 0.0, "drift_maxdiff": 0.0,
                                                                  "drift_kl": 0.0}
    grown = {(r["count"], r["init"]): float(r["value"]) for r in rows if r["metric"] == "drift_maxdiff"}
    assert grown[("4", "normal")] > grown[("2", "normal")] > 0  # more new tokens, more drift
    assert json.loads(rows[0]["versions"])["torch"] == torch.__version__
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["metric"] == "drift_cosine"
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"{m}__vit_tiny_test__reg_tokens.png" for m in ("drift_cosine", "drift_kl", "drift_maxdiff")]
    summary = (tmp_path / "summary.md").read_text()
    assert "| reg_tokens | 4 | normal |" in summary and "- sites: reg_tokens = [0, 2, 4]" in summary


def test_rerun_skips_finished_cells_and_force_redoes_them(tmp_path, monkeypatch):
    first = surgery.sweep("vit_tiny_test", {"reg_tokens": [2]}, metrics=["drift"], out=tmp_path, progress=False)

    def no_cell(self, cell):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(Session, "run", no_cell)
    again = surgery.sweep("vit_tiny_test", {"reg_tokens": [2]}, metrics=["drift"], out=tmp_path, progress=False)
    assert again.skipped == len(again.cells) == 2
    assert [r.values for r in again.results] == [r.values for r in first.results]
    monkeypatch.undo()
    forced = surgery.sweep("vit_tiny_test", {"reg_tokens": [2]}, metrics=["drift"], out=tmp_path, force=True,
                           progress=False)
    assert forced.skipped == 0 and [r.values for r in forced.results] == [r.values for r in first.results]
    wider = surgery.sweep("vit_tiny_test", {"reg_tokens": [2, 3]}, metrics=["drift"], out=tmp_path, progress=False)
    assert wider.skipped == 2 and len(wider.cells) == 3  # only the new count ran
    assert {r["count"] for r in read_csv(tmp_path / "results.csv")} == {"0", "2", "3"}


def test_a_failing_cell_is_recorded_and_the_others_go_on(tmp_path):
    # class_token=0 is refused while the head pools on it (global_pool='token'): that cell fails
    result = surgery.sweep("vit_tiny_test", {"class_token": [0], "reg_tokens": [2]}, metrics=["drift"],
                           out=tmp_path, progress=False)
    (failed,) = result.failed
    assert failed.cell.counts == {"class_token": 0} and failed.error.startswith("CountError: site 'class_token'")
    assert len([r for r in result.results if r.ok]) == 2
    rows = read_csv(tmp_path / "results.csv")
    assert [r["error"] for r in rows if r["site"] == "class_token"] == [failed.error]
    assert "Failed cells (1)" in (tmp_path / "summary.md").read_text()
    rerun = surgery.sweep("vit_tiny_test", {"class_token": [0], "reg_tokens": [2]}, metrics=["drift"],
                          out=tmp_path, progress=False)
    assert rerun.skipped == 2  # the failed cell is tried again, the finished ones are not


def test_same_seeds_same_numbers_and_seeds_matter(tmp_path, digit_manifest):
    options = dict(metrics=["classify", "drift"], data=digit_manifest, train_steps=4, lr=0.05, batch_size=8,
                   progress=False, seeds=[0, 1])
    a = surgery.sweep("vit_tiny_test", {"reg_tokens": [2]}, out=tmp_path / "a", **options)
    b = surgery.sweep("vit_tiny_test", {"reg_tokens": [2]}, out=tmp_path / "b", **options)
    assert [r.values for r in a.results] == [r.values for r in b.results]
    assert [r.losses for r in a.results] == [r.losses for r in b.results]
    seed0, seed1 = (next(r for r in a.results if r.cell.seed == s and not r.cell.baseline) for s in (0, 1))
    assert seed0.losses != seed1.losses and seed0.values["drift_cosine"] != seed1.values["drift_cosine"]


def test_every_cell_starts_from_the_model_as_loaded(digit_manifest):
    plan = Plan(data=digit_manifest, metrics=("classify", "drift"), training=Training(steps=3, lr=0.1, batch_size=8,
                                                                                      rows="all"))
    session = Session("vit_tiny_test", plan)
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    grid = Grid(("vit_tiny_test",), {"class_token": (1,), "reg_tokens": (2,)}, inits=("normal",))
    baseline, *others = cells(grid, plan.training, {"vit_tiny_test": session.counts})
    first = session.run(baseline)
    trained = [session.run(c) for c in others]
    assert [c.counts for c in others] == [{"class_token": 1}, {"reg_tokens": 2}]
    assert all(r.ok and len(r.losses) == 3 for r in trained)  # rows="all": the class token trains at its count
    assert any(r.values["drift_maxdiff"] > 0 for r in trained)
    after = session.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert session.run(baseline).values == first.values


def test_head_modes_where_the_model_has_them(tmp_path):
    site = "num_cls_tokens.vision"
    result = surgery.sweep("imagebind_tiny_test", {site: [1, 2]}, head_modes=["first", "mean"], metrics=["drift"],
                           out=tmp_path, progress=False)
    assert not result.failed
    assert {(r.cell.counts[site], r.cell.head_mode) for r in result.results if not r.cell.baseline} == {
        (1, "mean"), (2, "first"), (2, "mean")}
    mean_1 = next(r for r in result.results if r.cell.head_mode == "mean" and r.cell.counts[site] == 1)
    assert mean_1.values["drift_maxdiff"] == 0  # one CLS token: its mean is itself
    with pytest.raises(SweepError, match="model 'vit_tiny_test' has no head mode to sweep"):
        surgery.sweep("vit_tiny_test", {"reg_tokens": [1]}, head_modes=["mean"], metrics=["drift"],
                      out=tmp_path / "timm", progress=False)


def test_bad_grids_are_refused_before_any_cell(tmp_path):
    with pytest.raises(SweepError, match="model 'vit_tiny_test' has no token site 'registers'"):
        surgery.sweep("vit_tiny_test", {"registers": [1]}, metrics=["drift"], out=tmp_path, progress=False)
    with pytest.raises(SweepError, match="train-steps needs a metric with a training loss"):
        surgery.sweep("vit_tiny_test", {"reg_tokens": [1]}, metrics=["drift"], train_steps=2, out=tmp_path,
                      progress=False)
    with pytest.raises(SweepError, match="counts are integers >= 0"):
        surgery.sweep("vit_tiny_test", {"reg_tokens": [-1]}, metrics=["drift"], out=tmp_path, progress=False)
    assert not (tmp_path / "results.csv").exists()


def test_quick_default_moves_its_metrics(tmp_path):
    """The quick sweep's base model learned the digits, and changing its registers shows."""
    from surgery.sweep.quick import quick_sweep

    result = quick_sweep(tmp_path, sites={"reg_tokens": (0, 1, 8)}, inits=("copy",), train_steps=5,
                         progress=False)
    assert not result.failed
    value = {(r.cell.counts["reg_tokens"], r.cell.baseline): r.values for r in result.results}
    assert value[(1, True)]["top1"] > 0.8  # trained: well above chance (0.1)
    assert value[(8, False)]["drift_cosine"] > value[(0, False)]["drift_cosine"] > 0
    assert list(tmp_path.glob("base_*.safetensors"))
