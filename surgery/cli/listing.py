"""`surgery plugins`, `surgery models`, `surgery backends`: what is installed and what it offers.

Each prints a table, or JSON with `--json`. Only `backends` imports torch (it asks the kernels).
"""

from __future__ import annotations

import argparse
import json

from .arguments import add_json_flag
from .format import print_lines, table

PLUGINS_DESCRIPTION = (
    "List every backbone plugin found under the 'surgery.backbones' entry points: version,\n"
    "status (loaded; degraded: its code failed since; failed; missing: named by SURGERY_PLUGINS\n"
    "but not installed), the hooks it implements, and the error of one that is not loaded.")
MODELS_DESCRIPTION = "List the models plugins can build by name (random weights; nothing is downloaded)."
BACKENDS_DESCRIPTION = (
    "The fused ops (query_concat, adapter_add, adapter_attention) have four backends:\n"
    "eager, cpp, cuda, triton. Show which were built, which can run here and why not,\n"
    "and the torch/CUDA/compiler versions of the build. SURGERY_KERNEL forces one.")

add_arguments = add_json_flag  # every listing takes --json, nothing else


def cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin the host tried to load, failed ones with their error, and the commands each
    contributes (a command module shares its plugin's entry-point name; `surgery.commands`)."""
    from surgery import cli
    from surgery.plugins import get_host

    host = get_host()
    host.check_detectors()  # a detect that fails for any model shows as "degraded", with its error
    records = [r.to_dict() for r in host.records.values()]
    modules = {name: m for name, m in cli.command_registry().records.items() if name != cli.CORE_COMMANDS}
    for record in records:
        module = modules.pop(record["name"], None)
        record["commands"] = module.commands if module else []
        if module and module.error:
            record["commands_error"] = module.error
    # a command module with no backbone plugin of its name (a plugin of commands only)
    records += [{**m.to_dict(), "status": m.status, "commands_error": m.error, "error": None} for m in modules.values()]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no backbone plugins found (entry-point group 'surgery.backbones'; see SURGERY_PLUGINS)")
        return 0
    rows = [[r["name"], r.get("version") or "-", r["status"], ", ".join(r.get("backbones", [])) or "-",
             len(r.get("models", [])), ", ".join(r["commands"]) or "-",
             ", ".join(h.removeprefix("surgery_") for h in r.get("hooks", [])) or "-"] for r in records]
    print_lines(table(["PLUGIN", "VERSION", "STATUS", "BACKBONES", "MODELS", "COMMANDS", "HOOKS (surgery_*)"], rows))
    for r in records:
        if r.get("error"):
            print(f"{r['name']}: {r['error']}")
        if r.get("commands_error"):
            print(f"{r['name']} (commands, {r['module']}): {r['commands_error']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the models plugins can build by name (random weights, nothing downloaded)."""
    from surgery.plugins import get_host

    specs = sorted(get_host().models.values(), key=lambda s: s.name)
    entries = [{"name": s.name, "backbone": s.backbone, "plugin": s.plugin, "description": s.description}
               for s in specs]
    if args.json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print("no models registered (see `surgery plugins`)")
    else:
        print_lines(table(["MODEL", "BACKBONE", "PLUGIN", "DESCRIPTION"], [list(e.values()) for e in entries]))
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    """Each kernel backend of the fused ops: built?, where it can run here, why not; build versions."""
    import torch

    from surgery import ops

    statuses = [s.to_dict() for s in ops.backends()]
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "selected": ops.selected_backend(), "build": ops.build_info()}
    if args.json:
        print(json.dumps({"backends": statuses, **info}, indent=2, default=str))
        return 0
    rows = [[s["name"], "yes" if s["built"] else "no", ", ".join(s["devices"]) or "-", s["reason"] or "-"]
            for s in statuses]
    print_lines(table(["BACKEND", "BUILT", "RUNS ON", "WHY NOT (elsewhere)"], rows))
    print(f"selected: {info['selected']} ({ops.ENV}); torch {info['torch']}, "
          f"CUDA device: {'yes' if info['cuda_available'] else 'no'}")
    build = info["build"]
    print("extension build: " + (", ".join(f"{k}={v}" for k, v in build.items()) if build else "not built"))
    return 0
