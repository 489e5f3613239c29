"""The A/B harness behind docs/kernels.md's AVX2 walk choice (kept with its results, not a benchmark
of the suite): adapter_add's in-cache 7B shapes (L=31, Q=10, D=4096; fp32 B=1, bf16 B=1 and 2),
`out=` against a same-size `copy_`, at 1 and then 2 threads; prints the median op/copy ratio of
15 rounds per shape. Run it against two builds in alternating processes, e.g.
`PYTHONPATH=/path/to/checkout python harness.py` with each checkout built in place."""
import sys, time, statistics, torch
import surgery.ops as ops
ops.backends(); import surgery._C; opout = torch.ops.surgery.adapter_add.out
def bench(f, n):
    f(); t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n
res = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    for dtype, B in [(torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 2)]:
        L, Q, D = 31, 10, 4096
        table = torch.randn(L * Q, D).to(dtype); vq = torch.randn(B, Q, D).to(dtype)
        out = torch.empty(L, B, Q, D, dtype=dtype); src = torch.randn(L, B, Q, D).to(dtype); dst = torch.empty_like(src)
        r = []
        for _ in range(15):
            c = bench(lambda: dst.copy_(src), 40); o = bench(lambda: opout(table, vq, out=out), 40); r.append(o / c)
        res.append(f"{statistics.median(r):.3f}")
print(" ".join(res))
