"""Checkpoints: save a model with its token counts, load one whose counts differ from the model's.

    surgery.save(model, "edited.safetensors")              # weights + {"surgery": counts, recipe, options, ...}
    surgery.load("edited.safetensors", fresh_model)        # replays the recipe, then loads the weights
    surgery.load("timm_reg4.pth", reg0_model)              # the model grows to 4 registers, then loads
    surgery.load_state_dict(model, sd, mismatch="checkpoint")  # the model keeps its counts instead

Why loading is more than `model.load_state_dict`: a checkpoint of another token count does not
fit the model's tensors. We read each site's count out of the state dict, resize the model to it
(or, with `mismatch="checkpoint"`, resize there, load, and resize back), and only then copy the
weights. Everything - recipe replay, resizes, the copy, clearing the stash - goes through one
`Edit` journal, so any failure (a missing key, a shape that does not fit, a plugin's error,
Ctrl-C half-way through the copy) leaves the model bit-exactly as it was. Keys and shapes are
checked before any weight is copied, because torch's `load_state_dict` copies some tensors
before it raises.

Reading is safe by construction: safetensors files through safetensors, pickles only through
`torch.load(..., weights_only=True)`; a pickle that wants to build objects or call functions is
refused (`UnsafeCheckpointError`) and nothing in it runs. A file's recipe is not run step by
step: the model is resized once to the counts its tensors have, and a recipe that leads there
is kept as the model's history, so no allocation is larger than the file's tensors justify.
Files are never written by a load, and `save` writes to a temporary file in the same folder
that replaces the target (a regular file, or a new name) in one step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import strategies
from .edit import Edit
from .engine import Recipe, _apply, _notify, _set_state, adopt, backbone_of, counts, model_state, sites, validate
from .errors import CheckpointError, SurgeryError, UnsafeCheckpointError
from .options import OPTIONS_KEY, apply_options, model_options, saved_options
from .site import module_paths

FORMAT = 1  # version of the "surgery" metadata entry
META_KEY = "surgery"
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")  # training checkpoints nest the weights
LIST_CAP = 10  # keys named in an error message before "... and N more"


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What a load did: the model's counts now, how they changed, what the checkpoint had.

    `converted` names the sites whose checkpoint tensors were fitted to the model's counts
    (`mismatch="checkpoint"`): {site: (checkpoint count, model count)}. `missing_keys` and
    `unexpected_keys` are those a `strict=False` load left alone.
    """

    counts: dict[str, int]
    changes: dict[str, tuple[int, int]]
    checkpoint_counts: dict[str, int]
    converted: dict[str, tuple[int, int]]
    replayed: bool
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- saving ----------------------------------------------------------------------------------------


def surgery_metadata(model: nn.Module) -> dict[str, Any]:
    """The "surgery" entry `save` writes: enough to rebuild the model and replay its counts."""
    state = model_state(model)
    recipe = Recipe(backbone=backbone_of(model), steps=state.recipe)
    return {
        "format": FORMAT,
        "backbone": recipe.backbone,
        "model": state.model_name,
        "model_kwargs": dict(state.model_kwargs),
        "counts": counts(model, recipe.backbone),
        "recipe": json.loads(recipe.to_json()),
        OPTIONS_KEY: model_options(model, recipe.backbone),  # plugin-owned state outside the weights
    }


def save(model: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `model`'s weights as safetensors, with its counts, recipe and plugin options
    (`surgery.options`) under the "surgery" key.

    Tied tensors (one tensor under several keys) are written once by `safetensors.torch.save_model`;
    `load` fills the other keys back in from the model's own tying. `metadata` adds string
    entries of your own. Atomic: the file appears complete or not at all.
    """
    from safetensors.torch import save_model

    extra = dict(metadata or {})
    if META_KEY in extra:
        raise CheckpointError(f"metadata key {META_KEY!r} is reserved for token-surgery's own entry")
    bad = [k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise CheckpointError(f"safetensors metadata must map strings to strings; not so for: {_listing(bad)}")
    extra[META_KEY] = json.dumps(surgery_metadata(model), default=repr)
    path = as_path(path)
    _write_atomically(path, lambda tmp: save_model(model, str(tmp), metadata=extra, force_contiguous=True))
    return path


def as_path(path: Any) -> Path:
    """A path given as str, bytes (decoded as the OS does) or os.PathLike; anything else is refused."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"a checkpoint path must be a str, bytes or os.PathLike, not a {type(path).__name__}")
    return Path(path)


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse to save to anything but a regular file or a new name in an existing folder: saving
    replaces the target, and a symlink, FIFO or device node replaced by a file is never what was meant."""
    path = as_path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise CheckpointError(f"cannot save to {path}: {exc}") from exc
    if mode is None or stat.S_ISREG(mode):
        if not path.parent.is_dir():
            raise CheckpointError(f"cannot save to {path}: folder {path.parent} does not exist")
        return path
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"cannot save to {path}: it is a directory")
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"cannot save to {path}: it is a symbolic link (to {os.readlink(path)}); saving "
                              f"replaces only a regular file: name the file itself, or remove the link")
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    raise CheckpointError(f"cannot save to {path}: it is {kind}; saving replaces only a regular file "
                          f"(or creates a new one)")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary file next to `path`, flush it to disk, then rename it over `path`.

    The temporary file is created with mode 0o666 so the umask applies as for any new file, and
    gets that mode back after `write` (safetensors replaces the file with one of mode 0600). Its
    name is short (a long target name would push it past the file system's 255 bytes). On any
    failure it is removed and `path` (if it existed) is untouched.
    """
    path = check_output_path(path)
    tmp = path.with_name(f".surgery-{uuid.uuid4().hex[:16]}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, Exception) and not isinstance(exc, SurgeryError):  # disk full, permissions, ...
            raise CheckpointError(f"cannot save to {path}: {type(exc).__name__}: {exc}") from exc
        raise


# -- reading ---------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a checkpoint file, on the CPU; the file is only read.

    `.safetensors` files are read with safetensors; their metadata comes back as a dict with the
    "surgery" entry decoded from JSON. Torch checkpoints (`.pth`, `.pt`, `.bin`, `.ckpt`: the
    format is told from the file's first bytes, not its name) are read only with
    `torch.load(weights_only=True)` and have no metadata ({}).
    Weights nested under "state_dict", "model_state_dict" or "model" are unwrapped; key prefixes
    such as DDP's "module." are kept as they are.
    """
    path = as_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    zipped = head.startswith(b"PK\x03\x04")  # torch.save's format
    if path.suffix == ".safetensors" or (not zipped and _looks_like_safetensors(head)):
        state_dict, metadata = _read_safetensors(path)
    elif zipped or head.startswith(b"\x80"):  # a zip, or a raw pickle (PROTO opcode)
        state_dict, metadata = _unwrap(_read_torch(path), path), {}
    else:
        raise CheckpointError(f"checkpoint {path} is neither safetensors nor a torch checkpoint "
                              f"(it starts with bytes {head[:8]!r}); the file may be corrupt")
    return _tensors_only(state_dict, f"checkpoint {path}"), metadata


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file starts with the 8-byte length of its JSON header, then '{'. (Checked
    before the pickle's 0x80: a header length may well start with that byte.)"""
    return len(head) > 8 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # SafetensorError: truncated, bad header, ...
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file (truncated or "
                              f"corrupt?): {exc}") from exc
    if META_KEY in metadata:
        try:
            metadata[META_KEY] = json.loads(metadata[META_KEY])
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path}: its {META_KEY!r} metadata is not valid JSON: {exc}") from exc
        except RecursionError:  # hostile nesting: json recurses once per level
            raise CheckpointError(f"checkpoint {path}: its {META_KEY!r} metadata is nested too deeply to "
                                  f"be token-surgery's") from None
        if not isinstance(metadata[META_KEY], dict):
            raise CheckpointError(f"checkpoint {path}: its {META_KEY!r} metadata is not a JSON object")
    return state_dict, metadata


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler refused something
        reason = next((line.strip() for line in str(exc).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), str(exc).splitlines()[0])
        raise UnsafeCheckpointError(
            f"refused checkpoint {path}: it is a pickle that is not plain tensors and containers "
            f"(it would build objects or run code), so it was not loaded ({reason}); save "
            f"model.state_dict() instead of the model, or convert it to safetensors") from exc
    except Exception as exc:  # truncated zip, EOF, bad records
        raise CheckpointError(f"checkpoint {path} cannot be read by torch.load (truncated or corrupt?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _unwrap(obj: Any, path: Path) -> Mapping:
    """The state dict inside a training checkpoint ({"state_dict": sd, "epoch": 3, ...})."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _tensors_only(state_dict: Mapping, where: str) -> dict[str, torch.Tensor]:
    """A shallow copy (the caller's dict is never changed), refusing entries that are not tensors."""
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state_dict.items()
           if not isinstance(k, str) or not (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))]
    if bad:
        raise CheckpointError(f"{where} has entries that are not tensors: {_listing(bad)}")
    return dict(state_dict)


def _listing(items: list[str], cap: int = LIST_CAP) -> str:
    shown = ", ".join(items[:cap])
    return shown + (f" ... and {len(items) - cap} more" if len(items) > cap else "")


# -- counts in a state dict ------------------------------------------------------------------------


def state_dict_counts(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                      backbone: str | None = None, partial: bool = False) -> dict[str, int]:
    """Each site's count in `state_dict` (a state dict of `model`'s backbone, at any counts).

    A site's own `count_in_state_dict(state_dict, paths)` decides when the plugin gives one
    (`paths` maps id(module) to its key prefix; returning None means "cannot tell"). Otherwise
    the site's first tensor is read: present, its extent along `axis`, less whatever the model's
    tensor holds besides this site's tokens; absent and declared with a `template`, 0. Sites that
    cannot be told are left out (they keep the model's count). In a `partial` state dict (a file
    holding only some of the model's weights) an absent tensor tells nothing.
    """
    paths = module_paths(model)
    found: dict[str, int] = {}
    for name, site in sites(model, backbone).items():
        if site.count_in_state_dict is not None:
            try:
                count = site.count_in_state_dict(state_dict, paths)
            except Exception as exc:  # noqa: BLE001 - a plugin's reader may raise anything
                raise CheckpointError(f"site {name!r}: plugin {site.plugin!r} failed to read its count from "
                                      f"the state dict: {type(exc).__name__}: {exc}") from exc
        elif site.tensors:
            count = _default_count(site, state_dict, paths, partial)
        else:
            count = None
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int):
                raise CheckpointError(f"site {name!r}: plugin {site.plugin!r} read a count of {count!r}, "
                                      f"not an integer")
            found[name] = count
    return found


def _default_count(site, state_dict: Mapping[str, torch.Tensor], paths: Mapping[int, str],
                   partial: bool = False) -> int | None:
    t = site.tensors[0]
    prefix = paths.get(id(t.module), "")
    key = f"{prefix}.{t.name}" if prefix else t.name
    if t.view is not None:
        raise CheckpointError(f"site {site.name!r}: its tensor {key} is declared with a view, so its count "
                              f"cannot be read from a state dict by default; plugin {site.plugin!r} should "
                              f"give the site a count_in_state_dict(state_dict, paths)")
    stored = state_dict.get(key)
    if stored is None:
        return 0 if t.template is not None and not partial else None
    mine = t.tensor()
    if not isinstance(stored, torch.Tensor) or stored.dim() != mine.dim():
        return None  # the key check reports the shape
    axis = t.axis % mine.dim()
    count = stored.shape[axis] - (mine.shape[axis] - site.count)
    return count if count >= 0 else None


# -- loading ---------------------------------------------------------------------------------------


def load(path: str | os.PathLike, model: nn.Module, *, strict: bool = True, mismatch: str = "model",
         init: str | Mapping[str, str] = strategies.RESTORE, shrink: str | Mapping[str, str] = "truncate",
         seed: int = 0) -> LoadResult:
    """Load a checkpoint file into `model`, fitting token counts first. Atomic; the file is only read.

    The model is resized to the counts the file's tensors have. A file written by `save` whose
    recipe leads from the model's counts (a freshly built model) to those counts has it kept as
    the model's recipe (checked step by step, never run: a hostile recipe allocates nothing), so
    the recipe stays complete for the next `save`. A file of another backbone is refused.
    """
    from .layouts import read_any  # layouts builds on this module's readers

    path = as_path(path)
    state_dict, metadata, layout = read_any(path)  # a released or Hugging Face layout: a plugin renamed its keys
    info = metadata.get(META_KEY) or {}
    recipe, options = None, dict(layout.options) if layout else {}
    if info:
        if not isinstance(info.get("format"), int) or info["format"] > FORMAT:
            raise CheckpointError(f"checkpoint {path}: {META_KEY!r} metadata format {info.get('format')!r} is not "
                                  f"one this version reads (up to {FORMAT}); upgrade token-surgery")
        backbone = backbone_of(model)
        if info.get("backbone") is not None and info["backbone"] != backbone:
            raise CheckpointError(f"checkpoint {path} is of backbone {info['backbone']!r}, the model is of "
                                  f"backbone {backbone!r}")
        if info.get("recipe"):
            try:
                recipe = Recipe.from_json(info["recipe"])
            except SurgeryError as exc:  # a RecipeError naming the step and field
                raise CheckpointError(f"checkpoint {path}: {exc}") from exc
        options = saved_options(info, f"checkpoint {path}")
    where = f"checkpoint {path}" + (f" ({layout.name}, recognised by plugin {layout.plugin!r})" if layout else "")
    return _load(model, state_dict, strict=strict, mismatch=mismatch, init=init, shrink=shrink, seed=seed,
                 recipe=recipe, where=where, options=options, partial=bool(layout and layout.partial))


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                    mismatch: str = "model", init: str | Mapping[str, str] = strategies.RESTORE,
                    shrink: str | Mapping[str, str] = "truncate", seed: int = 0) -> LoadResult:
    """`model.load_state_dict` for a state dict of any token counts. Atomic; `state_dict` is not changed.

    mismatch="model" (default): the model is resized to the checkpoint's counts, then loaded.
    mismatch="checkpoint": the model keeps its counts; the checkpoint's tensors are fitted to them
    with the engine's own strategies: resize to the checkpoint's counts, load, then resize back,
    new tokens made by `init` (default: the site's default growth) and extra ones dropped by
    `shrink`. `strict` as in torch: missing and unexpected keys are errors; wrong shapes always are.
    Stashed tokens (from an earlier truncate) are dropped: they belong to the weights replaced.
    """
    return _load(model, state_dict, strict=strict, mismatch=mismatch, init=init, shrink=shrink, seed=seed,
                 recipe=None, where="state dict")


def _load(model: nn.Module, state_dict: Mapping, *, strict: bool, mismatch: str, init, shrink, seed: int,
          recipe: Recipe | None, where: str, options: Mapping[str, Any] | None = None,
          partial: bool = False) -> LoadResult:
    if mismatch not in ("model", "checkpoint"):
        raise CheckpointError(f"mismatch must be 'model' (resize the model to the checkpoint's counts) or "
                              f"'checkpoint' (fit the checkpoint's tensors to the model's counts), got {mismatch!r}")
    if isinstance(init, str):
        strategies.check_growth(init)
    if isinstance(shrink, str):
        strategies.check_shrink(shrink)
    backbone = backbone_of(model)
    sd = _tensors_only(state_dict, where)
    journal = _Journal(model, backbone)
    recorded = model_state(model).recipe
    try:
        # the file's options first where the model takes them as it is (they may allow its counts:
        # ImageBind's `first` lets a count go to 0); the others once the counts are the file's
        pending = apply_options(model, options or {}, journal.edit, backbone=backbone, where=where, only_valid=True)
        found = state_dict_counts(model, sd, backbone, partial)
        try:
            validate(model, found, backbone)
        except SurgeryError as exc:  # counts this model cannot take: often not a checkpoint of it at all
            problems = _check_keys(model, dict(sd), strict, partial)[0]
            raise CheckpointError(f"{where} does not fit the model: its token counts {found} cannot be applied "
                                  f"({exc})" + "".join(f"; {p}" for p in problems)) from exc
        history = _history(model, recipe, journal.start, found, where) if mismatch == "model" else None
        # one resize, to the file's counts (and where a tensor cannot tell, to the recipe's)
        journal.resize({**(recipe.counts if history else {}), **found}, init, shrink, seed)
        problems, missing, unexpected = _check_keys(model, sd, strict, partial)
        if problems:
            raise CheckpointError(f"{where} does not fit the model (token counts {found}): " + "; ".join(problems)
                                  + "; the model was left as it was")
        _copy_weights(model, sd, journal.edit)
        _set_state(model, journal.edit, stash={}, **({"recipe": recorded + history} if history else {}))
        apply_options(model, pending, journal.edit, backbone=backbone, where=where)
        if mismatch == "checkpoint":
            journal.resize(journal.start, init, shrink, seed)
        journal.commit()
    except BaseException as exc:
        journal.rollback()
        if isinstance(exc, Exception) and not isinstance(exc, SurgeryError):  # a module's load hook, OOM, ...
            raise CheckpointError(f"loading {where} failed: {type(exc).__name__}: {exc}; "
                                  f"the model was left as it was") from exc
        raise
    converted = {n: (c, journal.start[n]) for n, c in found.items() if c != journal.start[n]}
    return LoadResult(counts=dict(journal.now), changes=journal.net(), checkpoint_counts=found,
                      converted=converted if mismatch == "checkpoint" else {}, replayed=bool(history),
                      missing_keys=tuple(missing), unexpected_keys=tuple(unexpected))


def _history(model: nn.Module, recipe: Recipe | None, start: Mapping[str, int], found: Mapping[str, int],
             where: str) -> tuple[dict, ...] | None:
    """The file's recipe steps, to keep as the model's recipe, when they lead from the model's
    counts `start` to the counts `found` in the file's tensors; None when they do not (the load
    then records its one resize instead). Checked, never run: every step must take its site from
    where the step before left it, to a count the site allows, so the kept history is one the
    model could have walked; the weights come from the file either way."""
    if recipe is None or not recipe.steps or recipe.backbone != backbone_of(model):
        return None
    declared = sites(model, recipe.backbone)
    unknown = next((i for i, s in enumerate(recipe.steps, 1) if s["site"] not in declared), None)
    if unknown is not None:
        raise CheckpointError(f"{where}: step {unknown} of its recipe names site {recipe.steps[unknown - 1]['site']!r}, "
                              f"which the model does not have; its sites: {', '.join(declared) or 'none'}")
    if any(start[n] != c for n, c in recipe.initial.items()):
        return None  # made from other counts than this model's: not its history
    now = dict(start)
    for i, step in enumerate(recipe.steps, 1):
        name = step["site"]
        if step["from"] != now[name]:
            raise CheckpointError(f"{where}: step {i} of its recipe takes {name} from {step['from']}, but the steps "
                                  f"before leave it at {now[name]}; the recipe is inconsistent")
        problem = declared[name].violation(step["to"])
        if problem:
            raise CheckpointError(f"{where}: step {i} of its recipe asks {name}={step['to']}: {problem}; "
                                  f"allowed: {declared[name].allowed()}")
        now[name] = step["to"]
    if any(found.get(n, c) != c for n, c in now.items()):
        return None  # the tensors say otherwise: they decide
    return recipe.steps


class _Journal:
    """One `Edit` for a whole load, with the resize events around every change of counts.

    `surgery_before_resize` fires ahead of each resize (plugins only drop caches there);
    `surgery_after_resize` fires once, last, with the net change. A rollback is bracketed by a
    before/after pair of its own, so a plugin's caches always follow the model's counts.
    """

    def __init__(self, model: nn.Module, backbone: str) -> None:
        self.model, self.backbone, self.edit = model, backbone, Edit()
        self.start = counts(model, backbone)
        self.now = dict(self.start)

    def resize(self, requested: Mapping[str, int], init, shrink, seed: int) -> None:
        planned = {n: (self.now[n], c) for n, c in requested.items() if n in self.now and self.now[n] != c}
        _notify(self.model, self.backbone, "surgery_before_resize", planned)
        for name in [n for n in self.now if n in planned]:  # one site at a time: `now` is always true
            changes = _apply(self.model, self.backbone, {name: planned[name][1]}, self.edit, init, shrink, seed)
            self.now.update({n: new for n, (_, new) in changes.items()})

    def net(self) -> dict[str, tuple[int, int]]:
        return {n: (self.start[n], c) for n, c in self.now.items() if c != self.start[n]}

    def commit(self) -> None:
        _notify(self.model, self.backbone, "surgery_after_resize", self.net())
        adopt(self.model, self.edit)  # inside a tokens(...) block, the load is undone with the block

    def rollback(self) -> None:
        undo = {n: (new, old) for n, (old, new) in self.net().items()}
        try:
            _notify(self.model, self.backbone, "surgery_before_resize", undo)
        finally:
            self.edit.rollback()
            self.now = dict(self.start)
        _notify(self.model, self.backbone, "surgery_after_resize", undo)


def _check_keys(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool,
                partial: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(problems, missing, unexpected) of loading `sd` into `model` as it is now, checked before
    anything is copied; `partial`: a file that holds only some of the model's weights (missing
    keys are expected, unexpected ones still refused). Keys of tensors the model ties to a key `sd` has (written once by
    safetensors' save_model) are filled into `sd` from that key."""
    expected = model.state_dict(keep_vars=True)
    tied: dict[tuple, list[str]] = {}
    for key, t in expected.items():
        if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
            ident = (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            tied.setdefault(ident, []).append(key)
    for keys in tied.values():
        source = next((k for k in keys if k in sd), None)
        for key in keys if source is not None else ():
            sd.setdefault(key, sd[source])
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})" for k, v in sd.items()
                  if isinstance(v, torch.Tensor) and isinstance(expected.get(k), torch.Tensor)
                  and v.shape != expected[k].shape]
    problems = []
    if strict and missing and not partial:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if all(k.startswith("module.") for k in unexpected):
            problems.append("the keys start with 'module.' (a DataParallel/DDP checkpoint): strip that prefix")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    return problems, missing, unexpected


def _copy_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], edit: Edit) -> None:
    """Copy `sd` into the model's tensors in place (as torch does), journaling a CPU copy of each
    tensor first, so a failure part-way (even Ctrl-C) can put every value back. The price: host
    memory for one copy of the weights, for the duration of the load."""
    targets = model.state_dict(keep_vars=True)
    saved: set[int] = set()
    for key in sd:
        t = targets.get(key)
        if isinstance(t, torch.Tensor) and id(t) not in saved:
            saved.add(id(t))
            backup = t.detach().to("cpu", copy=True)
            edit.on_undo(lambda t=t, backup=backup: _put_back(t, backup))
    model.load_state_dict(sd, strict=False)  # keys and shapes were checked: nothing is left to refuse


def _put_back(tensor: torch.Tensor, backup: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.copy_(backup)
