"""Model options: settings that are part of a model's state but not of its weights.

    from surgery.options import model_options
    model_options(imagebind)        # {"head_mode": {"vision": "all", "audio": "first", ...}}

A token count lives in the weights (a tensor's extent), so a checkpoint carries it by itself.
Some state does not: ImageBind's heads read the first, the mean or all of the CLS tokens, and a
file that forgot which would load 8 CLS tokens in `all` mode back as `first`. Plugins report
such options with `surgery_model_options(model, backbone)` and set them with
`surgery_apply_options(model, backbone, options, edit)`. Users change them with
`surgery.set_options` (a transaction, like a resize: a recipe step, announced, undoable);
`surgery.save` writes them into the "surgery" metadata entry (under "options"), `surgery inspect`
shows them, and `surgery.load` applies them inside its transaction, so a failed load leaves the
old options in place.

A file only ever supplies data: an option can be set only when a plugin reports that name for
this model, each value is plain JSON of bounded depth and size, and the plugin that owns it
validates it before changing anything. Nothing in a file chooses code, a module or another file.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

from torch import nn

from .compose import Part
from .compose import calls as part_calls
from .declarations import backbone_of
from .edit import Edit
from .errors import CheckpointError, ModelConfigError, PluginConflictError, PluginError, SurgeryError
from .plugins import PLUGIN_FAILURES, describe_error, get_host

OPTIONS_KEY = "options"  # in the "surgery" metadata entry
MAX_DEPTH = 8  # containers nested in one option's value: {"vision": "all"} is 1
MAX_CHARS = 65536  # a checkpoint's options, as JSON
SHOWN_CHARS = 80  # of a value quoted in an error message


# -- plain JSON values -------------------------------------------------------------------------------


def json_problem(value: Any, depth: int = 0) -> str | None:
    """Why `value` is not plain JSON (dicts with string keys, lists, strings, finite numbers,
    booleans, None) of at most MAX_DEPTH nested containers, `depth` being those around it; None
    when it is."""
    if isinstance(value, (list, dict)) and depth >= MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} is not a finite number"
    if isinstance(value, list):
        return next((p for p in (json_problem(v, depth + 1) for v in value) if p), None)
    if isinstance(value, dict):
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            return f"key {bad!r} is not a string"
        return next((p for p in (json_problem(v, depth + 1) for v in value.values()) if p), None)
    return f"a {type(value).__name__} is not a JSON value"


def canonical(value: Any) -> str:
    """One text per JSON value (key order ignored; True and 1 told apart, unlike `==`)."""
    return json.dumps(value, sort_keys=True)


def holds(value: Any, asked: Any) -> bool:
    """Whether an option's `value` is what was `asked`: equal, or for a dict every key asked
    holding its asked value (a dict may be set key by key; the keys not named keep theirs)."""
    if isinstance(asked, dict):
        return isinstance(value, dict) and all(k in value and holds(value[k], v) for k, v in asked.items())
    return canonical(value) == canonical(asked)


def shown(value: Any) -> str:
    """A JSON value for an error message, cut at SHOWN_CHARS."""
    text = canonical(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


# -- reading options from the plugins ----------------------------------------------------------------


def model_options(model: nn.Module, backbone: str | None = None) -> dict[str, Any]:
    """Every plugin's options of `model`: {option name: JSON value} ({} when no plugin has any)."""
    return _collect(model, backbone or backbone_of(model))[0]


def _collect(model: nn.Module, backbone: str) -> tuple[dict[str, Any], dict[str, tuple[str, Part]]]:
    """(options, the plugin that owns each one and the part of the model it is about), from every
    `surgery_model_options`, asked of the model and of each sub-model (`surgery.compose`)."""
    options: dict[str, Any] = {}
    owners: dict[str, tuple[str, Part]] = {}
    for plugin, function, part in part_calls(model, backbone, "surgery_model_options"):
        try:
            reported = function(model=part.model, backbone=part.backbone)
        except SurgeryError:
            raise
        except PLUGIN_FAILURES as exc:
            raise PluginError(f"plugin {plugin!r}: surgery_model_options raised {describe_error(exc)} "
                              f"for a {part.backbone!r} model") from exc
        if reported is None:
            continue
        if not isinstance(reported, Mapping):
            raise PluginError(f"plugin {plugin!r}: surgery_model_options returned a {type(reported).__name__}; "
                              f"it must return a dict {{option name: JSON value}} or None")
        for name, value in reported.items():
            if not isinstance(name, str):
                raise PluginError(f"plugin {plugin!r}: surgery_model_options returned an option named {name!r}; "
                                  f"option names are strings")
            if name in owners:
                raise PluginConflictError(f"option {name!r} of backbone {backbone!r} is reported by both plugin "
                                          f"{owners[name][0]!r} and plugin {plugin!r}")
            problem = json_problem(value)
            if problem:
                raise PluginError(f"plugin {plugin!r}: option {name!r} is not plain JSON ({problem})")
            # a copy the model cannot change
            options[name], owners[name] = json.loads(json.dumps(value)), (plugin, part)
    return options, owners


def saved_options(info: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The options a checkpoint's "surgery" entry records ({} for a file that has none), checked to
    be a JSON object of plain values, at most MAX_CHARS long as JSON."""
    saved = info.get(OPTIONS_KEY)
    if saved is None:
        return {}
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: its {OPTIONS_KEY!r} metadata is a {type(saved).__name__}, "
                              f"not a JSON object {{option name: value}}")
    problem = json_problem(saved, depth=-1)  # each option's value may nest MAX_DEPTH containers
    if problem:
        raise CheckpointError(f"{where}: its {OPTIONS_KEY!r} metadata is not plain JSON ({problem})")
    if len(json.dumps(saved)) > MAX_CHARS:
        raise CheckpointError(f"{where}: its {OPTIONS_KEY!r} metadata is longer than {MAX_CHARS} characters "
                              f"as JSON; model options are a few settings")
    return saved


def option_lines(options: Mapping[str, Any]) -> list[str]:
    """One line per option for people: `head_mode: vision=all, audio=first` for a flat dict,
    `pooling: mean` for a string, JSON otherwise."""
    def plain(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    lines = []
    for name, value in options.items():
        flat = isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values())
        lines.append(f"{name}: " + (", ".join(f"{k}={plain(v)}" for k, v in value.items()) if flat else plain(value)))
    return lines


# -- setting options -------------------------------------------------------------------------------


def apply_options(model: nn.Module, requested: Mapping[str, Any], edit: Edit, *, backbone: str | None = None,
                  where: str = "options", only_valid: bool = False) -> dict[str, Any]:
    """Set the `requested` options through the plugins that own them, every change journaled in
    `edit`. Options already at the requested value are left alone; a dict value may name only
    some of its keys (the others keep their values). Afterwards each option must hold what was
    asked, else the plugin is at fault (`PluginError`).

    An option no plugin reports for this model is a `ModelConfigError` naming the ones it has; a
    value its plugin refuses is one too, with the plugin's reason. With `only_valid`, a plugin's
    refusal is not an error: its options are returned, to be applied later (an option may need
    another part of the model's state first: ImageBind's `all` needs a CLS token). Returns the
    options left unapplied ({} without `only_valid`).

    This changes the model outside any transaction: no events, no recipe step. Users call
    `surgery.set_options`, which does both (`surgery.transaction`).
    """
    return change_options(model, requested, edit, backbone=backbone, where=where, only_valid=only_valid)[0]


def change_options(model: nn.Module, requested: Mapping[str, Any], edit: Edit, *, backbone: str | None = None,
                   where: str = "options", only_valid: bool = False, before_change: Callable[[], None] | None = None
                   ) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """`apply_options`, also returning what changed: (options left unapplied, {name: (old value,
    new value)}), whole values. `before_change()` runs once, before the first plugin is asked to
    change anything (the transaction announces the change there)."""
    if not requested:
        return {}, {}
    backbone = backbone or backbone_of(model)
    current, owners = _collect(model, backbone)
    unknown = sorted(n for n in requested if n not in owners)
    if unknown:
        raise ModelConfigError(f"{where}: {', '.join(f'{n!r:.40}' for n in unknown[:5])} "
                               f"{'is not an option' if len(unknown) == 1 else 'are not options'} of this "
                               f"{backbone!r} model; its options: {', '.join(sorted(owners)) or 'none'}")
    changed = {n: v for n, v in requested.items() if not holds(current[n], v)}
    if changed and before_change is not None:
        before_change()
    appliers = dict(get_host().implementations("surgery_apply_options"))
    left: dict[str, Any] = {}
    now = current
    for owner in dict.fromkeys(owners[n] for n in changed):  # each (plugin, part) once, in the order reported
        plugin, part = owner
        mine = {n: v for n, v in changed.items() if owners[n] == owner}
        if plugin not in appliers:
            raise PluginError(f"plugin {plugin!r} reports options {sorted(mine)} but has no "
                              f"surgery_apply_options to set them")
        step = Edit()  # the plugin's own changes, undone at once if it refuses
        try:
            appliers[plugin](model=part.model, backbone=part.backbone, options=json.loads(json.dumps(mine)), edit=step)
        except SurgeryError as exc:
            step.rollback()
            if only_valid:
                left.update(mine)
                continue
            asked = ", ".join(f"{n}={shown(v)}" for n, v in mine.items())
            raise ModelConfigError(f"{where}: cannot set {asked}: {exc}") from exc
        except PLUGIN_FAILURES as exc:
            step.rollback()
            raise PluginError(f"plugin {plugin!r}: surgery_apply_options raised {describe_error(exc)} "
                              f"for options {sorted(mine)}") from exc
        edit.absorb(step)
        now = _collect(model, backbone)[0]
        unset = [n for n in mine if not holds(now.get(n), mine[n])]
        if unset:
            raise PluginError(f"plugin {plugin!r}: surgery_apply_options did not set "
                              + ", ".join(f"{n} (asked {shown(mine[n])}, now {shown(now.get(n))})" for n in unset))
    done = {n: (current[n], now[n]) for n in changed if n not in left and canonical(now[n]) != canonical(current[n])}
    return left, done


__all__ = ["OPTIONS_KEY", "model_options", "saved_options", "apply_options", "change_options", "option_lines",
           "json_problem", "holds", "canonical", "shown"]
