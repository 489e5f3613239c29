"""Shared helpers of the benchmark tests: a timing budget small enough for unit tests."""

import pytest

from surgery.bench.timing import Budget


@pytest.fixture
def tiny_budget() -> Budget:
    """One round of a few milliseconds: enough to exercise the code, not to measure anything."""
    return Budget(rounds=1, min_run_time=0.002, warmup_runs=1, warmup_ms=1.0, rep_ms=2.0)
