"""LLaMA-Adapter V2's commands: `surgery generate`, `surgery bench e2e` (generation end to end) and
`surgery profile`.

`surgery generate` runs every model family that generates through this plugin's loop: its own
(`GENERATION_FAMILY` below) and those other plugins' command modules declare (`generation.py`).

This is the plugin's command module (entry point `surgery.commands`, the same name as its backbone
entry, `llama_adapter_v2`). Every `surgery` call imports it, `--help` included, so at module level
it imports only the standard library and the CLI's light helpers; `run` imports torch and the model.
"""

from __future__ import annotations

import argparse

import surgery
from surgery.cli.arguments import int_list
from surgery.cli.bench import add_common_options, finish, output_folder
from surgery.commands import UsageError

from .generation import Family

DEFAULT_MODEL = "llama_adapter_v2_bench"

E2E_DESCRIPTION = (
    "LLaMA-Adapter V2: prefill ms and decode tokens/s of this project's path, upstream's per-step\n"
    "path and the no-adapter floor (greedy tokens of the two adapter paths checked identical first).\n"
    "Details: docs/performance.md")
PROFILE_DESCRIPTION = (
    "Run one greedy generation under torch.profiler with labelled ranges for each stage\n"
    "(visual encoder, query concat, visual blocks, adapter add, prefill, each decode step,\n"
    "adapter attention; NVTX ranges too on GPU), write a Chrome/Perfetto trace to --out and\n"
    "print the top operators by self time and each stage's time.")


def add_e2e_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a registered LLaMA-Adapter V2 model (default {DEFAULT_MODEL})")
    p.add_argument("--query-lens", type=int_list, help="e.g. 1,10,64,256")
    p.add_argument("--batches", type=int_list, help="e.g. 1,4")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per row (default 32; 16 with --quick)")


def run_e2e(args: argparse.Namespace) -> int:
    from surgery.bench.timing import resolve_device

    from . import bench_e2e

    resolve_device(args.device)  # a clear error before any model is built
    check_model(args.model, "surgery bench e2e")
    out = output_folder(args)
    config = bench_e2e.E2EConfig(device=args.device, quick=args.quick, dtypes=args.dtypes, threads=args.threads,
                                 model=args.model, query_lens=args.query_lens, batches=args.batches,
                                 prompt_len=args.prompt_len)
    results, files = bench_e2e.main(config, out, not args.no_progress)
    return finish(bench_e2e.summary_markdown(results), out, files)


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--query-len", type=int, help="resize the visual queries first")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="tokens to generate (default 8)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's count)")
    p.add_argument("--top", type=int, default=15, help="operators to print (default 15)")
    p.add_argument("--out", metavar="DIR", help="folder for trace.json, stages.json, top_ops.txt (default out/profile)")


def run_profile(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from . import profile

    check_model(args.model, "surgery profile")
    config = profile.ProfileConfig(device=args.device, model=args.model, dtype=args.dtype, query_len=args.query_len,
                                   batch=args.batch, prompt_len=args.prompt_len, steps=args.steps,
                                   threads=args.threads, top=args.top)
    result = profile.run(config, Path(args.out or os.path.join("out", "profile")))
    print(f"top {args.top} operators by self time ({args.model}, {args.device}, {args.dtype}):")
    print(result.top_table)
    print("labelled stages:")
    print(profile.format_stages(result.stages))
    print(f"\ntrace: {result.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0


def check_model(name: str, command: str) -> None:
    """`name` must be a registered model of this plugin's backbone (a usage error names those that are)."""
    from surgery.plugins import get_host

    from .plugin import BACKBONE

    host = get_host()
    backbone = host.model_spec(name).backbone  # an unknown name: BackboneError naming the known ones
    if backbone != BACKBONE:
        usable = ", ".join(sorted(n for n, s in host.models.items() if s.backbone == BACKBONE))
        raise UsageError(f"{command} times a generation of a {BACKBONE!r} model; {name!r} is of backbone "
                         f"{backbone!r}. --model takes one of: {usable}")


def add_family_arguments(group) -> None:
    group.add_argument("--clip", metavar="FILE", help="official files: OpenAI CLIP ViT-L/14's image tower "
                       "(visual.* keys, .pth or .safetensors)")
    group.add_argument("--v-num-heads", type=int, metavar="N", help="the visual blocks' heads, which the weights "
                       "cannot tell (default: the checkpoint's config, else 16)")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    from .generation import add_arguments

    add_arguments(p)


def run_generate(args: argparse.Namespace) -> int:
    from .generate import run

    return run(args)


GENERATION_FAMILY = Family(name="LLaMA-Adapter V2", backbone="llama_adapter_v2", modalities=("image",), mixes=False,
                           encoder_option="--clip", functions=__package__ + ".generate_family",
                           add_arguments=add_family_arguments)


@surgery.hookimpl
def surgery_register_commands(register):
    register("generate", run_generate, help="generate text with LLaMA-Adapter V2 or ImageBind-LLM (streamed)",
             description="Generate text, streamed as it is decoded (see the options)",
             add_arguments=add_generate_arguments)
    register("e2e", run_e2e, group="bench", description=E2E_DESCRIPTION, add_arguments=add_e2e_arguments,
             help="LLaMA-Adapter V2 prefill / decode: ours, upstream's path, the no-adapter floor")
    register("profile", run_profile, help="profile a LLaMA-Adapter V2 generation (trace, top ops, stages)",
             description=PROFILE_DESCRIPTION, add_arguments=add_profile_arguments)
