"""What surgery itself costs on a model of any size (`surgery bench surgery --model NAME --change SITE=N`).

The model is built by its registered name under `torch.device("meta")` and only its sites' tensors
are made real, so a 7B model costs nothing and an op on a base weight shows as an op on a meta tensor.
For each change it times resize, resize back and entering / leaving / swapping `tokens(...)` against a
same-run floor (allocate the new tensors, write each once), measures the extra memory at the peak and
after, and records every aten op to name any other tensor touched. Targets and results:
docs/performance.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..engine import STATE_ATTR
from ..errors import SurgeryError, describe_error
from . import BenchmarkError, report
from .timing import Timing, pairs, resolve_device, set_threads, synchronize

SWAP_TARGET_MS = 50.0
MEMORY_TARGET = 2.0  # peak extra bytes / site bytes


@dataclass
class CostConfig:
    model: str  # a registered model name
    changes: tuple[tuple[str, int], ...]  # (site, new count), each from the model's own count
    device: str = "cpu"
    quick: bool = False
    dtype: str = "float32"  # of the materialised site tensors
    repeats: Optional[int] = None  # timed calls per action (None: 30, or 5 with --quick)
    threads: Optional[int] = None


@dataclass
class CostRow:
    action: str  # resize, resize back, tokens enter, tokens exit, tokens swap
    site: str
    change: str  # "10 -> 64"
    device: str
    threads: int
    ms_p20: float
    ms_p50: float
    ms_p80: float
    samples: int
    site_bytes_before: int
    site_bytes_after: int
    site_bytes: int  # the larger of the two
    peak_extra_bytes: int
    retained_extra_bytes: int  # CPU: allocated by the call and still held; GPU: net change
    peak_over_site: float
    other_tensors_touched: int
    touched: str  # names of the other tensors an op read or wrote ("" when none)
    memory_method: str
    floor_ms: Optional[float] = None  # p50 of the same-run floor (None for "tokens exit": nothing to make)
    over_floor: Optional[float] = None  # ms_p50 / floor_ms
    target_ms: Optional[float] = None
    met_time: Optional[bool] = None
    met_memory: bool = True
    met_untouched: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CostResults:
    rows: list[CostRow] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    base_bytes: int = 0  # what the model's tensors would take if materialised
    materialised_bytes: int = 0  # what is really allocated (the sites' tensors)


# -- the model -----------------------------------------------------------------------------------


def site_tensors(model: nn.Module, site: Optional[str] = None) -> dict[int, tuple[str, torch.Tensor]]:
    """{id(tensor): (state-dict key, tensor)} of one site's tensors (every site's when None)."""
    import surgery
    from surgery.site import module_paths

    paths = module_paths(model)
    found = {}
    for name, s in surgery.sites(model).items():
        if site is not None and name != site:
            continue
        for t in s.tensors:
            tensor = getattr(t.module, t.name)
            if tensor is not None:
                found[id(tensor)] = (t.key(paths), tensor)
    return found


def build(config: CostConfig, device: torch.device) -> nn.Module:
    """The model on the meta device, with only the sites' tensors real, on `device`."""
    import surgery

    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BenchmarkError(f"--dtype {config.dtype!r} is not a floating-point dtype; allowed: float32, "
                             f"bfloat16, float16")
    try:
        with torch.device("meta"):  # the plugin's factory allocates nothing
            model = surgery.build(config.model)
    except SurgeryError:
        raise
    except Exception as exc:  # a factory that needs real values (reads a file, calls .item())
        raise BenchmarkError(f"model {config.model!r} cannot be built on the meta device, which this benchmark "
                             f"needs (only the sites' tensors are made real): {describe_error(exc)}") from None
    unknown = sorted({site for site, _ in config.changes} - set(surgery.sites(model)))
    if unknown:
        raise BenchmarkError(f"--change names {', '.join(map(repr, unknown))}, not a site of {config.model!r}; "
                             f"its sites: {', '.join(surgery.sites(model))}")
    g = torch.Generator().manual_seed(0)
    modules = {}
    for site in surgery.sites(model).values():
        for t in site.tensors:
            modules[id(t.module)] = t
    for t in modules.values():
        old = getattr(t.module, t.name)
        value = torch.randn(old.shape, generator=g).to(device=device, dtype=dtype)
        setattr(t.module, t.name, nn.Parameter(value, requires_grad=old.requires_grad))
    return model


def _nbytes(tensors: dict[int, tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors.values())


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return named


# -- instruments ---------------------------------------------------------------------------------


class _TouchLog(TorchDispatchMode):
    """Records, for every aten op, which tensors of interest it received."""

    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched = watched  # storage data_ptr -> name, of the tensors that must not be touched
        self.touched: dict[str, str] = {}  # name -> first op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                if a.device.type == "meta":
                    self.touched.setdefault(f"a meta tensor {tuple(a.shape)} (a base weight)", str(func))
                else:
                    name = self.watched.get(a.untyped_storage().data_ptr())
                    if name is not None:
                        self.touched.setdefault(name, str(func))
        return func(*args, **kwargs)


def touched_by(model: nn.Module, site: str, action: Callable[[], Any]) -> list[str]:
    """Names of the model's tensors other than `site`'s that `action` ran an op on, or replaced."""
    own = set(site_tensors(model, site))
    others = {name: t for name, t in _all_tensors(model).items() if id(t) not in own}
    watched = {t.untyped_storage().data_ptr(): name for name, t in others.items()
               if t.device.type != "meta" and t.numel()}
    before = {name: (id(t), t._version) for name, t in others.items()}
    with _TouchLog(watched) as log:
        action()
    after = _all_tensors(model)
    names = [f"{name} (by {op})" for name, op in log.touched.items()]
    names += [f"{name} (replaced or changed in place)" for name, (ident, version) in before.items()
              if name not in after or id(after[name]) != ident or after[name]._version != version]
    return names


def memory_of(action: Callable[[], Any], device: torch.device) -> tuple[int, int, str]:
    """(peak extra bytes, retained extra bytes, method) of one call of `action`. On CPU the profiler
    sees only the frees of blocks allocated during the call: the peak is an upper bound, and retained
    is what the call allocated and still holds (not net of the tensors it released)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        action()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base,
                "torch.cuda.max_memory_allocated")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        action()
    # every allocation (+bytes) and free (-bytes) of the CPU allocator, in time order
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise BenchmarkError("this torch's profiler exposes no allocation events (profiler.kineto_results); "
                             "CPU memory cannot be measured")
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live, "torch.profiler allocation events"


# -- running -------------------------------------------------------------------------------------


def _row(action: str, site: str, change: str, device: torch.device, threads: int, times: list[float],
         before: int, after: int, memory: tuple[int, int, str], touched: list[str],
         floor: Optional[list[float]]) -> CostRow:
    t = Timing.from_ms(times, "perf_counter")
    site_bytes = max(before, after)
    peak, retained, method = memory
    row = CostRow(action, site, change, str(device), threads, t.p20_ms, t.p50_ms, t.p80_ms, t.samples, before,
                  after, site_bytes, peak, retained, peak / site_bytes if site_bytes else 0.0, len(touched),
                  "; ".join(touched), method)
    if floor:
        row.floor_ms = Timing.from_ms(floor, "perf_counter").p50_ms
        row.over_floor = t.p50_ms / row.floor_ms if row.floor_ms > 0 else None
    row.met_memory = peak <= MEMORY_TARGET * site_bytes
    row.met_untouched = not touched
    if action == "tokens swap":
        row.target_ms, row.met_time = SWAP_TARGET_MS, t.p50_ms < SWAP_TARGET_MS
    return row


def floor_of(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The least a change of the site's tensors from `start` to `end` ({key: tensor}) must do: a
    new tensor of each end shape, written once: the rows both have copied, the rest (a growth's
    new rows) drawn from a seeded generator in float32, as the `normal` init draws them."""
    plan = []
    for key, old in start.items():
        shape = end[key].shape
        kept = min(old.numel(), end[key].numel())
        plan.append((old, shape, kept))
    generator = torch.Generator().manual_seed(0)

    def floor() -> None:
        for old, shape, kept in plan:
            flat = torch.empty(shape, dtype=old.dtype, device=old.device).view(-1)
            flat[:kept].copy_(old.reshape(-1)[:kept])
            new_rows = flat[kept:]
            if new_rows.dtype == torch.float32 and new_rows.is_cpu:  # drawn in place
                new_rows.normal_(generator=generator)
            elif new_rows.numel():  # drawn in float32 on the CPU, as `normal` does, then cast and moved
                new_rows.copy_(torch.empty(new_rows.shape, dtype=torch.float32).normal_(generator=generator))

    return floor


def measure_change(model: nn.Module, site: str, new: int, device: torch.device, threads: int,
                   repeats: int) -> list[CostRow]:
    import surgery

    old = surgery.counts(model)[site]
    change = f"{old} -> {new}"
    # what the engine keeps on the model (the recipe, the rows a truncate stashed), put back after
    # every undo: each call then starts from the same state, and a growth draws its new rows rather
    # than restoring those the previous "resize back" stashed
    state = model.__dict__.get(STATE_ATTR)
    at_old = {key: t.detach() for key, t in site_tensors(model, site).values()}  # parameters keep their
    before = _nbytes(site_tensors(model, site))  # identity across a resize: hold the data itself
    with surgery.tokens(model, **{site: new}):
        at_new = {key: t.detach() for key, t in site_tensors(model, site).values()}
        after = _nbytes(site_tensors(model, site))
    floor_there, floor_back = floor_of(at_old, at_new), floor_of(at_new, at_old)

    def there() -> None:
        surgery.resize(model, **{site: new})

    def back() -> None:
        surgery.resize(model, **{site: old})
        model.__dict__[STATE_ATTR] = state

    holder: list = []

    def enter() -> None:
        context = surgery.tokens(model, **{site: new})
        context.__enter__()
        holder.append(context)

    def leave() -> None:
        holder.pop().__exit__(None, None, None)

    def swap() -> None:
        with surgery.tokens(model, **{site: new}):
            pass

    t_there, t_back = pairs(there, back, repeats, device)
    t_enter, t_exit = pairs(enter, leave, repeats, device)
    f_there, f_back = pairs(floor_there, floor_back, repeats, device)
    del at_new, floor_there, floor_back  # the tensors of the new count, held for the floor only
    # memory, then touches: one call each, alternating so that each starts from the state it was timed in
    mem = {"resize": memory_of(there, device), "resize back": memory_of(back, device),
           "tokens enter": memory_of(enter, device), "tokens exit": memory_of(leave, device),
           "tokens swap": memory_of(swap, device)}
    touch = {"resize": touched_by(model, site, there), "resize back": touched_by(model, site, back),
             "tokens enter": touched_by(model, site, enter), "tokens exit": touched_by(model, site, leave)}
    touch["tokens swap"] = sorted(set(touch["tokens enter"] + touch["tokens exit"]))
    times = {"resize": t_there, "resize back": t_back, "tokens enter": t_enter, "tokens exit": t_exit,
             "tokens swap": [a + b for a, b in zip(t_enter, t_exit)]}
    floors = {"resize": f_there, "resize back": f_back, "tokens enter": f_there, "tokens exit": None,
              "tokens swap": f_there}  # leaving tokens(...) puts the old tensors back: nothing to make
    rows = []
    for action, ms in times.items():
        undo = action in ("resize back", "tokens exit")
        rows.append(_row(action, site, f"{new} -> {old}" if undo else change, device, threads, ms,
                         after if undo else before, before if undo else after, mem[action], touch[action],
                         floors[action]))
    if surgery.counts(model)[site] != old or model.__dict__.get(STATE_ATTR) is not state:
        raise BenchmarkError(f"site {site!r} was left at {surgery.counts(model)[site]}, not {old}, or the "
                             f"engine's state on the model was not put back")
    return rows


def run(config: CostConfig, progress: bool = False) -> CostResults:
    device = resolve_device(config.device)
    threads = set_threads(config.threads)
    repeats = config.repeats or (5 if config.quick else 30)
    model = build(config, device)
    everything = _all_tensors(model)
    results = CostResults(
        base_bytes=sum(t.numel() * t.element_size() for t in everything.values()),
        materialised_bytes=sum(t.numel() * t.element_size() for t in everything.values() if t.device.type != "meta"))
    results.env = report.environment(device, threads, model=config.model, dtype=config.dtype, quick=config.quick,
                                     base_bytes=results.base_bytes, materialised_bytes=results.materialised_bytes)
    for site, new in report.progress_bar(config.changes, show=progress, desc="surgery", unit="change"):
        results.rows += measure_change(model, site, new, device, threads, repeats)
    return results


# -- reporting -----------------------------------------------------------------------------------


def summary_markdown(results: CostResults) -> str:
    headers = ["action", "site", "change", "ms p50", "p20", "p80", "floor ms", "ms / floor", "site KB",
               "peak extra KB", "retained KB", "peak / site", "other tensors touched", "met"]
    table = []
    for r in results.rows:
        met = r.met_memory and r.met_untouched and (r.met_time is not False)
        floor = ("-", "-") if r.floor_ms is None else (r.floor_ms, f"{r.over_floor:.2f}" if r.over_floor else "-")
        table.append([r.action, r.site, r.change, r.ms_p50, r.ms_p20, r.ms_p80, *floor, f"{r.site_bytes / 1024:.1f}",
                      f"{r.peak_extra_bytes / 1024:.1f}", f"{r.retained_extra_bytes / 1024:.1f}",
                      f"{r.peak_over_site:.2f}", str(r.other_tensors_touched), met])
    return (f"Model {results.env.get('model')}: {results.base_bytes / 1e9:.2f} GB of tensors on the meta device, "
            f"{results.materialised_bytes / 1e6:.2f} MB materialised (the sites' tensors, {results.env.get('dtype')}). "
            f"Targets: a swap (tokens enter + exit) under {SWAP_TARGET_MS:.0f} ms, peak extra memory <= "
            f"{MEMORY_TARGET:.0f}x the site's bytes, no other tensor touched. Floor: the same-run time to "
            f"allocate the site's tensors at the new count and write them once (new rows drawn with torch's "
            f"seeded generator). Memory: "
            f"{results.rows[0].memory_method if results.rows else '-'}.\n\n"
            + report.markdown_table(headers, table))


def write(results: CostResults, out: Path) -> list[Path]:
    out = Path(out)
    files = report.write_table(out, "surgery_cost", [r.to_dict() for r in results.rows], results.env)
    files.append(report.write_summary(out, "Surgery cost", [("resize and tokens(...)", summary_markdown(results))],
                                      results.env, files))
    return files


def main(config: CostConfig, out: Path, progress: bool = True) -> tuple[CostResults, list[Path]]:
    results = run(config, progress=progress)
    return results, write(results, out)
