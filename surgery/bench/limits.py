"""The hardware limit a memory-bound op is measured against.

The fused ops move bytes and do almost no arithmetic, so their limit is memory bandwidth:

* CPU: a same-run `copy_` of a tensor of the op's size into a preallocated one. It is measured
  in the same run, interleaved with the op (a CPU's "peak" bandwidth is not a number anyone can
  look up, and caches make it depend on the size), and the fraction of the limit is
  copy time / op time (1.0: as fast as copying; above 1: faster than a copy, e.g. when the op
  reads inputs smaller than its output from cache).
* GPU: the device's peak memory bandwidth, with the fraction op GB/s / peak GB/s; a same-run
  device copy is measured too and reported beside it (what a real kernel can reach).

Peak bandwidth, first that applies:
    1. an override: `--peak-gbps` or the environment variable SURGERY_PEAK_GBPS (GB/s, 1e9 B/s)
    2. the device properties: 2 (double data rate) x memory clock x bus width, when torch
       reports both (`memory_clock_rate` in kHz, `memory_bus_width` in bits; CUDA 13 no longer
       reports the clock, torch then gives 0)
    3. the table below, by device name (vendor data sheets; first matching entry wins, so the
       more specific names come first)
    4. unknown: the fraction of peak is left empty and the device copy is the only limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import BenchmarkError

ENV = "SURGERY_PEAK_GBPS"

# (substring of torch.cuda.get_device_name, peak GB/s). Order matters: "GH200" contains "H200",
# "H100 PCIe" and "H100 NVL" must be tried before the SXM part's bare "H100".
PEAK_GBPS_TABLE: tuple[tuple[str, float], ...] = (
    ("GH200", 4000.0),  # Grace Hopper, 96 GB HBM3 (the 144 GB HBM3e part: 4900)
    ("H200", 4800.0),  # H200 SXM, 141 GB HBM3e
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # H100 SXM5 80 GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("H800", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # the 40 GB parts
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
)


@dataclass(frozen=True)
class Peak:
    """A device's peak memory bandwidth (None when unknown) and where the number came from."""

    gbps: Optional[float]
    source: str


def parse_override(text: Optional[str], what: str) -> Optional[float]:
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise BenchmarkError(f"{what} must be a bandwidth in GB/s (e.g. 3350), got {text!r}") from None
    if not value > 0:
        raise BenchmarkError(f"{what} must be a positive bandwidth in GB/s, got {text!r}")
    return value


def from_properties(props: object) -> Optional[float]:
    """2 x memory clock (kHz) x bus width (bits) / 8, in GB/s; None when either is not reported."""
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz <= 0 or bus_bits <= 0:
        return None
    return 2.0 * clock_khz * 1e3 * (bus_bits / 8) / 1e9


def from_table(name: str) -> Optional[tuple[str, float]]:
    """(matching table entry, GB/s) for a device name, or None."""
    for key, gbps in PEAK_GBPS_TABLE:
        if key.lower() in name.lower():
            return key, gbps
    return None


def peak_bandwidth(device: torch.device, override: Optional[float] = None) -> Peak:
    """The peak memory bandwidth of `device` (GPU only: a CPU's limit is the same-run copy)."""
    if device.type != "cuda":
        return Peak(None, "cpu: the limit is a same-run copy_")
    if override is not None:
        return Peak(override, "--peak-gbps")
    env = parse_override(os.environ.get(ENV), f"${ENV}")
    if env is not None:
        return Peak(env, f"${ENV}")
    props = torch.cuda.get_device_properties(device)
    computed = from_properties(props)
    if computed is not None:
        return Peak(computed, f"device properties: 2 x {props.memory_clock_rate} kHz x {props.memory_bus_width} bit")
    found = from_table(props.name)
    if found is not None:
        return Peak(found[1], f"table entry {found[0]!r} (surgery/bench/limits.py)")
    return Peak(None, f"unknown for {props.name!r}: set --peak-gbps or ${ENV}")


# -- arithmetic shared by every row ----------------------------------------------------------------


def gbps(nbytes: int, ms: float) -> float:
    """Bytes moved per second, in GB/s (1e9 B/s), at a time in ms."""
    return nbytes / (ms * 1e-3) / 1e9


def copy_bytes(numel: int, element_size: int) -> int:
    """Bytes a copy_ of `numel` elements moves: each is read once and written once."""
    return 2 * numel * element_size


def copy_pair(numel: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) of the limit copy: `dst.copy_(src)`, dst preallocated (and touched once, so its
    pages exist before timing, as the op's preallocated `out=` does)."""
    src = torch.ones(numel, dtype=dtype, device=device)
    dst = torch.zeros(numel, dtype=dtype, device=device)
    return src, dst
