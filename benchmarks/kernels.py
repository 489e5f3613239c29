"""The fused ops on CPU against the hardware limit, upstream's eager form and torch.compile.

    python benchmarks/kernels.py [--quick] [--threads 2] [--dtypes float32,bfloat16] [--out DIR]

The limit for `query_concat` and `adapter_add` is writing their output once, so each is timed
against a same-run `copy_` of a tensor of the output's size into a preallocated one ("copy").
For `adapter_attention` at decode the output is tiny and the work is reading the adapter keys and
values: its limit is a `copy_` of k_t and v (the bytes it must read).

Per op and shape (7B shapes: L=31, D=4096, C=768, N=257; Q in {10, 64, 256}; B in {1, 8}):
    copy       the limit (see above)
    cpp.out    the C++ op writing into a preallocated output (out=)
    cpp        the C++ op, allocating its output
    upstream   upstream's eager form (repeat + cat; a per-layer repeat + add loop; the eager
               adapter branch), allocating
    compile    torch.compile of the broadcast form (reference.py), allocating
Every backend's output is checked against the reference before it is timed. Ratios are to
"copy" (lower is better; the target for cpp.out is <= 1.25). Median of interleaved
torch.utils.benchmark runs at a fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

from surgery import ops
from surgery.ops import reference

L, D, C, N, H, HD = 31, 4096, 768, 257, 32, 128


def upstream_query_concat(queries, feats):
    return torch.cat([queries.unsqueeze(0).repeat(feats.shape[0], 1, 1), feats], dim=1)


def upstream_adapter_add(adapter, visual_query):
    B = visual_query.shape[0]
    return [adapter[i].repeat(B, 1, 1) + visual_query for i in range(adapter.shape[0])]  # per layer, as upstream


def cases(dtype: torch.dtype, quick: bool):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    queries = [10, 64] if quick else [10, 64, 256]
    batches = [1, 8]
    for Q in queries:
        for B in batches:
            yield "query_concat", dict(Q=Q, B=B), (r(Q, C), r(B, N, C)), upstream_query_concat
            yield "adapter_add", dict(Q=Q, B=B, L=L), (r(L, Q, D), r(B, Q, D)), upstream_adapter_add
            yield ("adapter_attention", dict(Q=Q, B=B, H=H, hd=HD),
                   (r(B, H, 1, HD), r(B, H, HD, Q), r(B, H, Q, HD), r(1, H, 1, 1).tanh(), r(1, 1, 1, 1)),
                   reference.adapter_attention)


def timers(op: str, args, upstream, compiled) -> tuple[dict[str, benchmark.Timer], int]:
    """(timers, bytes of the limit) for one op and shape."""
    fn = getattr(torch.ops.surgery, op)
    expected = getattr(reference, op)(*args)
    got = fn(*args)
    if op == "adapter_attention":  # fp32 accumulation, one rounding: compare with the fp32 result, rounded
        exact = reference.adapter_attention(*(a.float() for a in args)).to(got.dtype)
        torch.testing.assert_close(got, exact, rtol=1e-2 if got.dtype != torch.float32 else 1e-5, atol=1e-5)
    else:  # a copy, or one add in the dtype: exact
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # checked before it is timed
    if op == "adapter_attention":
        src = torch.cat([args[1].flatten(), args[2].flatten()])
    else:
        src = torch.empty_like(expected).copy_(expected)
    dst = torch.empty_like(src)
    env = dict(fn=fn, args=args, up=upstream, comp=compiled, src=src, dst=dst, out=torch.empty_like(expected))
    threads = torch.get_num_threads()  # Timer defaults to 1 thread: time at the one asked for
    t = {
        "copy": benchmark.Timer("dst.copy_(src)", globals=env, num_threads=threads),
        "cpp": benchmark.Timer("fn(*args)", globals=env, num_threads=threads),
        "upstream": benchmark.Timer("up(*args)", globals=env, num_threads=threads),
        "compile": benchmark.Timer("comp(*args)", globals=env, num_threads=threads),
    }
    if op != "adapter_attention":
        t["cpp.out"] = benchmark.Timer("fn.out(*args, out=out)", globals=env, num_threads=threads)
    return t, src.numel() * src.element_size()


def median_ms(timers: dict[str, benchmark.Timer], rounds: int, min_time: float) -> dict[str, float]:
    samples = {name: [] for name in timers}
    for timer in timers.values():
        timer.timeit(2)  # warm-up (and compilation)
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].extend(timer.blocked_autorange(min_run_time=min_time).times)
    return {name: 1e3 * float(torch.tensor(v).median()) for name, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Q in {10, 64}, fp32 only, short runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="folder for kernels.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not ops.can_run("cpp", torch.device("cpu"))[0]:
        raise SystemExit(f"the C++ backend cannot run: {ops.can_run('cpp', torch.device('cpu'))[1]}")
    from surgery.ops import _extension

    _extension.require_registration()
    dtypes = ["float32"] if args.quick else args.dtypes.split(",")
    rounds, min_time = (2, 0.1) if args.quick else (5, 0.3)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        compiled = {op: torch.compile(getattr(reference, op), dynamic=False) for op in
                    ("query_concat", "adapter_add", "adapter_attention")}
        for op, shape, inputs, upstream in cases(dtype, args.quick):
            t, limit_bytes = timers(op, inputs, upstream, compiled[op])
            ms = median_ms(t, rounds, min_time)
            row = dict(op=op, dtype=dtype_name, **shape, limit_bytes=limit_bytes,
                       **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                       **{f"{k}_over_copy": round(v / ms["copy"], 3) for k, v in ms.items() if k != "copy"},
                       copy_gbps=round(2 * limit_bytes / ms["copy"] / 1e6, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"CPU {platform.machine()}, {args.threads} threads, torch {torch.__version__}; time / same-run copy")
    print("| op | dtype | shape | copy ms | cpp.out | cpp | upstream | compile |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = ", ".join(f"{k}={r[k]}" for k in ("L", "Q", "B", "H", "hd") if k in r)
        print(f"| {r['op']} | {r['dtype']} | {shape} | {r['copy_ms']:.3f} | {r.get('cpp.out_over_copy', '-')} | "
              f"{r['cpp_over_copy']} | {r['upstream_over_copy']} | {r['compile_over_copy']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = dict(torch=torch.__version__, threads=args.threads, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (args.out / "kernels.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
