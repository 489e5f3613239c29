"""Reading and writing checkpoint files safely: what `surgery.checkpoint` and plugins' loaders share.

    state_dict, metadata = read_checkpoint("model.safetensors")   # or a .pth/.pt/.bin: weights only
    write_atomically(path, lambda tmp: torch.save(payload, tmp))  # complete at `path`, or not there
    write_folder_atomically(out, model.save_pretrained)           # a folder: the same, renamed whole

Plugins that read released layouts use this rather than `torch.load`, so every file is read the same
safe way (a pickle that would build objects is an `UnsafeCheckpointError`), every broken file gives
the same one-line `CheckpointError`, and every file written appears whole or not at all
(docs/plugins.md, "Checkpoint files in a plugin").
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import CheckpointError, SurgeryError, UnsafeCheckpointError
from .site import module_paths, tensor_key

META_KEY = "surgery"  # token-surgery's own entry in a safetensors file's metadata
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")  # training checkpoints nest the weights
LIST_CAP = 10  # keys named in an error message before "... and N more"


# -- messages --------------------------------------------------------------------------------------


def listing(items: list[str], cap: int = LIST_CAP) -> str:
    """`items` for an error message: the first `cap`, then "... and N more"."""
    shown = ", ".join(items[:cap])
    return shown + (f" ... and {len(items) - cap} more" if len(items) > cap else "")


def natural_key(key: str) -> list:
    """Sort key that orders "layers.2" before "layers.10" (numbers compared as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# -- paths and writing -------------------------------------------------------------------------------


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


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a file next to `path`, flush it to disk, then rename it over `path`; returns `path`.

    Only a regular file or a new name is replaced (`check_output_path`). The temporary file is
    created with mode 0o666 so the umask applies as for any new file, and gets that mode back
    after `write` (safetensors replaces the file with one of mode 0600). Its name is short (a long
    target name would push it past the file system's 255 bytes). On any failure it is removed and
    `path` (if it existed) is untouched; an error that is not a SurgeryError becomes a CheckpointError.
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
    return path


def check_output_folder(path: str | os.PathLike, marker: str | None = None) -> Path:
    """Refuse to write a folder anywhere but a new name in an existing folder, or over a folder that
    holds only regular files (a model folder; with `marker`, one holding that file: what the writer
    writes, such as a Hugging Face folder's config.json). A folder of folders (a home, a project),
    a symlink or a file is never replaced by a folder."""
    path = as_path(path)
    if not os.path.lexists(path):
        if not path.parent.is_dir():
            raise CheckpointError(f"cannot write folder {path}: folder {path.parent} does not exist")
        return path
    if path.is_symlink() or not path.is_dir():
        kind = "a symbolic link" if path.is_symlink() else "not a folder"
        raise CheckpointError(f"cannot write folder {path}: it is {kind}; a folder replaces only a folder")
    try:
        entries = list(os.scandir(path))
    except OSError as exc:
        raise CheckpointError(f"cannot write folder {path}: {exc}") from exc
    others = sorted(e.name for e in entries if not e.is_file(follow_symlinks=False))
    if others:
        raise CheckpointError(f"cannot replace folder {path}: it holds {listing(others)}, which "
                              f"{'is' if len(others) == 1 else 'are'} not regular files; only a folder of "
                              f"files (a model folder) is replaced")
    if marker is not None and marker not in {e.name for e in entries}:
        raise CheckpointError(f"cannot replace folder {path}: it has no {marker}, so it is not a folder this "
                              f"writer wrote; remove it or choose another name")
    return path


def write_folder_atomically(path: str | os.PathLike, write: Callable[[Path], None],
                            marker: str | None = None) -> Path:
    """`write(tmp)` a folder next to `path`, flush its files to disk, then rename it to `path`;
    returns `path`.

    An existing `path` must be one `check_output_folder` allows replacing; it is moved aside,
    the new folder renamed into place, then the old one removed (moved back if the rename fails).
    On any failure the temporary folder is removed and `path` is untouched; an error that is not
    a SurgeryError becomes a CheckpointError.
    """
    path = check_output_folder(path, marker)
    tmp = path.with_name(f".surgery-{uuid.uuid4().hex[:16]}.tmp")
    try:
        os.mkdir(tmp)
        write(tmp)
        for entry in os.scandir(tmp):
            if entry.is_file(follow_symlinks=False):
                with open(entry.path, "rb+") as f:
                    os.fsync(f.fileno())
        check_output_folder(path, marker)  # still what it was when the writing began
        if os.path.lexists(path):
            old = path.with_name(f".surgery-{uuid.uuid4().hex[:16]}.old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, SurgeryError):  # disk full, permissions, ...
            raise CheckpointError(f"cannot write folder {path}: {type(exc).__name__}: {exc}") from exc
        raise
    return path


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
        state_dict, metadata = _unwrap(read_torch(path), path), {}
    else:
        raise CheckpointError(f"checkpoint {path} is neither safetensors nor a torch checkpoint "
                              f"(it starts with bytes {head[:8]!r}); the file may be corrupt")
    return tensors_only(state_dict, f"checkpoint {path}"), metadata


def read_torch(path: str | os.PathLike) -> Any:
    """What `torch.save` wrote to `path` (tensors in plain containers), read with `weights_only=True`
    onto the CPU. A pickle of anything else is an `UnsafeCheckpointError` (nothing in it ran); a
    truncated or corrupt file a `CheckpointError`."""
    path = as_path(path)
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


def tensors_only(state_dict: Mapping, where: str) -> dict[str, torch.Tensor]:
    """A shallow copy (the caller's dict is never changed), refusing entries that are not tensors
    (`where` names the source in the CheckpointError)."""
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state_dict.items()
           if not isinstance(k, str) or not (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))]
    if bad:
        raise CheckpointError(f"{where} has entries that are not tensors: {listing(bad)}")
    return dict(state_dict)


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


__all__ = ["META_KEY", "LIST_CAP", "listing", "natural_key", "as_path", "check_output_path", "write_atomically",
           "check_output_folder", "write_folder_atomically", "read_checkpoint", "read_torch", "tensors_only",
           "module_paths", "tensor_key"]
