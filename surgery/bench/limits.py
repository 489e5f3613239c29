"""The limits a memory-bound op is measured against, each named for what it is.

The fused ops move bytes and do almost no arithmetic, so memory traffic bounds them. Three limits,
named the same in every row, summary and plot: the "copy limit" (a same-run `copy_` of the op's
size), the "write-only floor" (the faster of two same-run fills of its output: nothing can be faster)
and, on GPU, the "device peak" bandwidth (override, device properties, or the table below). A CPU's
peak is no number one can look up, so there the same-run references are the limits. What each bounds
and when: docs/performance.md.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from . import BenchmarkError

ENV = "SURGERY_PEAK_GBPS"

# The names of the limits, as they appear in the `limit` column and the summaries.
COPY_LIMIT = "copy limit"
WRITE_FLOOR = "write-only floor"
DEVICE_PEAK = "device peak"
# The rows of the same-run references (their `backend`), and the limit each one measures.
COPY, FILLS = "copy", ("fill", "memset")
REFERENCES = {COPY: COPY_LIMIT, **{name: WRITE_FLOOR for name in FILLS}}

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
        return Peak(None, f"cpu: no peak; the limits are same-run references ({COPY_LIMIT}, {WRITE_FLOOR})")
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


def fill_bytes(numel: int, element_size: int) -> int:
    """Bytes a fill of `numel` elements moves: each is written once, nothing is read."""
    return numel * element_size


def copy_pair(numel: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) of the limit copy: `dst.copy_(src)`, dst preallocated (and touched once, so its
    pages exist before timing, as the op's preallocated `out=` does)."""
    src = torch.ones(numel, dtype=dtype, device=device)
    dst = torch.zeros(numel, dtype=dtype, device=device)
    return src, dst


def fill_fns(numel: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], Any]]:
    """The write-only floor's fills of one preallocated tensor of `numel` elements (touched once, like
    the copy's destination): {"fill": its zero_()} and, on CPU, {"memset": C's memset of its bytes}."""
    target = torch.ones(numel, dtype=dtype, device=device)
    nbytes = numel * target.element_size()

    def memset() -> torch.Tensor:
        ctypes.memset(target.data_ptr(), 0, nbytes)
        return target

    return {"fill": target.zero_, **({"memset": memset} if device.type == "cpu" else {})}


@dataclass(frozen=True)
class Reference:
    """A same-run reference measurement: its median and the bytes it moves."""

    ms: float
    nbytes: int

    @property
    def gbps(self) -> float:
        return gbps(self.nbytes, self.ms)


def reference_fns(copy_numel: int, fill_numel: Optional[int], dtype: torch.dtype,
                  device: torch.device) -> dict[str, tuple[Callable[[], Any], int]]:
    """{row name: (callable, bytes it moves)} of an op's same-run references: the copy of
    `copy_numel` elements, and the fills of the write-only floor when `fill_numel` is given."""
    element_size = torch.empty((), dtype=dtype).element_size()
    src, dst = copy_pair(copy_numel, dtype, device)
    refs = {COPY: (lambda: dst.copy_(src), copy_bytes(copy_numel, element_size))}
    if fill_numel is not None:
        moved = fill_bytes(fill_numel, element_size)
        refs.update({name: (fn, moved) for name, fn in fill_fns(fill_numel, dtype, device).items()})
    return refs


def measured(refs: Mapping[str, tuple[Callable[[], Any], int]],
             ms: Mapping[str, float]) -> tuple[Reference, Optional[Reference]]:
    """(copy limit, write-only floor or None) from the references' medians: the floor is the
    faster of the fills."""
    fills = [Reference(ms[name], refs[name][1]) for name in FILLS if name in refs]
    return Reference(ms[COPY], refs[COPY][1]), min(fills, key=lambda r: r.ms, default=None)


def headline(peak_fraction: Optional[float], floor_fraction: Optional[float],
             copy_fraction: Optional[float]) -> tuple[str, Optional[float]]:
    """(name, fraction) of the limit a row is judged against: the device peak where known, else the
    write-only floor where measured, else the copy limit."""
    if peak_fraction is not None:
        return DEVICE_PEAK, peak_fraction
    if floor_fraction is not None:
        return WRITE_FLOOR, floor_fraction
    return COPY_LIMIT, copy_fraction
