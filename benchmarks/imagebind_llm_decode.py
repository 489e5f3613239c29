"""ImageBind-LLM decoding: tokens/s of this project's path against upstream's per-step path, at k
visual tokens (k CLS tokens of ImageBind's vision encoder through its `all` head).

    python benchmarks/imagebind_llm_decode.py [--quick] [--ks 1,4,16] [--batches 1,4]
                                              [--dtypes float32,bfloat16] [--threads N] [--out DIR]

Model: the registered `imagebind_llm_bench` (dim 1024, 16 layers, adapters in all 16, vocab 32000,
the `small` ImageBind), random weights with non-zero gates, biases and LoRA, so every branch does
real work. k is set the way a user sets it: the vision head in mode `all`, then
`surgery.resize(model, num_cls_tokens.vision=k)`.

Three paths, each one decoding step (one new token per row) at position `--prompt-len` with a warm
KV cache, the steady state of generation:

    floor     the same LLaMA with no adapter at all (`surgery bench e2e`'s floor): the limit an
              adapter path can approach
    ours      the adapter keys/values computed once per input (`adapter_kv`) and reused: per step,
              each layer adds tanh(gate) * v (k = 1) or runs the fused gated softmax (k > 1)
    upstream  upstream's path: every layer re-adds visual + prefix_query[i] and recomputes its
              wk/wv projections of the k tokens at every step (`forward_inference` without adapter_kv)

Before anything is timed, the greedy tokens of `ours` and `upstream` (generate_tokens, temperature 0)
must be identical, else the point is refused (OutputMismatchError). Writes `imagebind_llm_decode.csv`
/ `.json` (a row per dtype x k x batch x path: decode ms p20/p50/p80, tokens/s) and `summary.md`
(tokens/s and the ratios upstream/ours, ours/floor) to `--out` (default out/bench/imagebind_llm).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import surgery
from surgery.bench import OutputMismatchError, report
from surgery_plugins.llama_adapter.bench_e2e import floor_forward
from surgery.bench.timing import Budget, resolve_device, set_threads, time_many

PATHS = ("floor", "ours", "upstream")


def parse(argv: list[str]) -> argparse.Namespace:
    ints = lambda text: tuple(int(t) for t in text.split(","))  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short timing budget (the grid is unchanged)")
    p.add_argument("--ks", type=ints, default=(1, 4, 16), help="visual tokens per item (default 1,4,16)")
    p.add_argument("--batches", type=ints, default=(1, 4), help="rows (default 1,4)")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16, float16")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row, the decode position")
    p.add_argument("--model", default="imagebind_llm_bench", help="a registered imagebind_llm model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("out/bench/imagebind_llm"))
    return p.parse_args(argv)


def build(name: str, k: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = surgery.build(name, device=device)
    model.image_bind.set_head_mode({"vision": "all"})
    if k != 1:
        surgery.resize(model, **{"num_cls_tokens.vision": k}, init="normal", seed=1)
    return model.to(dtype).eval()


def images(model: torch.nn.Module, batch: int, device: torch.device) -> dict:
    size = model.image_bind.config.modalities["vision"].input_size[-1]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    return {"Image": [x.to(device), 1]}


def measure(model: torch.nn.Module, batch: int, prompt_len: int, device: torch.device, budget: Budget,
            threads: int) -> dict:
    inputs = images(model, batch, device)
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(3))
    ids = [row.tolist() for row in prompts]
    ours = model.generate_tokens(inputs, ids, max_gen_len=4, temperature=0, cache_adapter=True)
    upstream = model.generate_tokens(inputs, ids, max_gen_len=4, temperature=0, cache_adapter=False)
    if ours != upstream:
        raise OutputMismatchError(f"greedy tokens differ between ours {ours} and upstream {upstream}: not timed")
    llama, dtype = model.llama, model.prefix_query.weight.dtype
    prompts = prompts.to(device)
    step = prompts[:, -1:]  # (B, 1): the token decoded at position prompt_len
    with torch.inference_mode():
        visual = model.forward_visual(inputs)
        adapter_kv = model.adapter_kv(visual)
        caches = {path: llama.new_kv_caches(batch, dtype, device) for path in PATHS}
        for path in ("ours", "upstream"):  # prefill: a warm cache up to the decode position
            model.forward_inference(visual, prompts, 0, adapter_kv=adapter_kv if path == "ours" else None,
                                    kv_caches=caches[path])
        floor_forward(llama, prompts, 0, caches["floor"])
        fns = {
            "floor": lambda: floor_forward(llama, step, prompt_len, caches["floor"]),
            "ours": lambda: model.forward_inference(visual, step, prompt_len, adapter_kv=adapter_kv,
                                                    kv_caches=caches["ours"]),
            "upstream": lambda: model.forward_inference(visual, step, prompt_len, kv_caches=caches["upstream"]),
        }
        return time_many(fns, device, budget, threads)


def main(argv: list[str]) -> int:
    args = parse(argv)
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    budget = Budget.quick() if args.quick else Budget.full()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    rows, table = [], []
    for dtype in dtypes:
        for k in args.ks:
            model = build(args.model, k, dtype, device)
            for batch in args.batches:
                timings = measure(model, batch, args.prompt_len, device, budget, threads)
                speed = {path: batch * 1e3 / t.p50_ms for path, t in timings.items()}
                for path, t in timings.items():
                    rows.append({"dtype": str(dtype).removeprefix("torch."), "k": k, "batch": batch, "path": path,
                                 "prompt_len": args.prompt_len, "decode_ms_p20": t.p20_ms, "decode_ms_p50": t.p50_ms,
                                 "decode_ms_p80": t.p80_ms, "decode_tokens_per_s": speed[path], "timer": t.method})
                table.append((str(dtype).removeprefix("torch."), k, batch, speed["floor"], speed["ours"],
                              speed["upstream"], speed["ours"] / speed["upstream"], speed["floor"] / speed["ours"]))
                print(f"{table[-1][0]} k={k} batch={batch}: ours {speed['ours']:.1f} tok/s, upstream "
                      f"{speed['upstream']:.1f}, floor {speed['floor']:.1f}", flush=True)
            del model
    env = report.environment(device, threads, model=args.model, prompt_len=args.prompt_len)
    files = report.write_table(args.out, "imagebind_llm_decode", rows, env)
    body = report.markdown_table(
        ["dtype", "k", "batch", "floor tok/s", "ours tok/s", "upstream tok/s", "ours / upstream", "floor / ours"],
        table)
    summary = report.write_summary(args.out, "ImageBind-LLM decode: k visual tokens, ours vs upstream's per-step path",
                                   [("Decode tokens/s (one step, warm KV cache; p50)", body)], env, files)
    print(summary.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
