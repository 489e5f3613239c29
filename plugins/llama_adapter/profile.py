"""Where the time goes in one LLaMA-Adapter V2 generation (`surgery profile`).

Runs `generate_tokens` (greedy, this project's path) under `torch.profiler`, writes a Chrome /
Perfetto trace and prints the top operators by self time and the time of each stage. Nothing is
patched: the fused ops are torch ops, recorded as `surgery::<op>` by themselves, and the stages'
ranges (also NVTX on GPU) are opened and closed by torch's module hooks, removed after the run.
The stages: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from surgery.bench import BenchmarkError
from surgery.bench.timing import resolve_device, set_threads

STAGES = ("visual_path", "visual_encoder", "query_concat", "visual_blocks", "adapter_add", "prefill",
          "adapter_attention")


@dataclass
class ProfileConfig:
    device: str = "cpu"
    model: str = "llama_adapter_v2_bench"
    dtype: str = "float32"
    query_len: Optional[int] = None  # None: the model's own
    batch: int = 1
    prompt_len: int = 16
    steps: int = 8  # tokens generated (the first comes from the prefill)
    threads: Optional[int] = None
    top: int = 15  # operators printed
    record_shapes: bool = False


@dataclass
class ProfileResult:
    trace: Path
    stages: list[dict] = field(default_factory=list)  # {name, calls, total_ms, mean_ms}
    top_table: str = ""
    tokens: list[list[int]] = field(default_factory=list)


class Ranges:
    """Open/close named ranges: a torch.profiler record_function, plus NVTX on GPU."""

    def __init__(self, nvtx: bool) -> None:
        self.nvtx = nvtx
        self.open: list[Any] = []

    def push(self, name: str) -> None:
        ctx = torch.profiler.record_function(name)
        ctx.__enter__()
        self.open.append(ctx)
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)

    def pop(self) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self.open.pop().__exit__(None, None, None)

    @contextlib.contextmanager
    def range(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop()


@contextlib.contextmanager
def labelled_stages(model: nn.Module, ranges: Ranges) -> Iterator[None]:
    """Open and close the module stages' ranges with forward hooks on `model`; removed afterwards."""
    handles = []
    passes = [0]  # forward passes of the language model so far: 0 is the prefill

    def around(first: nn.Module, last: nn.Module, name: Callable[[], str]) -> None:
        handles.append(first.register_forward_pre_hook(lambda m, a: ranges.push(name())))
        handles.append(last.register_forward_hook(lambda m, a, o: ranges.pop()))

    def language_pass() -> str:
        passes[0] += 1
        return "prefill" if passes[0] == 1 else f"decode_step_{passes[0] - 1}"

    try:
        around(model.clip, model.visual_proj_norm, lambda: "visual_path")  # forward_visual's first and last
        around(model.clip, model.clip, lambda: "visual_encoder")
        if len(model.visual_blocks):
            around(model.visual_blocks[0], model.visual_blocks[-1], lambda: "visual_blocks")
        around(model.llama.tok_embeddings, model.llama.output, language_pass)
        yield
    finally:
        for h in handles:
            h.remove()


def stage_name(event_name: str) -> str:
    """The stage an event belongs to: a fused op's torch op (`surgery::adapter_add`,
    `surgery::adapter_add_triton`) is its op's stage; a range keeps its name."""
    if event_name.startswith("surgery::"):
        return event_name.removeprefix("surgery::").removesuffix("_triton")
    return event_name


def _self_time_key(device: torch.device) -> str:
    return "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # torch >= 2.4 names


def stage_times(events: Any) -> list[dict]:
    """{name, calls, total_ms, mean_ms} of every labelled range, in the order of STAGES then steps."""
    totals: dict[str, list[float]] = {}
    for e in events:
        name = stage_name(e.name)
        if name in STAGES or name.startswith("decode_step_"):
            totals.setdefault(name, []).append(e.cpu_time_total / 1e3)  # us -> ms, wall time on the CPU side
    order = [s for s in STAGES if s in totals]
    order += sorted((n for n in totals if n.startswith("decode_step_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    return [{"name": n, "calls": len(totals[n]), "total_ms": sum(totals[n]), "mean_ms": sum(totals[n]) / len(totals[n])}
            for n in order]


def run(config: ProfileConfig, out: Path) -> ProfileResult:
    import surgery
    from torch.profiler import ProfilerActivity, profile

    device = resolve_device(config.device)
    set_threads(config.threads)
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BenchmarkError(f"--dtype {config.dtype!r}: allowed float32, bfloat16, float16")
    if config.steps < 1 or config.batch < 1 or config.prompt_len < 1:
        raise BenchmarkError("--steps, --batch and --prompt-len must be at least 1")
    torch.manual_seed(0)
    model = surgery.build(config.model, device=str(device)).to(dtype)
    if config.query_len is not None:
        surgery.resize(model, query_len=config.query_len, init="normal")
    gen = torch.Generator().manual_seed(1)
    size = model.config.clip.image_size
    images = torch.randn(config.batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    prompts = [[1, *torch.randint(3, model.config.vocab_size, (config.prompt_len - 1,), generator=gen).tolist()]
               for _ in range(config.batch)]
    model.generate_tokens(images, prompts, max_gen_len=2, temperature=0)  # warm-up: lazy init, first-touch
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ranges = Ranges(nvtx=device.type == "cuda")
    with labelled_stages(model, ranges), profile(activities=activities, record_shapes=config.record_shapes) as prof:
        with ranges.range("generate"):
            tokens = model.generate_tokens(images, prompts, max_gen_len=config.steps, temperature=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    result = ProfileResult(trace, stage_times(prof.events()), tokens=tokens)
    result.top_table = prof.key_averages().table(sort_by=_self_time_key(device), row_limit=config.top)
    (out / "stages.json").write_text(json.dumps(result.stages, indent=1) + "\n", encoding="utf-8")
    (out / "top_ops.txt").write_text(result.top_table + "\n", encoding="utf-8")
    return result


def format_stages(stages: list[dict]) -> str:
    lines = [f"{'STAGE':<20} {'CALLS':>5} {'TOTAL ms':>10} {'MEAN ms':>10}"]
    lines += [f"{s['name']:<20} {s['calls']:>5} {s['total_ms']:>10.3f} {s['mean_ms']:>10.3f}" for s in stages]
    return "\n".join(lines)
