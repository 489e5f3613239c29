"""ImageBind embedding throughput (items/s) per modality: ours, and upstream's code beside it.

    python benchmarks/imagebind_embed.py [--quick] [--config huge] [--modalities vision,text]
        [--dtypes float32,bfloat16] [--batches 1,8] [--modes eager,compile]
        [--upstream /path/to/ImageBind] [--out DIR]

Per implementation, dtype, execution mode, modality and batch: the median time of one embedding
call (`model({modality: x})`, no grad, eval mode) over `--rounds` `torch.utils.benchmark.Timer`
measurements at `torch.get_num_threads()` threads, ours and upstream interleaved (who goes first
alternates), reported as
items per second. Inputs are upstream's
shapes at the config's sizes (vision: images, audio: 3 clips per item as upstream's loader
makes, text: 77 ids; random values, seeded).

`--upstream DIR` times facebookresearch/ImageBind's own `ImageBindModel` (a checkout of it, not
installed: its `imagebind/__init__.py`, which imports the data loaders, is bypassed) on the same
machine, with the *same weights*: ours is built on the meta device and given upstream's state
dict (strict, `assign=True`), which also checks key compatibility at full scale; the two outputs
are compared before anything is timed. Upstream needs `timm`, `einops`, `ftfy`, `iopath` and
`regex` importable; only its config `huge` exists there. Random weights (throughput only).
`--quick`: the `small` config, batch 1 and 8, float32, eager, ours only (about a minute).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

from surgery_plugins.imagebind.config import MODALITIES, ImageBindConfig
from surgery_plugins.imagebind.model import ImageBindModel

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
        raise SystemExit("--upstream compares at --config huge (upstream has no other config)")
    torch.manual_seed(0)
    upstream = load_upstream(upstream_dir).imagebind_huge(pretrained=False).eval()
    with torch.device("meta"):
        ours = ImageBindModel(config)
    ours.load_state_dict(upstream.state_dict(), strict=True, assign=True)  # the same tensors, our modules
    return ours.eval(), upstream


def time_call(fn, x, min_run_time: float, label: str) -> float:
    timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads(),
                            label=label)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", default="huge")
    p.add_argument("--modalities", default=",".join(MODALITIES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--upstream", type=Path, default=None, help="a checkout of facebookresearch/ImageBind")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per Timer measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurements per implementation")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.dtypes, args.modes, args.upstream, args.rounds = "small", "float32", "eager", None, 2
    modalities = [m for m in args.modalities.split(",") if m]
    batches = [int(b) for b in args.batches.split(",")]
    ours32, up32 = build(args.config, args.upstream)
    config = ours32.config
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(),
               "date": datetime.date.today().isoformat(), "config": args.config}
    print(json.dumps(machine))
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        if dtype == torch.float32:
            ours, upstream = ours32, up32
        else:  # fresh copies in this dtype; ours again shares upstream's
            upstream = None if up32 is None else load_upstream(args.upstream).imagebind_huge().to(dtype).eval()
            if upstream is not None:
                upstream.load_state_dict(up32.state_dict())
                with torch.device("meta"):
                    ours = ImageBindModel(config)
                ours.load_state_dict(upstream.state_dict(), strict=True, assign=True)
                ours.eval()
            else:
                ours = ImageBindModel(config).to(dtype).eval()
                ours.load_state_dict(ours32.state_dict())
        impls = {"ours": ours, **({"upstream": upstream} if upstream is not None else {})}
        for modality in modalities:
            for batch in batches:
                x = make_input(config, modality, batch, dtype)
                if upstream is not None:  # same weights -> same embeddings, before anything is timed
                    with torch.no_grad():
                        a, b = ours({modality: x})[modality], upstream({modality: x})[modality]
                    tol = 1e-3 if dtype == torch.float32 else 0.05
                    err = (a.float() - b.float()).abs().max().item()
                    if err > tol * max(1.0, b.float().abs().max().item()):
                        raise SystemExit(f"{modality} {dtype_name} b{batch}: ours and upstream differ by {err}")
                for mode in args.modes.split(","):
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
                    for r in range(args.rounds):
                        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]  # who goes first alternates
                        for impl, fn in order:
                            times[impl].append(time_call(fn, x, args.min_run_time, f"{impl} {modality}"))
                    for impl, ts in times.items():
                        seconds = statistics.median(ts)
                        row = {**machine, "impl": impl, "modality": modality, "dtype": dtype_name, "mode": mode,
                               "batch": batch, "seconds": seconds, "items_per_s": batch / seconds,
                               "rounds": ts, "first_call_s": warm[impl]}
                        rows.append(row)
                        print(f"{impl:9s} {dtype_name:9s} {mode:8s} {modality:8s} b{batch:<2d} "
                              f"{batch / seconds:9.2f} items/s  ({seconds * 1e3:9.1f} ms/call, first "
                              f"{warm[impl]:.1f} s)", flush=True)
                    if mode == "compile":
                        torch._dynamo.reset()
        del impls, ours, upstream
        gc.collect()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"imagebind_embed_{args.config}.json"
        path.write_text(json.dumps(rows, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
