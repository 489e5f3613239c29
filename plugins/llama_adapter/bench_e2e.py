"""LLaMA-Adapter V2 generation end to end: prefill and decode, three ways (`surgery bench e2e`).

`floor` (the same LLaMA with no adapter: the limit an adapter path can approach), `ours` (adapter
keys/values computed once per image, the fused ops) and `upstream` (`cache_adapter=False`: recomputed
at every forward), all through the model's own code. Before anything is timed the greedy tokens of
ours and upstream must be identical: a speed-up of a path that computes something else means
nothing. A point is `noisy`, claiming neither met nor not met, when ours beats the floor or a decode
timing spreads more than NOISY_SPREAD. Method and results: docs/performance.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Optional

import torch

from surgery.bench import BenchmarkError, OutputMismatchError, report
from surgery.bench.timing import Budget, Timing, resolve_device, set_threads, time_many

PATHS = ("floor", "ours", "upstream")
# (query_len, batch): (max decode ours/floor, min decode upstream/ours), from the LLaMA-Adapter issue
TARGETS = {(10, 1): (1.10, 1.2), (64, 4): (1.20, 2.0)}
# a decode timing whose (p80 - p20) / p50 exceeds this is too noisy to judge a 10% target with
NOISY_SPREAD = 0.10


@dataclass
class E2EConfig:
    device: str = "cpu"
    quick: bool = False
    model: str = "llama_adapter_v2_bench"
    dtypes: Optional[tuple[str, ...]] = None  # None: float32 with --quick, else float32 and bfloat16
    query_lens: Optional[tuple[int, ...]] = None  # None: (1, 10, 64, 256); --quick: the target points
    batches: Optional[tuple[int, ...]] = None  # None: (1, 4)
    prompt_len: Optional[int] = None  # tokens per prompt: None: 32 (16 with --quick)
    check_tokens: int = 4  # greedy tokens compared between ours and upstream
    threads: Optional[int] = None
    budget: Optional[Budget] = None

    @property
    def prompt(self) -> int:
        return self.prompt_len or (16 if self.quick else 32)

    def points(self) -> list[tuple[int, int]]:
        """(query_len, batch) pairs: the full grid, or with --quick the two target points."""
        if self.quick and self.query_lens is None and self.batches is None:
            return list(TARGETS)
        return [(q, b) for q in (self.query_lens or (1, 10, 64, 256)) for b in (self.batches or (1, 4))]

    def dtype_list(self) -> list[torch.dtype]:
        names = self.dtypes or (("float32",) if self.quick else ("float32", "bfloat16"))
        out = []
        for name in names:
            if name not in ("float32", "bfloat16", "float16"):
                raise BenchmarkError(f"unknown dtype {name!r}; allowed: float32, bfloat16, float16")
            out.append(getattr(torch, name))
        return out


@dataclass
class E2ERow:
    dtype: str
    query_len: int
    batch: int
    path: str
    prompt_len: int
    device: str
    threads: int
    prefill_ms_p20: float
    prefill_ms_p50: float
    prefill_ms_p80: float
    decode_ms_p20: float
    decode_ms_p50: float
    decode_ms_p80: float
    decode_tokens_per_s: float  # batch / decode step (p50)
    timer: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class E2EPoint:
    """The three paths at one (dtype, query_len, batch), as ratios."""

    dtype: str
    query_len: int
    batch: int
    tokens_identical: bool  # ours vs upstream, greedy: the check's result (made before timing)
    tokens_compared: int  # greedy tokens that check compared, all rows
    visual_ms: float
    floor_decode_ms: float
    ours_decode_ms: float
    upstream_decode_ms: float
    ours_over_floor: float  # decode step
    speedup_vs_upstream: float  # decode tokens/s, ours / upstream
    prefill_speedup_vs_upstream: float
    decode_spread: float  # the widest (p80 - p20) / p50 of the three decode timings
    noisy: bool  # ours faster than the floor, or decode_spread > NOISY_SPREAD: no met claimed
    noise: str = ""  # why it is noisy
    target_ours_over_floor: Optional[float] = None
    target_speedup: Optional[float] = None
    met: Optional[bool] = None  # None: no target here, or the point is noisy

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class E2EResults:
    rows: list[E2ERow] = field(default_factory=list)
    points: list[E2EPoint] = field(default_factory=list)
    env: dict = field(default_factory=dict)


# -- the three paths -----------------------------------------------------------------------------


def floor_forward(llama: torch.nn.Module, tokens: torch.Tensor, start_pos: int, kv_caches: list) -> torch.Tensor:
    """The adapter model's LLaMA with no adapter, finished as `forward_inference` finishes (logits
    of the last position only), so the floor does the same work minus the adapter."""
    h = llama.forward_layers(llama.tok_embeddings(tokens), start_pos, kv_caches=kv_caches)  # (B, T, D)
    return llama.output(llama.norm(h[:, -1, :])).float()  # (B, V)


def build(config: E2EConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import surgery

    torch.manual_seed(0)
    return surgery.build(config.model, device=str(device)).to(dtype)


def inputs(model: torch.nn.Module, batch: int, prompt_len: int, device: torch.device, dtype: torch.dtype):
    """(images (B, 3, S, S), prompts (B, P) token ids) of a fixed seed."""
    gen = torch.Generator().manual_seed(1)
    size = model.config.clip.image_size
    images = torch.randn(batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    prompts[:, 0] = 1  # BOS
    return images, prompts


@dataclass(frozen=True)
class TokenCheck:
    """The greedy tokens of our path and upstream's, per prompt."""

    ours: list[list[int]]
    upstream: list[list[int]]

    @property
    def compared(self) -> int:
        return sum(len(row) for row in self.ours)

    @property
    def identical(self) -> bool:
        return self.compared > 0 and self.ours == self.upstream


def compare_tokens(model: torch.nn.Module, images: torch.Tensor, prompts: torch.Tensor, n: int) -> TokenCheck:
    """`n` greedy tokens per prompt of our path and of upstream's."""
    rows = [p[: 8 + k] for k, p in enumerate(prompts.tolist())]  # ragged prompts: the real loop's masking
    ours = model.generate_tokens(images, rows, max_gen_len=n, temperature=0, cache_adapter=True)
    theirs = model.generate_tokens(images, rows, max_gen_len=n, temperature=0, cache_adapter=False)
    return TokenCheck(ours, theirs)


def check_tokens(model: torch.nn.Module, images: torch.Tensor, prompts: torch.Tensor, n: int,
                 where: str) -> TokenCheck:
    """The comparison of the greedy tokens, which must be identical (else nothing is timed)."""
    check = compare_tokens(model, images, prompts, n)
    if not check.identical:
        raise OutputMismatchError(f"{where}: greedy tokens of this project's path and upstream's differ "
                                  f"({check.ours} vs {check.upstream}); nothing was timed")
    return check


def time_point(model: torch.nn.Module, images: torch.Tensor, prompts: torch.Tensor, device: torch.device,
               budget: Budget, threads: int) -> dict[str, Timing]:
    """visual, and prefill / decode of each path, interleaved."""
    B, P = prompts.shape
    dtype = model.llama.tok_embeddings.weight.dtype
    token = prompts[:, -1:]  # (B, 1): any token; the step's cost does not depend on its value
    with torch.inference_mode():
        vq = model.forward_visual(images)  # (B, Q, D)
        akv = model.adapter_kv(vq)
        caches = {p: model.llama.new_kv_caches(B, dtype, device, P + 8) for p in PATHS}
        # warm every cache up to position P, so that a decode step reads P cached positions
        floor_forward(model.llama, prompts, 0, caches["floor"])
        model.forward_inference(vq, prompts, 0, adapter_kv=akv, kv_caches=caches["ours"])
        model.forward_inference(vq, prompts, 0, kv_caches=caches["upstream"])
    fns = {
        "visual": lambda: model.forward_visual(images),
        "floor.prefill": lambda: floor_forward(model.llama, prompts, 0, caches["floor"]),
        "ours.prefill": lambda: model.forward_inference(vq, prompts, 0, adapter_kv=model.adapter_kv(vq),
                                                        kv_caches=caches["ours"]),
        "upstream.prefill": lambda: model.forward_inference(vq, prompts, 0, kv_caches=caches["upstream"]),
        "floor.decode": lambda: floor_forward(model.llama, token, P, caches["floor"]),
        "ours.decode": lambda: model.forward_inference(vq, token, P, adapter_kv=akv, kv_caches=caches["ours"]),
        "upstream.decode": lambda: model.forward_inference(vq, token, P, kv_caches=caches["upstream"]),
    }
    with torch.inference_mode():
        return time_many(fns, device, budget, threads)


def make_point(dtype: str, query_len: int, batch: int, check: TokenCheck, t: dict[str, Timing]) -> E2EPoint:
    """The ratios of one point from its token check and timings; noisy or judged against its target."""
    floor, ours, upstream = t["floor.decode"], t["ours.decode"], t["upstream.decode"]
    spread = max(floor.spread, ours.spread, upstream.spread)
    point = E2EPoint(dtype, query_len, batch, tokens_identical=check.identical, tokens_compared=check.compared,
                     visual_ms=t["visual"].p50_ms, floor_decode_ms=floor.p50_ms, ours_decode_ms=ours.p50_ms,
                     upstream_decode_ms=upstream.p50_ms, ours_over_floor=ours.p50_ms / floor.p50_ms,
                     speedup_vs_upstream=upstream.p50_ms / ours.p50_ms,
                     prefill_speedup_vs_upstream=t["upstream.prefill"].p50_ms / t["ours.prefill"].p50_ms,
                     decode_spread=spread, noisy=False)
    reasons = []
    if point.ours_over_floor < 1.0:
        reasons.append(f"ours faster than the no-adapter floor (ours/floor {point.ours_over_floor:.3f})")
    if spread > NOISY_SPREAD:
        reasons.append(f"decode spread {spread:.0%} > {NOISY_SPREAD:.0%}")
    point.noisy, point.noise = bool(reasons), "; ".join(reasons)
    target = TARGETS.get((query_len, batch))
    if target:
        point.target_ours_over_floor, point.target_speedup = target
        if not point.noisy:
            point.met = point.ours_over_floor <= target[0] and point.speedup_vs_upstream >= target[1]
    return point


def run(config: E2EConfig, progress: bool = False) -> E2EResults:
    import surgery

    device = resolve_device(config.device)
    if config.check_tokens < 1:
        raise BenchmarkError(f"check_tokens must be at least 1 (the paths are compared before timing), "
                             f"got {config.check_tokens}")
    threads = set_threads(config.threads)
    budget = config.budget or (Budget.quick() if config.quick else Budget.full())
    dtypes, points = config.dtype_list(), config.points()
    results = E2EResults(env=report.environment(device, threads, model=config.model, prompt_len=config.prompt,
                                                quick=config.quick))
    model, built = None, None
    for dtype, (query_len, batch) in report.progress_bar(list(product(dtypes, points)), show=progress, desc="e2e",
                                                         unit="point"):
        if built != dtype:
            model, built = None, dtype  # the previous dtype's model is freed before the next is built
            model = build(config, dtype, device)
        name = str(dtype).removeprefix("torch.")
        surgery.resize(model, query_len=query_len, init="normal")
        images, prompts = inputs(model, batch, config.prompt, device, dtype)
        check = check_tokens(model, images, prompts, config.check_tokens,
                             f"{config.model} {name} query_len={query_len} batch={batch}")
        t = time_point(model, images, prompts, device, budget, threads)
        for path in PATHS:
            pre, dec = t[f"{path}.prefill"], t[f"{path}.decode"]
            results.rows.append(E2ERow(name, query_len, batch, path, config.prompt, str(device), threads,
                                       pre.p20_ms, pre.p50_ms, pre.p80_ms, dec.p20_ms, dec.p50_ms, dec.p80_ms,
                                       batch / (dec.p50_ms * 1e-3), dec.method))
        results.points.append(make_point(name, query_len, batch, check, t))
    return results


# -- reporting -----------------------------------------------------------------------------------


def _met_cell(p: E2EPoint) -> str:
    if p.target_ours_over_floor is None:
        return "-"
    if p.noisy:
        return "- (noisy)"
    return report.fmt(p.met)


def summary_markdown(results: E2EResults) -> str:
    headers = ["dtype", "query_len", "batch", "floor ms", "ours ms", "upstream ms", "ours/floor",
               "upstream/ours", "ours tok/s", "prefill upstream/ours", "visual ms", "decode spread", "noisy",
               "target", "met"]
    table = []
    for p in results.points:
        tok_s = next(r.decode_tokens_per_s for r in results.rows
                     if (r.dtype, r.query_len, r.batch, r.path) == (p.dtype, p.query_len, p.batch, "ours"))
        target = (f"ours/floor <= {p.target_ours_over_floor:.2f}, >= {p.target_speedup:.1f}x"
                  if p.target_ours_over_floor else "")
        table.append([p.dtype, str(p.query_len), str(p.batch), p.floor_decode_ms, p.ours_decode_ms,
                      p.upstream_decode_ms, p.ours_over_floor, f"{p.speedup_vs_upstream:.2f}x", f"{tok_s:.1f}",
                      f"{p.prefill_speedup_vs_upstream:.2f}x", p.visual_ms, f"{p.decode_spread:.0%}",
                      f"**yes**: {p.noise}" if p.noisy else "no", target, _met_cell(p)])
    identical = sum(p.tokens_identical for p in results.points)
    compared = sum(p.tokens_compared for p in results.points)
    noisy = sum(p.noisy for p in results.points)
    text = (f"Decode: one step at position prompt_len (median ms). Greedy tokens of ours and upstream, compared "
            f"before timing: identical at {identical} of {len(results.points)} points ({compared} tokens). "
            f"Noisy points ({noisy} here) claim no met / not met: ours faster than the no-adapter floor "
            f"(it does the floor's work and more), or a decode timing's spread (p80 - p20) / p50 above "
            f"{NOISY_SPREAD:.0%}; rerun them on a quieter machine or with a larger budget.\n\n"
            + report.markdown_table(headers, table))
    prefill = [[r.dtype, str(r.query_len), str(r.batch), r.path, r.prefill_ms_p50, r.prefill_ms_p20, r.prefill_ms_p80,
                f"{r.decode_tokens_per_s:.1f}"] for r in results.rows]
    text += "\n\nPer path (prefill of the prompt; decode tokens/s at batch):\n\n" + report.markdown_table(
        ["dtype", "query_len", "batch", "path", "prefill ms p50", "p20", "p80", "decode tok/s"], prefill)
    return text


def write(results: E2EResults, out: Path) -> list[Path]:
    out = Path(out)
    files = report.write_table(out, "e2e", [r.to_dict() for r in results.rows], results.env)
    files += report.write_table(out, "e2e_points", [p.to_dict() for p in results.points], results.env)
    for dtype in dict.fromkeys(r.dtype for r in results.rows):
        mine = [r for r in results.rows if r.dtype == dtype]
        points = list(dict.fromkeys((r.query_len, r.batch) for r in mine))
        tok_s = {(r.query_len, r.batch, r.path): r.decode_tokens_per_s for r in mine}
        plots = [report.plot_bars([f"q={q} b={b}" for q, b in points],
                                  {path: [tok_s[(q, b, path)] for q, b in points] for path in PATHS},
                                  out / f"e2e_decode_{dtype}.png",
                                  f"decode tokens/s, {results.env['device_name']}, {dtype}", "tokens/s")]
        for batch in dict.fromkeys(r.batch for r in mine):
            at_batch = [r for r in mine if r.batch == batch]
            if len({r.query_len for r in at_batch}) < 2:
                continue  # one point is not a line (the bars above show it)
            series = {path: [(r.query_len, r.decode_tokens_per_s) for r in at_batch if r.path == path]
                      for path in PATHS}
            plots.append(report.plot_lines(series, out / f"e2e_decode_{dtype}_b{batch}.png",
                                           f"decode tokens/s, {results.env['device_name']}, {dtype}, batch {batch}",
                                           "query_len", "tokens/s", logx=True))
        files += [p for p in plots if p is not None]  # None: matplotlib is not installed
    sections = [("LLaMA-Adapter V2 generation", summary_markdown(results))]
    files.append(report.write_summary(out, "End-to-end benchmarks", sections, results.env, files))
    return files


def main(config: E2EConfig, out: Path, progress: bool = True) -> tuple[E2EResults, list[Path]]:
    results = run(config, progress=progress)
    return results, write(results, out)
