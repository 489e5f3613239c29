"""Decode-step cost of LLaMA-Adapter V2: this project's path against upstream's and the no-adapter floor.

    python benchmarks/llama_adapter_decode.py [--quick] [--threads 2] [--out docs/perf]

For each dtype (fp32, bf16) and (query_len, batch) it times one decoding step (one new token for
every row, KV cache warm at position `--prompt`) of the scaled-down `bench` config (dim 1024,
16 layers, query_layer 15) on the CPU, three ways, in one run and interleaved:

    floor     the same LLaMA with no adapter at all: the limit an adapter path can approach
    ours      adapter keys/values computed once per image, reused by every step (cache_adapter)
    upstream  upstream's per-step path: adapter[i].repeat(B) + visual_query, then wk/wv of the
              adapter tokens inside every adapted layer, at every step

and reports the median ms (torch.utils.benchmark, fixed thread count, warm-up) with the ratios
ours/floor (target <= 1.10 at query_len 10, <= 1.20 at 64) and upstream/ours (decode tokens/s
speed-up; target >= 1.2 at query_len 10 batch 1, >= 2 at query_len 64 batch 4). Before timing,
it checks that the greedy tokens of the two adapter paths are identical.

query_len is changed with `surgery.resize`, the tool itself. Weights are random (`init="random"`
gives non-zero gates, so the adapter branch does real work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

import surgery

TARGETS = {  # (query_len, batch): (max ours/floor, min upstream/ours)
    (10, 1): (1.10, 1.2),
    (64, 4): (1.20, 2.0),
}


def build(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = surgery.build("llama_adapter_v2_bench")
    return model.to(dtype)


def check_same_tokens(model, batch: int) -> None:
    size = model.config.clip.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    prompts = [[1, *range(10 + k, 20 + k)] for k in range(batch)]
    ours = model.generate_tokens(images, prompts, max_gen_len=4, temperature=0, cache_adapter=True)
    theirs = model.generate_tokens(images, prompts, max_gen_len=4, temperature=0, cache_adapter=False)
    if ours != theirs:
        raise SystemExit(f"greedy tokens differ between the cached and upstream paths: {ours} vs {theirs}")


def step_timers(model, batch: int, prompt: int, dtype: torch.dtype) -> dict[str, benchmark.Timer]:
    """One decoding step three ways, all at the same position with a warm KV cache."""
    D = model.config.dim
    gen = torch.Generator().manual_seed(2)
    visual_query = torch.randn(batch, model.query_len, D, generator=gen).to(dtype)  # (B, Q, D)
    prefix = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=gen)  # (B, P)
    token = prefix[:, -1:]  # (B, 1)
    kv = model.llama.new_kv_caches(batch, dtype, "cpu", prompt + 8)
    floor_kv = model.llama.new_kv_caches(batch, dtype, "cpu", prompt + 8)
    with torch.inference_mode():
        adapter_kv = model.adapter_kv(visual_query)
        model.forward_inference(visual_query, prefix, 0, adapter_kv=adapter_kv, kv_caches=kv)  # prefill
        model.llama(prefix, 0, kv_caches=floor_kv)
    env = dict(model=model, vq=visual_query, token=token, pos=prompt, kv=kv, akv=adapter_kv, fkv=floor_kv)
    threads = torch.get_num_threads()  # Timer defaults to 1 thread: time at the one asked for
    return {
        "floor": benchmark.Timer("model.llama(token, pos, kv_caches=fkv)", globals=env, num_threads=threads),
        "ours": benchmark.Timer("model.forward_inference(vq, token, pos, adapter_kv=akv, kv_caches=kv)", globals=env, num_threads=threads),
        "upstream": benchmark.Timer("model.forward_inference(vq, token, pos, kv_caches=kv)", globals=env, num_threads=threads),
    }


def measure(timers: dict[str, benchmark.Timer], rounds: int, min_time: float) -> dict[str, float]:
    """Median ms of each, interleaved over `rounds` so drifting machine load hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in timers}
    with torch.inference_mode():
        for name, timer in timers.items():  # warm-up
            timer.timeit(2)
        for _ in range(rounds):
            for name, timer in timers.items():
                samples[name].extend(timer.blocked_autorange(min_run_time=min_time).times)
    return {name: 1e3 * float(torch.tensor(times).median()) for name, times in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one dtype, the two target shapes, short runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32, help="tokens already in the KV cache")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dtypes = [torch.float32] if args.quick else [getattr(torch, name) for name in args.dtypes.split(",")]
    shapes = list(TARGETS) if args.quick else [(10, 1), (10, 4), (64, 1), (64, 4)]
    rounds, min_time = (2, 0.2) if args.quick else (5, 0.5)
    rows = []
    for dtype in dtypes:
        model = build(dtype)
        for query_len, batch in shapes:
            surgery.resize(model, query_len=query_len, init="normal")
            check_same_tokens(model, batch)
            ms = measure(step_timers(model, batch, args.prompt, dtype), rounds, min_time)
            row = dict(dtype=str(dtype).removeprefix("torch."), query_len=query_len, batch=batch, **{
                f"{k}_ms": round(v, 3) for k, v in ms.items()},
                ours_over_floor=round(ms["ours"] / ms["floor"], 3),
                speedup_vs_upstream=round(ms["upstream"] / ms["ours"], 3))
            target = TARGETS.get((query_len, batch))
            if target:
                row["target_ours_over_floor"], row["target_speedup"] = target
                row["met"] = row["ours_over_floor"] <= target[0] and row["speedup_vs_upstream"] >= target[1]
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print("| dtype | query_len | batch | floor ms | ours ms | upstream ms | ours/floor | upstream/ours | target met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        met = {True: "yes", False: "no"}.get(r.get("met"), "-")
        print(f"| {r['dtype']} | {r['query_len']} | {r['batch']} | {r['floor_ms']:.1f} | {r['ours_ms']:.1f} | "
              f"{r['upstream_ms']:.1f} | {r['ours_over_floor']:.3f} | {r['speedup_vs_upstream']:.2f}x | {met} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = dict(torch=torch.__version__, threads=args.threads, machine=platform.machine(),
                    cpu_count=os.cpu_count(), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (args.out / "llama_adapter_decode.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
