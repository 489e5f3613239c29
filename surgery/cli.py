"""The `surgery` command line: see a model's token sites, and change them in checkpoint files.

    surgery plugins [--json]                 which backbone plugins loaded (and which failed, why)
    surgery models [--json]                  the models plugins can build by name
    surgery backends [--json]                the fused kernels' backends: built, where they run, why not
    surgery inspect TARGET [--model NAME]    sites, counts, constraints, tensors of a model or checkpoint
    surgery resize CKPT --set SITE=N -o OUT  resize a checkpoint file into a new file
    surgery demo                             the whole idea on a tiny ViT, in seconds
    surgery bench {kernels,e2e,surgery}      benchmarks: kernels vs the hardware limit, generation, surgery cost
    surgery profile                          a generation under torch.profiler: trace, top ops, stage times
    surgery sweep                            metrics across token counts: grid, training, plots (local or Ray)

Errors follow one rule: a single line `surgery: error: ...` on stderr and a non-zero exit (2 for
a malformed command line, 1 for anything token-surgery refuses or an unexpected error), with no
traceback, and no file written or changed. Set SURGERY_DEBUG=1 to get the traceback anyway.
Exit 0 means the command did its work: output its reader no longer wants (`| head`) is dropped,
not allowed to stop a file being written.

torch (and timm, through the plugins) is imported only by the commands that need a model, so
`surgery --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Iterable, Mapping, Sequence

from surgery.commands import CommandRegistry, add_to_parser

# Kept in words here so that `--help` needs no torch; `_check_strategies` validates against
# `surgery.strategies` itself, so a name listed here that no longer exists is still refused.
GROWTH_HELP = "restore (default: tokens a shrink dropped come back first), zeros, mean, normal, copy, interpolate"
SHRINK_HELP = "truncate (default), pool"


from surgery.commands import UsageError  # a malformed command line (exit 2); commands of plugins raise it too


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors become one line (`UsageError`) rather than usage text and exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- shared formatting ---------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> list[str]:
    """Left-aligned columns; the last column is not padded (it may be long)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [list(headers), *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths)] + [cells[-1]]
        return (indent + "  ".join(padded)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _shape(shape: Sequence[int] | None) -> str:
    return "absent" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name}={n}" for name, n in counts.items()) or "no token sites"


def _allowed(site: Mapping[str, Any]) -> str:
    text = f"{site['min']}..{'' if site['max'] is None else site['max']}"
    return text + (f" step {site['step']}" if site["step"] != 1 else "")


def site_dicts(model: Any) -> list[dict[str, Any]]:
    """Every site of `model` as `TokenSite.to_dict`, tensors named by their state-dict keys."""
    import surgery
    from surgery.site import module_paths

    paths = module_paths(model)
    return [site.to_dict(paths) for site in surgery.sites(model).values()]


def format_sites(sites: Sequence[Mapping[str, Any]]) -> list[str]:
    """The site table every command prints: one row per site, then the tensors it owns.

    For each tensor: its state-dict key, shape ("absent" while a zero-count tensor is None), the
    token axis and the rows of that axis the site owns, and whether the rows are coupled (belong
    to another tensor's table, like positional-embedding rows of prefix tokens).
    """
    if not sites:
        return ["  (no token sites)"]
    lines: list[str] = []
    header = _table(["SITE", "COUNT", "ALLOWED", "PLUGIN"],
                    [[s["name"], s["count"], _allowed(s), s["plugin"]] for s in sites], indent="  ")
    lines.append(header[0])
    for site, row in zip(sites, header[1:]):
        lines.append(row)
        if site["description"]:
            lines.append(f"      {site['description']}")
        if site["note"]:
            lines.append(f"      note: {site['note']}")
        tensor_rows = []
        for t in site["tensors"]:
            shape = _shape(t["shape"]) + (f" as {_shape(t['view'])}" if t["view"] else "")
            rows = f"axis {t['axis']}, rows {t['start']}:{t['start'] + site['count']}"
            tensor_rows.append([t["key"], shape, rows, "coupled" if t["coupled"] else "own"])
        lines.extend(_table(["TENSOR", "SHAPE", "TOKENS", ""], tensor_rows, indent="      ")[1:])
    return lines


def _state_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def format_shape_changes(before: Mapping[str, tuple], after: Mapping[str, tuple]) -> list[str]:
    """The state-dict tensors whose shape changed (or that appeared or went away)."""
    rows = [[key, _shape(before.get(key)), "->", _shape(after.get(key))]
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    return _table(["TENSOR", "BEFORE", "", "AFTER"], rows, indent="    ")[1:] or ["    (no tensor changed shape)"]


def _print(lines: Iterable[str]) -> None:
    for line in lines:
        print(line)


# -- argument checks -----------------------------------------------------------------------------


def site_count(text: str) -> tuple[str, int]:
    """argparse type of `--set SITE=N`: a site name and an integer (its range is the site's to judge)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected SITE=N (e.g. reg_tokens=4), got {text!r}")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the count of {name!r} must be an integer, got {value!r}") from None


def _requested(pairs: Sequence[tuple[str, int]] | None) -> dict[str, int]:
    requested: dict[str, int] = {}
    for name, count in pairs or ():
        if name in requested and requested[name] != count:
            raise UsageError(f"--set {name} given twice ({requested[name]} and {count})")
        requested[name] = count
    return requested


def _check_strategies(init: str, shrink: str) -> None:
    """Unknown strategy names are a usage error, found before any file is read."""
    from surgery import strategies
    from surgery.errors import StrategyError

    try:
        strategies.check_growth(init)
        strategies.check_shrink(shrink)
    except StrategyError as exc:
        raise UsageError(str(exc)) from None


def _existing_file(path: str) -> str:
    from surgery.errors import CheckpointError

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} is not a file")
    return path


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: same real path (symlinks), or same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# -- models and checkpoints ----------------------------------------------------------------------


def open_checkpoint(path: str, model_name: str | None, allow_large: bool = False) -> tuple[Any, dict[str, Any], str, str]:
    """Build the model a checkpoint belongs to and load the file into it.

    The model is named by the file's "surgery" metadata, or by `--model` (which wins, for a file
    saved without it, such as a plain timm `.pth`). The metadata is untrusted: it may name only a
    registered model and the keyword arguments its plugin declares safe, and a model larger than
    the file justifies needs `--allow-large` (`surgery.model_source`). `surgery.load` resizes the
    fresh model to the file's counts before loading, so any count the file has is fine.
    Returns (model, the file's metadata: {"surgery": {...}, other string entries} or {},
    the model's name, where that name came from).
    """
    import surgery
    from surgery.checkpoint import read_checkpoint
    from surgery.model_source import model_for_checkpoint

    state_dict, metadata = read_checkpoint(path)  # refuses a missing, unsafe or corrupt file
    model, name, source = model_for_checkpoint(metadata.get("surgery") or {}, state_dict, model_name=model_name,
                                               allow_large=allow_large, where=f"checkpoint {path!r}")
    del state_dict  # only its sizes were needed; `load` reads the file again
    surgery.load(path, model)
    return model, metadata, name, source


def _looks_like_path(target: str) -> bool:
    return os.sep in target or "/" in target or os.path.splitext(target)[1] in (
        ".safetensors", ".pth", ".pt", ".bin", ".ckpt")


# -- commands ------------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin the host tried to load, failed ones with their error, and the commands each
    contributes (a command module shares its plugin's entry-point name; `surgery.commands`)."""
    from surgery.plugins import get_host

    host = get_host()
    host.check_detectors()  # a detect that fails for any model shows as "degraded", with its error
    records = [r.to_dict() for r in host.records.values()]
    modules = command_registry().records
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
    _print(_table(["PLUGIN", "VERSION", "STATUS", "BACKBONES", "MODELS", "COMMANDS", "HOOKS (surgery_*)"], rows))
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
        _print(_table(["MODEL", "BACKBONE", "PLUGIN", "DESCRIPTION"], [list(e.values()) for e in entries]))
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
    _print(_table(["BACKEND", "BUILT", "RUNS ON", "WHY NOT (elsewhere)"], rows))
    print(f"selected: {info['selected']} ({ops.ENV}); torch {info['torch']}, "
          f"CUDA device: {'yes' if info['cuda_available'] else 'no'}")
    build = info["build"]
    print("extension build: " + (", ".join(f"{k}={v}" for k, v in build.items()) if build else "not built"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a model's (or a checkpoint's) backbone, counts, sites and the tensors they own."""
    import surgery
    from surgery.errors import BackboneError, CheckpointError
    from surgery.model_source import build_model
    from surgery.options import model_options, option_lines

    target = args.target
    info: dict[str, Any] = {"target": target}
    if os.path.isfile(target):
        model, metadata, name, origin = open_checkpoint(target, args.model, args.allow_large)
        source = f"{name} (named by {origin})"
        info.update(kind="checkpoint", model=name, metadata=metadata)
    elif os.path.exists(target):
        raise CheckpointError(f"{target!r} is not a file")
    elif target in surgery.get_host().models:
        if args.model:
            raise UsageError("--model is for checkpoint files; TARGET already names a model")
        model, source = build_model(target, {}), f"{target} (registered model, random weights)"
        info.update(kind="model", model=target)
    elif _looks_like_path(target):
        raise CheckpointError(f"checkpoint file {target!r} does not exist")
    else:
        known = ", ".join(sorted(surgery.get_host().models)) or "none"
        raise BackboneError(f"{target!r} is neither a file nor a registered model; known models: {known}")
    sites = site_dicts(model)
    info.update(backbone=surgery.backbone_of(model), counts={s["name"]: s["count"] for s in sites},
                sites=sites, recipe=list(surgery.recipe(model).steps), options=model_options(model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['kind']}: {target}")
    print(f"model:    {source}")
    print(f"backbone: {info['backbone']}")
    print(f"counts:   {_counts_text(info['counts'])}")
    if info["options"]:  # plugin-owned state outside the weights (surgery.options)
        print("options:")
        _print([f"  {line}" for line in option_lines(info["options"])])
    print("sites:")
    _print(format_sites(sites))
    if info["recipe"]:
        print("recipe (how these counts were reached):")
        _print(_recipe_lines(info["recipe"]))
    return 0


def _recipe_lines(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per recipe step, naming only the strategy that step used (init grows, shrink cuts)."""
    def how(s: Mapping[str, Any]) -> str:
        return f"init {s['init']}, seed {s['seed']}" if s["to"] > s["from"] else f"shrink {s['shrink']}"

    return [f"  {i}. {s['site']}: {s['from']} -> {s['to']}  ({how(s)})" for i, s in enumerate(steps, 1)]


def cmd_resize(args: argparse.Namespace) -> int:
    """Load CKPT, resize, write OUT. Every check that needs no model runs first (so a mistyped
    command fails at once), and `surgery.save` writes OUT atomically, so a failure leaves no
    file half-written and an existing OUT (with --force) untouched."""
    import surgery
    from surgery.checkpoint import check_output_path

    requested = _requested(args.set)
    _check_strategies(args.init, args.shrink)
    src, out = args.ckpt, args.out
    _existing_file(src)
    if _same_file(src, out):
        raise UsageError(f"-o {out!r} is the input checkpoint; resize never writes its input, choose another OUT")
    if os.path.isdir(out):
        raise UsageError(f"-o {out!r} is a directory; give a file name")
    if os.path.lexists(out) and not args.force:
        raise UsageError(f"{out!r} already exists; pass --force to replace it")
    check_output_path(out)  # even with --force, only a regular file is replaced (no symlink, FIFO, device)

    model, metadata, name, origin = open_checkpoint(src, args.model, args.allow_large)
    print(f"loaded {src}: {name} (named by {origin}), {_counts_text(surgery.counts(model))}")
    before = _state_shapes(model)
    changes = surgery.resize(model, init=args.init, shrink=args.shrink, seed=args.seed, **requested)
    for site, (old, new) in changes.items():
        how = f"init {args.init}" if new > old else f"shrink {args.shrink}"
        print(f"resized {site}: {old} -> {new}  ({how}, seed {args.seed})")
    if not changes:
        print("no count changed (the checkpoint already has these counts)")
    _print(format_shape_changes(before, _state_shapes(model)))
    # The file's own metadata entries travel along; "surgery" is rewritten by save (new counts, recipe).
    kept = {k: v for k, v in metadata.items() if k != "surgery" and isinstance(v, str)}
    surgery.save(model, out, metadata=kept)  # atomic: a temporary file renamed over OUT
    print(f"wrote {out}: {_counts_text(surgery.counts(model))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Resize, undo, restore, save and load on a tiny model, checking each claim as it goes.

    Every "bit-exact" line is a `torch.equal` on the model's outputs; if any fails the demo says
    MISMATCH and exits 1, so it doubles as a smoke test of a plugin.
    """
    import torch

    import surgery
    from surgery.model_source import build_model

    spec = surgery.get_host().model_spec(args.model)
    if spec.example_inputs is None:
        raise UsageError(f"model {args.model!r} registers no example inputs, which the demo needs; pick another --model")
    torch.manual_seed(0)  # random weights, but the same ones every run: the printed numbers repeat
    model = build_model(args.model, {})
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise UsageError(f"model {args.model!r} is built on the meta device (shapes, no values), so the demo cannot "
                         f"run it; pick a model with weights (see 'surgery models')")
    original = surgery.counts(model)
    target = _requested(args.set) if args.set else _demo_target(args.model, surgery.sites(model))
    surgery.engine.validate(model, target)
    if all(original.get(n) == c for n, c in target.items()):
        raise UsageError(f"--set asks for the counts the model already has ({_counts_text(target)})")
    back = {n: original[n] for n in target}
    file_name = f"{args.model}_{'_'.join(f'{n}{c}' for n, c in target.items())}.safetensors"
    if args.out and os.path.exists(os.path.join(args.out, file_name)):
        raise UsageError(f"{os.path.join(args.out, file_name)!r} already exists; remove it or choose another --out")
    inputs = spec.example_inputs(model)
    failures: list[str] = []

    def run(m: torch.nn.Module) -> tuple:
        with torch.no_grad():
            y = spec.forward(m, *inputs) if spec.forward else m(*inputs)
        return tuple(_tensors(y))  # a tensor, or tensors nested in tuples, lists and dicts (ImageBind's)

    def check(label: str, a: tuple, b: tuple) -> None:
        same = len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
        print(f"    {label}: {'bit-exact' if same else 'MISMATCH'}")
        if not same:
            failures.append(label)

    def step(title: str, code: str) -> None:
        print(f"\n{title}\n  >>> {code}")

    args_text, back_text = _keywords(target), _keywords(back)
    print(f"token-surgery demo: {args.model} ({spec.description or spec.backbone})")
    step("1. Build the model and list its token sites", f"model = surgery.build({args.model!r}); surgery.sites(model)")
    print(f"  backbone {surgery.backbone_of(model)}, {sum(p.numel() for p in model.parameters()):,} parameters")
    _print(format_sites(site_dicts(model)))
    y0 = run(model)
    print(f"  forward on example inputs {_shapes(inputs)} -> {_shapes(y0)}")

    step("2. Resize (atomic: on any error the model is left as it was)", f"surgery.resize(model, {args_text})")
    before, defaults = _state_shapes(model), {n: site.default_init for n, site in surgery.sites(model).items()}
    for site, (old, new) in surgery.resize(model, **target).items():
        grown = f"  (new tokens: nothing stashed to restore, so the site's default init {defaults[site]!r})"
        print(f"  {site}: {old} -> {new}" + (grown if new > old else "  (shrink: truncate, dropped tokens stashed)"))
    print(f"  counts now {_counts_text(surgery.counts(model))}; tensors that changed shape:")
    _print(format_shape_changes(before, _state_shapes(model)))
    y1 = run(model)
    if all(a.shape == b.shape for a, b in zip(y0, y1)):
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(y0, y1))
        print(f"  output changed: max |new - original| = {diff:.3g}")
    else:
        print(f"  output shape changed: {_shapes(y1)}")

    step("3. Run with the original counts for a while", f"with surgery.tokens(model, {back_text}): ...")
    with surgery.tokens(model, **back):
        print(f"  inside: {_counts_text(surgery.counts(model))}")
        check("output equals the original model's", run(model), y0)
    print(f"  after the block: {_counts_text(surgery.counts(model))}")
    check("output equals the resized model's", run(model), y1)

    step("4. Resize back for good, and forward again", f"surgery.resize(model, {back_text})")
    surgery.resize(model, **back)
    check("output equals the original model's", run(model), y0)
    print(f"  >>> surgery.resize(model, {args_text})   # init='restore' brings the stashed tokens back")
    surgery.resize(model, **target)
    check("output equals the resized model's", run(model), y1)

    step("5. Save, and load into a freshly built model", "surgery.save(model, path); surgery.load(path, fresh)")
    with tempfile.TemporaryDirectory(prefix="surgery-demo-") as tmp:
        folder = args.out or tmp
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, file_name)
        surgery.save(model, path)
        fresh = surgery.build(args.model)
        print(f"  fresh model: {_counts_text(surgery.counts(fresh))}")
        replayed = surgery.load(path, fresh).replayed
        print(f"  after load:  {_counts_text(surgery.counts(fresh))}  ({os.path.getsize(path):,} bytes; "
              f"{'recipe replayed, then weights loaded' if replayed else 'resized to the file, then loaded'})")
        check("loaded model's output equals the saved model's", run(fresh), y1)
        print(f"  checkpoint kept at {path}" if args.out else "  (temporary checkpoint removed; --out DIR keeps it)")

    step("6. The recipe: every change, replayable on a fresh model", "surgery.recipe(model)")
    _print(_recipe_lines(surgery.recipe(model).steps))
    if failures:
        print(f"\n{len(failures)} check(s) failed: {'; '.join(failures)}")
        return 1
    print("\nall checks passed")
    return 0


def _demo_target(model_name: str, sites: Mapping[str, Any]) -> dict[str, int]:
    """The demo's change when --set gives none: 4 register tokens where the model has that site,
    else the first site one step up (or down, where up is not allowed)."""
    if "reg_tokens" in sites and sites["reg_tokens"].count != 4:
        return {"reg_tokens": 4}
    for name, site in sites.items():
        for count in (site.count + site.step, site.count - site.step):
            if site.violation(count) is None:
                return {name: count}
    raise UsageError(f"model {model_name!r} has no site whose count can change "
                     f"({_counts_text({n: s.count for n, s in sites.items()})}); pick another --model")


def _keywords(counts: Mapping[str, int]) -> str:
    """Counts as the keyword arguments of a call that runs as printed (`**{...}` for a dotted site name)."""
    if all(name.isidentifier() for name in counts):
        return ", ".join(f"{name}={count}" for name, count in counts.items())
    return f"**{dict(counts)!r}"


def _tensors(value: Any) -> list[Any]:
    """The tensors in a model's inputs or outputs: a tensor, or tensors in tuples, lists, dicts."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


def _shapes(value: Any) -> str:
    """Shapes of (nested) inputs or outputs, e.g. `[(2, 3, 32, 32)]` or `[{vision: (2, 24), ...}]`."""
    if hasattr(value, "shape"):
        return str(tuple(value.shape))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_shapes(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shapes(v) for v in value) + "]"
    return type(value).__name__


# -- benchmarks and profiling ------------------------------------------------------------------

BENCH_KINDS = ("kernels", "e2e", "surgery")
_KIND_OPTIONS = {  # options that only one kind of benchmark reads
    "ops": "kernels", "backends": "kernels", "peak_gbps": "kernels",
    "model": "e2e", "query_lens": "e2e", "batches": "e2e", "prompt_len": "e2e", "imagebind": "e2e",
    "repeats": "surgery",
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one benchmark, write its CSV/JSON/PNG/summary.md to --out, print the summary."""
    from pathlib import Path

    for option, kind in _KIND_OPTIONS.items():
        if getattr(args, option) is not None and kind != args.kind:
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} is an option of 'surgery bench {kind}', not of 'surgery bench {args.kind}'")
    from surgery.bench import OutputMismatchError
    from surgery.bench.timing import resolve_device

    resolve_device(args.device)  # a clear error before any model is built
    out = Path(args.out or os.path.join("out", "bench", args.kind))
    progress = not args.no_progress
    if args.kind == "kernels":
        from surgery.bench import kernels

        config = kernels.KernelConfig(device=args.device, quick=args.quick, dtypes=args.dtypes, threads=args.threads,
                                      ops=args.ops or kernels.OPS, backends=args.backends, peak_gbps=args.peak_gbps)
        results, files = kernels.main(config, out, progress)
        summary = kernels.summary_markdown(results)
    elif args.kind == "e2e":
        from surgery.bench import e2e

        config = e2e.E2EConfig(device=args.device, quick=args.quick, dtypes=args.dtypes, threads=args.threads,
                               model=args.model or e2e.E2EConfig.model, query_lens=args.query_lens,
                               batches=args.batches, prompt_len=args.prompt_len, imagebind=args.imagebind)
        results, files = e2e.main(config, out, progress)
        summary = e2e.summary_markdown(results) + "\n\nImageBind: " + results.imagebind_note
    else:
        from surgery.bench import surgery_cost

        if args.dtypes and len(args.dtypes) > 1:
            raise UsageError("'surgery bench surgery' takes one dtype (the sites' tensors), e.g. --dtypes bfloat16")
        config = surgery_cost.CostConfig(device=args.device, quick=args.quick, threads=args.threads,
                                         dtype=(args.dtypes or ("float32",))[0], repeats=args.repeats)
        results, files = surgery_cost.main(config, out, progress)
        summary = surgery_cost.summary_markdown(results)
    print(summary)
    print(f"\nresults in {out}: " + ", ".join(Path(f).name for f in files))
    refused = getattr(results, "refused", [])
    if refused:
        raise OutputMismatchError(f"{len(refused)} backend measurement(s) refused because their output differs from "
                                  f"the reference or they failed (not timed): " + "; ".join(
                                      f"{r.op} [{r.shape}, {r.dtype}] {r.backend}" for r in refused))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile one generation: trace file, top operators by self time, the stages' times."""
    from pathlib import Path

    from surgery.bench import profile
    from surgery.plugins import get_host

    host = get_host()
    backbone = host.model_spec(profile.ProfileConfig.model).backbone  # what `profile.run` drives
    if host.model_spec(args.model).backbone != backbone:
        usable = ", ".join(sorted(n for n, s in host.models.items() if s.backbone == backbone))
        raise UsageError(f"surgery profile times a generation of a {backbone!r} model; {args.model!r} is of "
                         f"backbone {host.model_spec(args.model).backbone!r}. --model takes one of: {usable}")
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


# -- parser and entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (no torch import: `--help` stays instant)."""
    from surgery import __version__

    parser = _Parser(prog="surgery", allow_abbrev=False,
                     description="Change how many learned tokens (class, register, prompt tokens...) a model uses.",
                     epilog="Run 'surgery demo' for a tour; 'surgery COMMAND --help' for each command.")
    parser.add_argument("--version", action="version", version=f"token-surgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Any, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def allow_large_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--allow-large", action="store_true",
                       help="build the model a checkpoint's metadata names even when it holds more elements than "
                            "the file's tensors (plus 2**24): only for files you trust")

    def set_option(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--set", action="append", type=site_count, metavar="SITE=N", required=required,
                       help="token count of a site, e.g. reg_tokens=4 (repeat for several sites)")

    json_flag(command("plugins", cmd_plugins, "list backbone plugins (failed ones too)",
                      "List every backbone plugin found under the 'surgery.backbones' entry points: version,\n"
                      "status (loaded; degraded: its code failed since; failed; missing: named by SURGERY_PLUGINS\n"
                      "but not installed), the hooks it implements, and the error of one that is not loaded."))
    json_flag(command("models", cmd_models, "list models plugins can build by name",
                      "List the models plugins can build by name (random weights; nothing is downloaded)."))

    json_flag(command("backends", cmd_backends, "list the fused-kernel backends and whether they run here",
                      "The fused ops (query_concat, adapter_add, adapter_attention) have four backends:\n"
                      "eager, cpp, cuda, triton. Show which were built, which can run here and why not,\n"
                      "and the torch/CUDA/compiler versions of the build. SURGERY_KERNEL forces one."))

    p = command("inspect", cmd_inspect, "show a model's or checkpoint's token sites",
                "Show the backbone, token sites, counts, constraints and the tensors each site owns.\n"
                "TARGET is a registered model name (see 'surgery models') or a checkpoint file\n"
                "(.safetensors saved by surgery.save, or a plain state-dict .pth with --model).")
    p.add_argument("target", metavar="TARGET", help="checkpoint file or registered model name")
    p.add_argument("--model", metavar="NAME", help="model to build for a checkpoint without surgery metadata")
    allow_large_flag(p)
    json_flag(p)

    p = command("resize", cmd_resize, "resize the token sites of a checkpoint file",
                "Build the checkpoint's model, load CKPT (resized to its counts), set new counts and\n"
                "save the result to OUT with surgery.save. CKPT is never written.\n\n"
                "example: surgery resize vit.safetensors --set reg_tokens=4 --init normal -o vit_reg4.safetensors")
    p.add_argument("ckpt", metavar="CKPT", help="input checkpoint (.safetensors or .pth)")
    set_option(p, required=True)
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .safetensors file (never CKPT)")
    p.add_argument("--init", default="restore", metavar="STRATEGY", help=f"how new tokens are made: {GROWTH_HELP}")
    p.add_argument("--shrink", default="truncate", metavar="STRATEGY", help=f"how tokens are removed: {SHRINK_HELP}")
    p.add_argument("--seed", type=int, default=0, help="seed of the 'normal' init (default 0; recorded in the recipe)")
    p.add_argument("--model", metavar="NAME", help="model to build for a checkpoint without surgery metadata")
    allow_large_flag(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (a regular file only)")

    p = command("demo", cmd_demo, "resize, undo, save and load a tiny ViT, in seconds",
                "Walk through token surgery on a small model with random weights: list its sites,\n"
                "resize (default: reg_tokens -> 4 where the model has registers, else its first site one\n"
                "token up), run temporarily with the old counts, resize back bit-exactly, save and load\n"
                "into a fresh model, and print the recipe.")
    p.add_argument("--model", default="vit_tiny_test", metavar="NAME", help="registered model (default vit_tiny_test)")
    set_option(p, required=False)
    p.add_argument("--out", metavar="DIR", help="keep the demo checkpoint in DIR (default: a temporary folder)")

    p = command("bench", cmd_bench, "benchmarks: kernels vs the hardware limit, generation, surgery cost",
                "Run a benchmark and write its results (CSV, JSON, PNG plots, summary.md) to --out.\n\n"
                "  kernels  each fused op x backend x shape x dtype: ms, GB/s, fraction of each limit\n"
                "           (copy limit, write-only floor: a same-run copy / fill; GPU: device peak)\n"
                "  e2e      LLaMA-Adapter V2: prefill ms and decode tokens/s of this project's path,\n"
                "           upstream's and the no-adapter floor (greedy tokens checked identical first)\n"
                "  surgery  time and extra memory of resize and tokens(...) on the 7B shape (meta weights)\n\n"
                "--quick runs a small grid (under a minute on a 2-core CPU). Details: docs/performance.md")
    p.add_argument("kind", choices=BENCH_KINDS, metavar="{kernels,e2e,surgery}", help="which benchmark")
    p.add_argument("--quick", action="store_true", help="a small grid with short timings (CI)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--out", metavar="DIR", help="results folder (default out/bench/KIND)")
    p.add_argument("--threads", type=int, help="CPU threads, fixed for the run (default: torch's count)")
    p.add_argument("--dtypes", type=_name_list, help="e.g. float32,bfloat16 (default: both; float32 with --quick)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ops", type=_name_list, help="kernels: some of query_concat,adapter_add,adapter_attention")
    p.add_argument("--backends", type=_name_list, help="kernels: e.g. cpp,cpp.out (the copy and fills: always)")
    p.add_argument("--peak-gbps", type=float, help="kernels on GPU: the peak memory bandwidth, GB/s "
                                                   "(default: device properties, else a table; SURGERY_PEAK_GBPS)")
    p.add_argument("--model", help="e2e: a registered LLaMA-Adapter V2 model (default llama_adapter_v2_bench)")
    p.add_argument("--query-lens", type=_int_list, help="e2e: e.g. 1,10,64,256")
    p.add_argument("--batches", type=_int_list, help="e2e: e.g. 1,4")
    p.add_argument("--prompt-len", type=int, help="e2e: prompt tokens per row (default 32; 16 with --quick)")
    p.add_argument("--imagebind", action=argparse.BooleanOptionalAction, default=None,
                   help="e2e: also run benchmarks/imagebind_embed.py (default: yes, except with --quick)")
    p.add_argument("--repeats", type=int, help="surgery: timed calls per action (default 30; 5 with --quick)")

    p = command("profile", cmd_profile, "profile a LLaMA-Adapter V2 generation (trace, top ops, stages)",
                "Run one greedy generation under torch.profiler with labelled ranges for each stage\n"
                "(visual encoder, query concat, visual blocks, adapter add, prefill, each decode step,\n"
                "adapter attention; NVTX ranges too on GPU), write a Chrome/Perfetto trace to --out and\n"
                "print the top operators by self time and each stage's time.")
    p.add_argument("--model", default="llama_adapter_v2_bench", help="registered model (default llama_adapter_v2_bench)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--query-len", type=int, help="resize the visual queries first")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="tokens to generate (default 8)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's count)")
    p.add_argument("--top", type=int, default=15, help="operators to print (default 15)")
    p.add_argument("--out", metavar="DIR", help="folder for trace.json, stages.json, top_ops.txt (default out/profile)")

    from surgery.sweep.cli import add_command as add_sweep_command  # its code lives in surgery/sweep/cli.py

    add_sweep_command(command)
    add_to_parser(command_registry(), sub, _Parser)  # what plugins' command modules contribute
    return parser


def command_registry() -> CommandRegistry:
    """The commands of the installed command modules (`surgery.commands` entry points)."""
    registry = CommandRegistry()
    registry.load_entry_points()
    return registry


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 refused, 2 bad command line)."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            raise UsageError("choose a command: plugins, models, backends, inspect, resize, demo, bench, profile, sweep "
                             "(see 'surgery --help')")
        if os.environ.get(KERNEL_ENV, "").strip():  # a typo there is refused before any work
            from surgery import ops

            ops.selected_backend()
        command = getattr(args, "command_object", None)
        if command is not None and command.run is None:  # a group command typed without its kind
            kinds = ", ".join(k.name for k in command_registry().kinds(command.name)) or "none installed"
            raise UsageError(f"choose what 'surgery {command.name}' runs: {kinds} (see 'surgery {command.name} --help')")
        with _ReaderMayLeave():
            return command.run(args) if command is not None else args.func(args)
    except SystemExit as exc:  # plugin or library code calling sys.exit(): never a success
        return _fail(SystemExit(f"sys.exit({exc.code!r}) was called during the command; it was stopped"), 1)
    except UsageError as exc:
        return _fail(exc, 2)
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from surgery.errors import SurgeryError
        from surgery.plugins import describe_error

        if isinstance(exc, (SurgeryError, OSError)):
            return _fail(exc, 1)
        # a bug (ours or a library's): still one line, saying so; SURGERY_DEBUG=1 shows the traceback
        return _fail(exc, 1, f"unexpected error, please report it (SURGERY_DEBUG=1 shows the traceback): "
                             f"{describe_error(exc)}")


KERNEL_ENV = "SURGERY_KERNEL"  # `surgery.ops.ENV`, named here so that `--help` needs no torch


class _ReaderMayLeave:
    """While a command runs, output its reader no longer wants is dropped instead of stopping it.

    `surgery resize ... | head -n 1` closes the pipe after the first line; the next print would
    raise BrokenPipeError and stop the command before it wrote its file, yet report success.
    Here stdout is pointed at /dev/null from then on, so the command finishes its work and its
    exit status says how that went.
    """

    def __enter__(self) -> "_ReaderMayLeave":
        self.stream, self.gone = sys.stdout, False
        sys.stdout = self  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()
        sys.stdout = self.stream

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._reader_left()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._reader_left()

    def _reader_left(self) -> None:
        self.gone = True
        try:  # the interpreter flushes stdout at exit: that must not fail either
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self.stream, name)


def _fail(exc: BaseException, code: int, message: str | None = None) -> int:
    """One line on stderr (`message`, else the error's; a message spanning lines is joined), or
    the traceback on request."""
    if os.environ.get("SURGERY_DEBUG", "") not in ("", "0"):
        import traceback

        traceback.print_exception(exc)
    message = " ".join((message if message is not None else str(exc)).split()) or type(exc).__name__
    print(f"surgery: error: {message}", file=sys.stderr)
    return code
