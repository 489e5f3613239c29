"""Results on disk, public for plugins' benchmarks: a CSV and a JSON file per table, Markdown, PNG plots.

    env = environment(device, threads)              # device, versions, git commit, timestamp
    write_table(out, "kernels", rows, env)          # kernels.csv + kernels.json {"meta": env, "rows": [...]}
    write_summary(out, "Kernels", [("heading", markdown)], env)   # summary.md

Every row carries the environment, so a CSV row read alone still says where it was measured.
matplotlib (Agg) and tqdm are optional (the `plot` extra): without them plots and progress bars are
skipped, the summary says so, and the tables are written all the same.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from .timing import device_name

ENV_FIELDS = ("device_name", "torch", "triton", "git_commit", "timestamp")
PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install 'token-surgery[plot]')"


# -- the environment ---------------------------------------------------------------------------


def git_commit(root: Optional[Path] = None) -> str:
    """The commit of the checkout this package runs from ("+dirty" with local changes), or
    "unknown" outside a git checkout. Read-only git commands."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip()[:12] + ("+dirty" if status.stdout.strip() else "")


def triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    return getattr(triton, "__version__", "unknown")


def environment(device: torch.device, threads: int, **extra: Any) -> dict[str, Any]:
    """Where and when a run happened: goes into every row and the JSON's "meta"."""
    env = {
        "device_name": device_name(device),
        "device": str(device),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "git_commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    env.update(extra)
    return env


# -- tables on disk ----------------------------------------------------------------------------


def with_env(rows: Iterable[Mapping[str, Any]], env: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each row followed by the environment fields (a row's own fields win)."""
    tail = {k: env[k] for k in ENV_FIELDS if k in env}
    return [{**dict(row), **{k: v for k, v in tail.items() if k not in row}} for row in rows]


def write_table(out: Path, name: str, rows: Sequence[Mapping[str, Any]], env: Mapping[str, Any]) -> list[Path]:
    """`out/name.csv` and `out/name.json`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    full = with_env(rows, env)
    fields: list[str] = []
    for row in full:
        fields.extend(k for k in row if k not in fields)
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in full:
            writer.writerow({k: _csv_cell(row.get(k)) for k in fields})
    json_path.write_text(json.dumps({"meta": dict(env), "rows": full}, indent=1, default=str) + "\n",
                         encoding="utf-8")
    return [csv_path, json_path]


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text(encoding="utf-8"))["rows"]


# -- Markdown ------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant decimals, None as "-", bools as yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_line(env: Mapping[str, Any]) -> str:
    return (f"{env.get('device_name')} ({env.get('device')}, {env.get('threads')} threads of "
            f"{env.get('cpu_count')} CPUs), torch {env.get('torch')}, triton {env.get('triton') or '-'}, "
            f"commit {env.get('git_commit')}, {env.get('timestamp')}")


def write_summary(out: Path, title: str, sections: Sequence[tuple[str, str]], env: Mapping[str, Any],
                  files: Sequence[Path] = ()) -> Path:
    """`out/summary.md`: a title, the environment, then each (heading, Markdown body)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", "", f"Machine: {environment_line(env)}", ""]
    if not can_plot():
        parts += [PLOTS_SKIPPED[0].upper() + PLOTS_SKIPPED[1:] + ".", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    if files:
        parts += ["Files: " + ", ".join(f"`{Path(p).name}`" for p in files), ""]
    path = out / "summary.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# -- progress --------------------------------------------------------------------------------------


class _NoBar:
    def __init__(self, items: Optional[Iterable[Any]] = None) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items or ())

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, text: str) -> None:  # tqdm.write: a line printed past the bar
        print(text)


def progress_bar(items: Optional[Iterable[Any]] = None, *, total: Optional[int] = None, show: bool = True,
                 desc: str = "", unit: str = "it") -> Any:
    """A tqdm bar over `items` (or one updated by hand up to `total`); one that shows nothing when
    `show` is False or tqdm is not installed."""
    if not show or importlib.util.find_spec("tqdm") is None:
        return _NoBar(items)
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


# -- plots ---------------------------------------------------------------------------------------


def can_plot() -> bool:
    """Whether matplotlib is installed (the `plot` extra): else the plot functions return None."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


# the same-run references' lines, in the order they are given: dashed black, dotted grey, dash-dot grey
REFERENCE_STYLES = (dict(color="black", linestyle="--", linewidth=2), dict(color="gray", linestyle=":", linewidth=2),
                    dict(color="gray", linestyle="-.", linewidth=2))


def plot_bandwidth(rows: Sequence[Mapping[str, Any]], path: Path, title: str, peak_gbps: Optional[float] = None,
                   references: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """GB/s against the bytes the op must move (`op_bytes`), one line per backend, one panel per op;
    the same-run references ({backend: name of the limit}) drawn dashed, the device's peak (GPU)
    as a horizontal line."""
    if not can_plot():
        return None
    plt = _pyplot()
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(5.2 * len(ops), 4.2), squeeze=False)
    references = references or {}
    styles = dict(zip(references, itertools.cycle(REFERENCE_STYLES)))
    for ax, op in zip(axes[0], ops):
        mine = [r for r in rows if r["op"] == op and r.get("gbps") is not None]
        for backend in dict.fromkeys(r["backend"] for r in mine):
            points = sorted((r["op_bytes"], r["gbps"]) for r in mine if r["backend"] == backend)
            style = styles.get(backend, dict(marker="o"))
            label = f"{backend} ({references[backend]})" if backend in references else backend
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
        if peak_gbps:
            ax.axhline(peak_gbps, color="red", linewidth=1.5, label=f"device peak {peak_gbps:.0f} GB/s")
        ax.set_xscale("log")
        ax.set_xlabel("bytes the op must move")
        ax.set_ylabel("GB/s")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(series: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str, xlabel: str,
               ylabel: str, logx: bool = False, baseline: Optional[tuple[float, float]] = None) -> Optional[Path]:
    """A simple line plot: {label: [(x, y), ...]}; `baseline` (x, y), when given, is marked with a
    star and a dashed horizontal line (the reference the other points are read against)."""
    if not can_plot():
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if baseline is not None:
        ax.axhline(baseline[1], color="black", linestyle="--", linewidth=1, alpha=0.6)
        ax.plot([baseline[0]], [baseline[1]], marker="*", markersize=14, color="black", linestyle="none",
                label=f"baseline ({baseline[0]:g}, {baseline[1]:.3g})")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], path: Path, title: str,
              ylabel: str) -> Optional[Path]:
    """Grouped bars: one group per label in `groups`, one bar per series ({label: a value per group});
    drawn for any number of groups, so a one-point grid still gets its figure."""
    if not can_plot():
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.8, 1.1 * len(groups) * max(1, len(series)) / 2 + 2), 4.2))
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        if len(values) != len(groups):
            raise ValueError(f"series {label!r} has {len(values)} values for {len(groups)} groups")
        ax.bar([g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))], values, width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
