"""plugins/llama_adapter/bench_e2e.py (`surgery bench e2e`) on the tiny LLaMA-Adapter V2: tokens
checked first and carried, rows consistent, noisy points claim nothing, every grid gets its plot."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import surgery
import surgery_plugins.llama_adapter.bench_e2e as e2e
from surgery.bench import BenchmarkError, OutputMismatchError
from surgery.bench.timing import Budget, Timing
from surgery_plugins.llama_adapter.bench_e2e import E2EConfig, TokenCheck

TINY = "llama_adapter_v2_tiny"


@pytest.fixture
def tiny_budget() -> Budget:
    """One round of a few milliseconds: enough to exercise the code, not to measure anything."""
    return Budget(rounds=1, min_run_time=0.002, warmup_runs=1, warmup_ms=1.0, rep_ms=2.0)


def test_grids():
    assert E2EConfig().points() == [(q, b) for q in (1, 10, 64, 256) for b in (1, 4)]
    assert E2EConfig(quick=True).points() == list(e2e.TARGETS)
    assert E2EConfig(quick=True).dtype_list() == [torch.float32]
    assert E2EConfig().dtype_list() == [torch.float32, torch.bfloat16]
    assert (E2EConfig().prompt, E2EConfig(quick=True).prompt, E2EConfig(prompt_len=5).prompt) == (32, 16, 5)


def test_floor_is_the_adapter_models_llama_without_adapter():
    """The floor's logits equal plain LLaMA's (Transformer.forward) at the last position."""
    torch.manual_seed(0)
    model = surgery.build(TINY)
    tokens = torch.randint(3, model.config.vocab_size, (2, 6))
    with torch.inference_mode():
        kv = model.llama.new_kv_caches(2, torch.float32, "cpu", 16)
        ours = e2e.floor_forward(model.llama, tokens, 0, kv)
        kv2 = model.llama.new_kv_caches(2, torch.float32, "cpu", 16)
        plain = model.llama(tokens, 0, kv_caches=kv2)[:, -1].float()
    torch.testing.assert_close(ours, plain)


def test_paths_that_disagree_are_refused_before_timing(monkeypatch):
    torch.manual_seed(0)
    model = surgery.build(TINY)
    images, prompts = e2e.inputs(model, 2, 12, torch.device("cpu"), torch.float32)
    check = e2e.check_tokens(model, images, prompts, 3, "tiny")  # the real paths agree
    assert check.identical and check.compared == 2 * 3 and check.ours == check.upstream
    real = model.generate_tokens

    def drifting(*args, cache_adapter=True, **kwargs):
        out = real(*args, cache_adapter=cache_adapter, **kwargs)
        return out if cache_adapter else [[t + 1 for t in row] for row in out]

    monkeypatch.setattr(model, "generate_tokens", drifting)
    with pytest.raises(OutputMismatchError, match="greedy tokens .* differ"):
        e2e.check_tokens(model, images, prompts, 3, "tiny")


def test_run_and_write(tmp_path, tiny_budget):
    config = E2EConfig(model=TINY, dtypes=("float32",), query_lens=(1, 3), batches=(1, 2), prompt_len=6,
                       threads=1, budget=tiny_budget)
    results = e2e.run(config)
    assert [(r.query_len, r.batch, r.path) for r in results.rows] == [
        (q, b, p) for q in (1, 3) for b in (1, 2) for p in e2e.PATHS]
    for r in results.rows:
        assert r.prefill_ms_p20 <= r.prefill_ms_p50 <= r.prefill_ms_p80
        assert r.decode_ms_p20 <= r.decode_ms_p50 <= r.decode_ms_p80
        assert r.decode_tokens_per_s == pytest.approx(r.batch / (r.decode_ms_p50 * 1e-3))
    for p in results.points:
        ms = {r.path: r for r in results.rows if (r.query_len, r.batch) == (p.query_len, p.batch)}
        assert p.tokens_identical and p.tokens_compared == 4 * p.batch  # check_tokens=4 per prompt
        assert p.ours_over_floor == pytest.approx(ms["ours"].decode_ms_p50 / ms["floor"].decode_ms_p50)
        assert p.speedup_vs_upstream == pytest.approx(ms["upstream"].decode_ms_p50 / ms["ours"].decode_ms_p50)
        assert p.met is None  # no target at these points
    assert surgery.counts(surgery.build(TINY))["query_len"] == 3  # built fresh, untouched by the run
    files = {f.name for f in e2e.write(results, tmp_path)}
    assert {"e2e.csv", "e2e.json", "e2e_points.csv", "e2e_points.json", "summary.md", "e2e_decode_float32.png",
            "e2e_decode_float32_b1.png", "e2e_decode_float32_b2.png"} == files
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert len(rows) == 12 and {"git_commit", "device_name", "torch", "timestamp"} <= set(rows[0])
    summary = (tmp_path / "summary.md").read_text()
    assert "LLaMA-Adapter V2 generation" in summary and "identical at 4 of 4 points" in summary


def test_targets_are_judged(tiny_budget):
    config = E2EConfig(model=TINY, dtypes=("float32",), query_lens=(10,), batches=(1,), prompt_len=4, threads=1,
                       budget=tiny_budget)
    [point] = e2e.run(config).points
    assert (point.target_ours_over_floor, point.target_speedup) == e2e.TARGETS[(10, 1)]
    if point.noisy:  # a real timing on a shared machine may well be
        assert point.met is None and point.noise
    else:
        assert point.met == (point.ours_over_floor <= 1.10 and point.speedup_vs_upstream >= 1.2)


# -- bookkeeping, with fake timings (nothing here measures anything) ------------------------------


def fake_times(floor: float = 10.0, ours: float = 10.5, upstream: float = 14.0, spread: float = 0.04,
               wide: str = "") -> dict[str, Timing]:
    """time_point's answer: decode medians as given, each with p20/p80 at -+spread/2 (`wide`: that
    timing's spread is 30%)."""
    def timing(name: str, ms: float) -> Timing:
        half = (0.15 if name == wide else spread / 2) * ms
        return Timing(ms - half, ms, ms + half, 9, "fake")

    decode = {"floor": floor, "ours": ours, "upstream": upstream}
    times = {"visual": timing("visual", 3.0)}
    for path, ms in decode.items():
        times[f"{path}.prefill"] = timing(f"{path}.prefill", 4 * ms)
        times[f"{path}.decode"] = timing(f"{path}.decode", ms)
    return times


SAME = TokenCheck([[5, 6, 7], [8]], [[5, 6, 7], [8]])


def test_a_point_faster_than_the_floor_or_with_a_wide_spread_is_noisy_and_claims_no_met():
    clean = e2e.make_point("float32", 10, 1, SAME, fake_times())
    assert not clean.noisy and clean.noise == "" and clean.met is True
    assert clean.decode_spread == pytest.approx(0.04)
    assert clean.ours_over_floor == pytest.approx(1.05) and clean.speedup_vs_upstream == pytest.approx(14 / 10.5)
    missed = e2e.make_point("float32", 10, 1, SAME, fake_times(ours=12.0))
    assert not missed.noisy and missed.met is False  # 1.2 > 1.10: a real miss is still a miss

    faster = e2e.make_point("float32", 10, 1, SAME, fake_times(ours=9.9))
    assert faster.noisy and faster.met is None and "faster than the no-adapter floor" in faster.noise
    assert faster.target_ours_over_floor == 1.10  # the target is still shown
    wide = e2e.make_point("float32", 64, 4, SAME, fake_times(ours=12.0, upstream=30.0, wide="upstream.decode"))
    assert wide.noisy and wide.met is None and wide.decode_spread == pytest.approx(0.30)
    assert "decode spread 30% > 10%" in wide.noise
    off_target = e2e.make_point("float32", 3, 2, SAME, fake_times(ours=9.0))
    assert off_target.noisy and off_target.met is None and off_target.target_ours_over_floor is None


def test_points_carry_the_token_checks_result(monkeypatch):
    """The point's tokens_identical / tokens_compared are what the comparison returned, and a
    comparison that is not identical stops the run before anything is timed."""
    checks = iter([SAME, TokenCheck([[5, 6, 7], [8]], [[5, 6, 9], [8]])])
    monkeypatch.setattr(e2e, "compare_tokens", lambda model, images, prompts, n: next(checks))
    timed = []
    monkeypatch.setattr(e2e, "time_point", lambda *args: timed.append(args) or fake_times())
    config = E2EConfig(model=TINY, dtypes=("float32",), query_lens=(3,), batches=(2,), prompt_len=4, threads=1)
    [point] = e2e.run(config).points
    assert point.tokens_identical is True and point.tokens_compared == 4
    with pytest.raises(OutputMismatchError, match=r"differ \(\[\[5, 6, 7\], \[8\]\] vs \[\[5, 6, 9\], \[8\]\]\)"):
        e2e.run(config)
    assert len(timed) == 1  # the mismatching point was never timed
    assert not TokenCheck([], []).identical  # nothing compared is not a pass
    with pytest.raises(BenchmarkError, match="check_tokens must be at least 1"):
        e2e.run(E2EConfig(model=TINY, check_tokens=0))


def test_quick_writes_its_plot_and_flags_noisy_points(monkeypatch, tmp_path):
    """`e2e --quick` (the two target points, one query_len per batch) writes the PNG the README
    promises; a noisy point says so in the CSV and the summary and claims no met."""
    times = iter([fake_times(), fake_times(ours=9.5)])  # (10, 1) clean, (64, 4) faster than the floor
    monkeypatch.setattr(e2e, "time_point", lambda *args: next(times))
    config = E2EConfig(model=TINY, quick=True, prompt_len=4, threads=1)
    results, files = e2e.main(config, tmp_path, progress=False)
    assert [(p.query_len, p.batch) for p in results.points] == list(e2e.TARGETS)
    png = tmp_path / "e2e_decode_float32.png"
    assert png in files and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.tokens_compared for p in results.points] == [4 * 1, 4 * 4]  # the real check ran
    with open(tmp_path / "e2e_points.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["noisy"], r["met"]) for r in rows] == [("False", "True"), ("True", "")]
    assert "faster than the no-adapter floor" in rows[1]["noise"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| - (noisy) |" in summary and "**yes**: ours faster than the no-adapter floor" in summary
    assert "identical at 2 of 2 points (20 tokens)" in summary and "`e2e_decode_float32.png`" in summary
