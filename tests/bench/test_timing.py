"""surgery/bench/timing.py: device choice, percentiles, CPU timing at a fixed thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.bench import DeviceUnavailableError
from surgery.bench.timing import Timing, pairs, resolve_device, set_threads, time_many, wall_times
from surgery.errors import SurgeryError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_cpu_is_the_default_device():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(DeviceUnavailableError) as info:
        resolve_device(name)
    message = str(info.value)
    assert isinstance(info.value, SurgeryError)
    assert name in message and "no CUDA device" in message and "allowed here: cpu" in message


@pytest.mark.parametrize("name, mentions", [("tpu:0", "allowed: cpu, cuda"), ("meta", "cpu or cuda"),
                                            ("not a device", "allowed")])
def test_other_devices_are_refused(name, mentions):
    with pytest.raises(DeviceUnavailableError, match=mentions):
        resolve_device(name)


def test_percentiles_are_numpys():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    t = Timing.from_ms(samples, "test")
    assert (t.p20_ms, t.p50_ms, t.p80_ms) == tuple(np.percentile(samples, [20, 50, 80]))
    assert t.samples == 6 and t.method == "test"
    with pytest.raises(ValueError):
        Timing.from_ms([], "test")


def test_cpu_timer_runs_at_the_thread_count_it_was_given(tiny_budget):
    """torch.utils.benchmark.Timer runs at 1 thread unless told: each callable must see `threads`."""
    seen = {"a": set(), "b": set()}
    x = torch.randn(64, 64)
    fns = {"a": lambda: seen["a"].add(torch.get_num_threads()) or x @ x,
           "b": lambda: seen["b"].add(torch.get_num_threads()) or x + x}
    threads = 2 if torch.get_num_threads() != 2 else 1
    times = time_many(fns, torch.device("cpu"), tiny_budget, threads=threads)
    assert seen == {"a": {threads}, "b": {threads}}
    for t in times.values():
        assert t.method == "torch.utils.benchmark" and t.samples >= 1
        assert 0 < t.p20_ms <= t.p50_ms <= t.p80_ms


def test_set_threads_fixes_and_reports_the_count():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == 1
        with pytest.raises(SurgeryError, match="at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_wall_times_and_pairs_call_each_function_as_often_as_asked():
    calls = []
    assert len(wall_times(lambda: calls.append("x"), 3, torch.device("cpu"), warmup=2)) == 3
    assert len(calls) == 5
    order = []
    a, b = pairs(lambda: order.append("do"), lambda: order.append("undo"), 2, torch.device("cpu"), warmup=1)
    assert len(a) == len(b) == 2 and all(t >= 0 for t in a + b)
    assert order == ["do", "undo"] * 3  # alternating: the model is in the same state at every call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_uses_device_clocks(tiny_budget):
    x = torch.randn(1 << 20, device="cuda")
    times = time_many({"copy": lambda: x.clone()}, torch.device("cuda"), tiny_budget)
    assert times["copy"].method in ("triton.testing.do_bench", "cuda events") and times["copy"].p50_ms > 0
