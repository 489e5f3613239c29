"""The plugin host: finds backbone plugins through entry points and loads each one guarded.

Built-in plugins (`surgery_plugins.*`, from the repository's `plugins/` folder) are listed under
the `surgery.backbones` entry-point group exactly as a third-party plugin is; the core imports no
plugin module by name.

Guarded loading: a plugin that raises while importing or registering is recorded as failed
with its error and unregistered, with nothing it registered kept; the others load as usual.
Environment:
  SURGERY_STRICT_PLUGINS=1   a plugin failure raises `PluginError` instead
  SURGERY_PLUGINS=a,b        load only these entry points (set but empty: none)
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy
from torch import nn

from . import hookspecs
from .errors import BackboneError, PluginConflictError, PluginError

ENTRY_POINT_GROUP = "surgery.backbones"
REGISTRATION_HOOKS = ("surgery_register_backbones", "surgery_register_models")


@dataclass
class PluginRecord:
    """What `surgery plugins` shows about one plugin."""

    name: str
    version: str | None
    module: str
    status: str  # "loaded" or "failed"
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Backbone:
    name: str
    detect: Callable[[nn.Module], bool]
    plugin: str
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A model a plugin can build by name."""

    name: str
    factory: Callable[..., nn.Module]
    backbone: str
    plugin: str
    description: str = ""
    example_inputs: Callable[[nn.Module], tuple] | None = None
    forward: Callable[..., Any] | None = None


class PluginHost:
    """One pluggy `PluginManager` plus what the plugins registered (backbones, models)."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.backbones: dict[str, Backbone] = {}
        self.models: dict[str, ModelSpec] = {}
        self.strict = os.environ.get("SURGERY_STRICT_PLUGINS", "") not in ("", "0")

    # -- loading -----------------------------------------------------------------------------

    def load_entry_points(self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
        """Load every plugin of the entry-point group (filtered by SURGERY_PLUGINS)."""
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        only = os.environ.get("SURGERY_PLUGINS")
        wanted = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
        for ep in sorted(entry_points, key=lambda e: e.name):
            if wanted is not None and ep.name not in wanted:
                continue
            version = ep.dist.version if getattr(ep, "dist", None) is not None else None
            try:
                plugin = ep.load()
            except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything on import
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                self._fail(ep.name, version, ep.value, f"import failed: {_describe(exc)}", exc)
                continue
            self.add_plugin(plugin, ep.name, version=version, module=ep.value)

    def add_plugin(self, plugin: Any, name: str, version: str | None = None, module: str | None = None) -> bool:
        """Register one plugin object, guarded and all-or-nothing. Returns whether it loaded."""
        module = module or getattr(plugin, "__name__", type(plugin).__name__)
        if name in self.records and self.records[name].status == "loaded":
            # keep the loaded one's record; the refused one is listed under a distinct key
            self._fail(f"{name} ({module})", version, module, f"a plugin named {name!r} is already loaded "
                       f"(from {self.records[name].module})", None)
            return False
        backbones: dict[str, Backbone] = {}
        models: dict[str, ModelSpec] = {}
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validates hook names and signatures here
            self._fail(name, version, module, f"registration failed: {_describe(exc)}", exc)
            return False
        try:
            self._check_hook_names(plugin, name)
            self._call_own(name, "surgery_register_backbones", self._backbone_registrar(name, backbones))
            self._call_own(name, "surgery_register_models", self._model_registrar(name, backbones, models))
        except Exception as exc:  # noqa: BLE001 - anything a plugin raises makes it fail alone
            self.pm.unregister(name=name)  # nothing it registered is kept
            self._fail(name, version, module, f"registration failed: {_describe(exc)}", exc)
            return False
        self.backbones.update(backbones)
        self.models.update(models)
        self.records[name] = PluginRecord(
            name=name, version=version, module=module, status="loaded",
            hooks=sorted(caller.name for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []),
            backbones=sorted(backbones), models=sorted(models),
        )
        return True

    def _check_hook_names(self, plugin: Any, name: str) -> None:
        """A `surgery_*` function that is not a hook is a typo; say so instead of ignoring it."""
        known = {name for name in vars(hookspecs) if name.startswith("surgery_")}
        for attr in dir(plugin):
            if attr.startswith("surgery_") and callable(getattr(plugin, attr, None)) and attr not in known:
                raise PluginError(f"plugin {name!r} defines {attr}(), which is not a hook; "
                                  f"hooks: {', '.join(sorted(known))}")

    def _call_own(self, name: str, hook: str, register: Callable[..., None]) -> None:
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin_name == name:
                impl.function(register=register)

    def _backbone_registrar(self, plugin: str, staged: dict[str, Backbone]) -> Callable[..., None]:
        def register(name: str, detect: Callable[[nn.Module], bool], description: str = "") -> None:
            owner = self.backbones.get(name) or staged.get(name)
            if owner is not None:
                raise PluginConflictError(
                    f"backbone {name!r} is registered by both plugin {owner.plugin!r} and plugin {plugin!r}")
            if not callable(detect):
                raise PluginError(f"backbone {name!r}: detect must be callable, got {detect!r}")
            staged[name] = Backbone(name, detect, plugin, description)
        return register

    def _model_registrar(self, plugin: str, backbones: dict[str, Backbone],
                         staged: dict[str, ModelSpec]) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., nn.Module], backbone: str, description: str = "",
                     example_inputs: Callable | None = None, forward: Callable | None = None) -> None:
            owner = self.models.get(name) or staged.get(name)
            if owner is not None:
                raise PluginConflictError(
                    f"model {name!r} is registered by both plugin {owner.plugin!r} and plugin {plugin!r}")
            if backbone not in self.backbones and backbone not in backbones:
                raise PluginError(f"model {name!r} names backbone {backbone!r}, which no plugin registered")
            staged[name] = ModelSpec(name, factory, backbone, plugin, description, example_inputs, forward)
        return register

    def _fail(self, name: str, version: str | None, module: str, message: str, exc: BaseException | None) -> None:
        self.records[name] = PluginRecord(name=name, version=version, module=module, status="failed", error=message)
        if self.strict:
            raise PluginError(f"plugin {name!r} ({module}): {message}") from exc

    # -- queries -----------------------------------------------------------------------------

    def identify(self, model: nn.Module) -> str:
        """The backbone name of a built model; an error naming the candidates when none or several match."""
        matches = []
        for backbone in self.backbones.values():
            try:
                if backbone.detect(model):
                    matches.append(backbone)
            except Exception as exc:  # noqa: BLE001
                raise PluginError(f"plugin {backbone.plugin!r}: detecting backbone {backbone.name!r} "
                                  f"raised {_describe(exc)}") from exc
        if len(matches) == 1:
            return matches[0].name
        if not matches:
            known = ", ".join(sorted(self.backbones)) or "none (no plugin loaded; see `surgery plugins`)"
            raise BackboneError(f"no plugin recognises a model of type {type(model).__name__}; "
                                f"known backbones: {known}")
        names = ", ".join(f"{b.name!r} (plugin {b.plugin!r})" for b in matches)
        raise PluginConflictError(f"a model of type {type(model).__name__} is claimed by several backbones: "
                                  f"{names}; pass backbone=... to choose one")

    def model_spec(self, name: str) -> ModelSpec:
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise BackboneError(f"no plugin can build a model named {name!r}; known models: {known}")
        return self.models[name]

    def implementations(self, hook: str) -> list[tuple[str, Callable]]:
        """(plugin name, function) of every implementation of `hook`, in registration order.

        The engine calls these one by one (instead of `pm.hook.<name>(...)`) so that a result or
        an error can be attributed to the plugin that produced it.
        """
        return [(impl.plugin_name, impl.function) for impl in getattr(self.pm.hook, hook).get_hookimpls()]


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


_host: PluginHost | None = None
_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process-wide host, loading the entry points on first use."""
    global _host
    with _lock:
        if _host is None:
            host = PluginHost()
            host.load_entry_points()
            _host = host
        return _host


def reset_host(host: PluginHost | None = None) -> PluginHost | None:
    """Replace the process-wide host (tests; after changing SURGERY_PLUGINS). Returns the old one."""
    global _host
    with _lock:
        old, _host = _host, host
        return old
