"""How much Python one `surgery.resize` runs: calls, functions and module switches in the core and plugins.

    python benchmarks/resize_trace.py [--model vit_tiny_test] [--site reg_tokens] [--count 4] [--top 15]

A review counted what `surgery.resize(vit, reg_tokens=4)` walks through (issue 15, item 3): every
Python function entered inside the `surgery` package or a built-in plugin (`surgery_plugins`),
how many distinct functions and modules that is, how often consecutive calls switch module, and
how often the plugins were asked for the model's sites (`surgery_token_sites`). Torch, pluggy
and the standard library are left out: the count is of our own code. A generator or
comprehension counts once, when it starts (not at every resumption). The model is built and
warmed up (one resize back and forth) before the traced call, so imports and first-use caches
are not counted.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

OURS = ("surgery", "surgery_plugins")
RESUMED = 0x20 | 0x200  # CO_GENERATOR | CO_ASYNC_GENERATOR: resumptions are not new calls


def _module(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name.split(".")[0] in OURS else None


def trace(action) -> list[tuple[str, str]]:
    """(module, qualified function name) of every call `action()` makes into our own code, in order."""
    calls: list[tuple[str, str]] = []
    started: set[int] = set()

    def profile(frame, event, arg) -> None:
        if event != "call":
            return
        module = _module(frame)
        if module is None:
            return
        code = frame.f_code
        if code.co_flags & RESUMED or code.co_name == "<genexpr>":
            if id(frame) in started:
                return
            started.add(id(frame))
        calls.append((module, f"{code.co_qualname}:{code.co_firstlineno}"))

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls


def summary(calls: list[tuple[str, str]], site_hooks: int) -> dict:
    """`site_hooks`: how many plugins implement surgery_token_sites (one round of asking calls each)."""
    modules = [m for m, _ in calls]
    asked = sum(f.split(":")[0] == "surgery_token_sites" for _, f in calls)
    return {
        "calls": len(calls),
        "functions": len(set(calls)),
        "modules": len(set(modules)),
        "module_switches": sum(a != b for a, b in zip(modules, modules[1:])),
        "sites_asked": asked / max(site_hooks, 1),  # rounds of asking every plugin for the sites
        "counts_validated": sum(f.startswith("TokenSite.violation") for _, f in calls),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_test", help="a registered model (surgery.build)")
    parser.add_argument("--site", default="reg_tokens")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--top", type=int, default=0, help="also list the N most called functions")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)

    import surgery

    model = surgery.build(args.model)
    start = surgery.counts(model)[args.site]
    surgery.resize(model, **{args.site: args.count})  # warm-up: first-use caches, lazy imports
    surgery.resize(model, **{args.site: start})
    calls = trace(lambda: surgery.resize(model, **{args.site: args.count}))
    hooks = len(surgery.get_host().implementations("surgery_token_sites"))
    result = {"model": args.model, "call": f"resize({args.site}={args.count})", **summary(calls, hooks)}
    print(json.dumps(result, indent=1))
    if args.top:
        for (module, function), n in collections.Counter(calls).most_common(args.top):
            print(f"{n:5d}  {module}.{function}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
