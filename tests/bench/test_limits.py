"""surgery/bench/limits.py: peak bandwidth from properties, the table, overrides; the arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from surgery.bench import BenchmarkError, limits


def test_peak_from_device_properties_is_ddr_clock_times_bus_width():
    # an H100 SXM5 reports 2619 MHz and a 5120-bit bus: 2 * 2.619e9 * 640 B = 3352 GB/s
    props = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)
    assert limits.from_properties(props) == pytest.approx(2 * 2.619e9 * 640 / 1e9)
    assert limits.from_properties(SimpleNamespace(memory_clock_rate=0, memory_bus_width=5120)) is None
    assert limits.from_properties(SimpleNamespace()) is None  # a torch that reports neither


@pytest.mark.parametrize("name, key, gbps", [
    ("NVIDIA H100 80GB HBM3", "H100", 3350.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 2000.0),
    ("NVIDIA H100 NVL", "H100 NVL", 3900.0),
    ("NVIDIA H200", "H200", 4800.0),
    ("NVIDIA GH200 480GB", "GH200", 4000.0),  # contains "H200": the more specific entry must win
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB", 2039.0),
    ("NVIDIA A100-SXM4-40GB", "A100", 1555.0),
])
def test_table_matches_the_most_specific_name(name, key, gbps):
    assert limits.from_table(name) == (key, gbps)


def test_unknown_device_name_has_no_table_entry():
    assert limits.from_table("Some Future Accelerator") is None


def test_cpu_has_no_peak_its_limit_is_the_copy():
    peak = limits.peak_bandwidth(torch.device("cpu"), override=1000.0)
    assert peak.gbps is None and "copy" in peak.source


def test_overrides_win_without_touching_the_device(monkeypatch):
    cuda = torch.device("cuda")  # never queried when an override is given
    assert limits.peak_bandwidth(cuda, override=1234.0) == limits.Peak(1234.0, "--peak-gbps")
    monkeypatch.setenv(limits.ENV, "2345")
    assert limits.peak_bandwidth(cuda) == limits.Peak(2345.0, f"${limits.ENV}")
    monkeypatch.setenv(limits.ENV, "fast")
    with pytest.raises(BenchmarkError, match="GB/s"):
        limits.peak_bandwidth(cuda)


@pytest.mark.parametrize("text", ["0", "-3", "x"])
def test_bad_overrides_are_refused(text):
    with pytest.raises(BenchmarkError, match="--peak-gbps"):
        limits.parse_override(text, "--peak-gbps")


def test_units():
    assert limits.gbps(2_000_000_000, 1000.0) == pytest.approx(2.0)  # 2 GB in 1 s
    assert limits.copy_bytes(10, 4) == 80  # read once, written once
    src, dst = limits.copy_pair(6, torch.bfloat16, torch.device("cpu"))
    assert src.shape == dst.shape == (6,) and dst.dtype == torch.bfloat16
    assert torch.equal(dst.copy_(src), src)


def test_each_limit_is_named_and_the_headline_is_the_tightest_known():
    assert (limits.COPY_LIMIT, limits.WRITE_FLOOR, limits.DEVICE_PEAK) == (
        "copy limit", "write-only floor", "device peak")
    assert limits.headline(0.7, 0.9, 1.4) == ("device peak", 0.7)  # GPU with a known peak
    assert limits.headline(None, 0.9, 1.4) == ("write-only floor", 0.9)  # CPU, an op with an output stream
    assert limits.headline(None, None, 1.4) == ("copy limit", 1.4)  # adapter_attention: no fill of its output


def test_the_fills_of_the_write_only_floor_write_and_read_nothing():
    assert limits.fill_bytes(10, 2) == 20  # written once, nothing read
    fns = limits.fill_fns(1000, torch.bfloat16, torch.device("cpu"))
    assert set(fns) == {"fill", "memset"}
    for fn in fns.values():
        target = fn()
        assert target.shape == (1000,) and target.dtype == torch.bfloat16
        target.fill_(3.0)
        assert not fn().any()  # every byte zeroed, the same preallocated tensor each call
        assert fn().data_ptr() == target.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_gpu_has_a_peak_or_says_why():
    peak = limits.peak_bandwidth(torch.device("cuda"))
    assert (peak.gbps is not None and peak.gbps > 100) or "unknown" in peak.source
