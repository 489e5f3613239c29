"""ImageBind embedding throughput (items/s) per modality: ours, and upstream's code beside it
(`surgery bench imagebind`, or `python benchmarks/imagebind_embed.py`).

Per implementation, dtype, mode (eager, compile), modality and batch: the median time of one
embedding call (no grad, eval mode), ours and upstream interleaved, on upstream's input shapes with
seeded random values. With `--upstream DIR` both run on the same weights and their outputs are
compared before anything is timed. Method and results: docs/performance.md.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from surgery.bench import BenchmarkError, OutputMismatchError, report
from surgery.bench.timing import resolve_device, set_threads

from .config import MODALITIES, ImageBindConfig
from .model import ImageBindModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_input(config: ImageBindConfig, modality: str, batch: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    m = config.modalities[modality]
    if modality == "text":
        ids = torch.randint(1, m.vocab_size - 1, (batch, m.context_length), generator=g)
        ids[:, -1] = m.vocab_size - 1  # EOT (the largest id) at the end: a full-length text
        return ids
    if modality == "vision":
        shape = (batch, 3, *m.input_size[1:])
    elif modality == "audio":
        shape = (batch, 3, 1, *m.input_size)  # 3 clips per item, upstream's audio loader
    else:
        shape = (batch, m.in_chans, *m.input_size)
    return torch.randn(*shape, generator=g).to(dtype)


def load_upstream(path: Path):
    """upstream's `imagebind.models` from a checkout, without running its package __init__ (data loaders)."""
    package = types.ModuleType("imagebind")
    package.__path__ = [str(path / "imagebind")]
    sys.modules["imagebind"] = package
    from imagebind.models import imagebind_model  # noqa: E402

    return imagebind_model


def build(config_name: str, upstream_dir: Path | None):
    """(ours, upstream or None), fp32, sharing upstream's weights when it is given."""
    config = ImageBindConfig.named(config_name)
    if upstream_dir is None:
        torch.manual_seed(0)
        return ImageBindModel(config).eval(), None
    if config_name != "huge":
        raise BenchmarkError("--upstream compares at --config huge (upstream has no other config)")
    torch.manual_seed(0)
    upstream = load_upstream(upstream_dir).imagebind_huge(pretrained=False).eval()
    with torch.device("meta"):
        ours = ImageBindModel(config)
    ours.load_state_dict(upstream.state_dict(), strict=True, assign=True)  # the same tensors, our modules
    return ours.eval(), upstream


def time_call(fn, x, min_run_time: float, label: str) -> float:
    import torch.utils.benchmark as benchmark  # imports torch's C++ extension builder: only when timing

    timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads(),
                            label=label)
    return timer.blocked_autorange(min_run_time=min_run_time).median


@dataclass
class EmbedConfig:
    quick: bool = False
    config: Optional[str] = None  # a named ImageBindConfig; None: huge (small with --quick)
    modalities: tuple[str, ...] = MODALITIES
    dtypes: Optional[tuple[str, ...]] = None  # None: float32 and bfloat16 (float32 with --quick)
    batches: tuple[int, ...] = (1, 8)
    modes: tuple[str, ...] = ("eager", "compile")
    upstream: Optional[Path] = None  # a checkout of facebookresearch/ImageBind
    min_run_time: float = 1.0  # seconds per Timer measurement
    rounds: int = 3  # interleaved measurements per implementation
    device: str = "cpu"
    threads: Optional[int] = None

    def checked(self) -> "EmbedConfig":
        """--quick's choices applied, every name checked before anything is built."""
        if self.quick:
            self.dtypes, self.modes, self.upstream, self.rounds = ("float32",), ("eager",), None, 2
        self.config = self.config or ("small" if self.quick else "huge")
        self.dtypes = self.dtypes or ("float32", "bfloat16")
        for what, given, allowed in (("--dtypes", self.dtypes, tuple(DTYPES)), ("--modes", self.modes, MODES),
                                     ("--modalities", self.modalities, MODALITIES)):
            wrong = [v for v in given if v not in allowed]
            if wrong:
                raise BenchmarkError(f"{what}: {', '.join(wrong)} not known; allowed: {', '.join(allowed)}")
        return self


MODES = ("eager", "compile")


def run(config: EmbedConfig, progress: bool = False) -> tuple[list[dict], dict]:
    """(rows, environment): one row per implementation x dtype x mode x modality x batch."""
    config.checked()
    device = resolve_device(config.device)
    threads = set_threads(config.threads)
    env = report.environment(device, threads, config=config.config, quick=config.quick)
    ours32, up32 = build(config.config, config.upstream)
    ours32, up32 = ours32.to(device), None if up32 is None else up32.to(device)
    model_config = ours32.config
    rows = []
    cells = [(d, m, b) for d in config.dtypes for m in config.modalities for b in config.batches]
    bar = report.progress_bar(total=len(cells), show=progress, desc="imagebind", unit="cell")
    for dtype_name in config.dtypes:
        dtype = DTYPES[dtype_name]
        if dtype == torch.float32:
            ours, upstream = ours32, up32
        else:  # fresh copies in this dtype; ours again shares upstream's
            upstream = None
            if up32 is not None:
                upstream = load_upstream(config.upstream).imagebind_huge().to(device, dtype).eval()
            if upstream is not None:
                upstream.load_state_dict(up32.state_dict())
                with torch.device("meta"):
                    ours = ImageBindModel(model_config)
                ours.load_state_dict(upstream.state_dict(), strict=True, assign=True)
                ours.eval()
            else:
                ours = ImageBindModel(model_config).to(device, dtype).eval()
                ours.load_state_dict(ours32.state_dict())
        impls = {"ours": ours, **({"upstream": upstream} if upstream is not None else {})}
        for modality in config.modalities:
            for batch in config.batches:
                x = make_input(model_config, modality, batch, dtype).to(device)
                if upstream is not None:  # same weights -> same embeddings, before anything is timed
                    with torch.no_grad():
                        a, b = ours({modality: x})[modality], upstream({modality: x})[modality]
                    tol = 1e-3 if dtype == torch.float32 else 0.05
                    err = (a.float() - b.float()).abs().max().item()
                    if err > tol * max(1.0, b.float().abs().max().item()):
                        raise OutputMismatchError(f"{modality} {dtype_name} b{batch}: ours and upstream differ by "
                                                  f"{err}; nothing was timed")
                for mode in config.modes:
                    rows += time_cell(impls, modality, x, batch, dtype_name, mode, config)
                bar.update(1)
        del impls, ours, upstream
        gc.collect()
    bar.close()
    return rows, env


def time_cell(impls: dict, modality: str, x: torch.Tensor, batch: int, dtype_name: str, mode: str,
              config: EmbedConfig) -> list[dict]:
    """Every implementation on one input, interleaved rounds (who goes first alternates)."""
    fns, warm = {}, {}
    for impl, model in impls.items():
        def embed(inp, model=model, modality=modality):
            with torch.no_grad():
                return model({modality: inp})[modality]
        fns[impl] = torch.compile(embed, dynamic=False) if mode == "compile" else embed
        start = time.perf_counter()
        fns[impl](x)  # warm-up (and compilation)
        warm[impl] = time.perf_counter() - start
    # interleaved rounds: a machine shared with other work slows both sides alike
    times = {impl: [] for impl in fns}
    for r in range(config.rounds):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for impl, fn in order:
            times[impl].append(time_call(fn, x, config.min_run_time, f"{impl} {modality}"))
    if mode == "compile":
        torch._dynamo.reset()
    rows = []
    for impl, ts in times.items():
        seconds = statistics.median(ts)
        rows.append({"impl": impl, "modality": modality, "dtype": dtype_name, "mode": mode, "batch": batch,
                     "seconds": seconds, "items_per_s": batch / seconds, "rounds": ts, "first_call_s": warm[impl]})
    return rows


def summary_markdown(rows: list[dict]) -> str:
    table = [[r["impl"], r["dtype"], r["mode"], r["modality"], str(r["batch"]), f"{r['items_per_s']:.2f}",
              r["seconds"] * 1e3, r["first_call_s"]] for r in rows]
    return ("Median of interleaved `torch.utils.benchmark.Timer` measurements per cell; random weights "
            "(throughput only).\n\n" + report.markdown_table(
                ["impl", "dtype", "mode", "modality", "batch", "items/s", "ms/call", "first call s"], table))


def write(rows: list[dict], env: dict, out: Path) -> list[Path]:
    out = Path(out)
    files = report.write_table(out, "imagebind_embed", rows, env)
    files.append(report.write_summary(out, "ImageBind embedding throughput",
                                      [(f"config {env.get('config')}", summary_markdown(rows))], env, files))
    return files


def main(config: EmbedConfig, out: Path, progress: bool = True) -> tuple[list[dict], list[Path]]:
    rows, env = run(config, progress=progress)
    return rows, write(rows, env, out)
