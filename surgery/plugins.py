"""The plugin host: finds backbone plugins through entry points and loads each one guarded.

Built-in plugins are listed under `surgery.backbones` exactly as a third-party plugin is (the core
imports none by name) and load first, so a newcomer can neither take a built-in's name nor make it
fail. A plugin that raises while loading is recorded as failed with nothing it registered kept; one
missing an optional dependency is "unavailable"; one whose `detect` raises is "degraded".
SURGERY_STRICT_PLUGINS and SURGERY_PLUGINS: docs/plugins.md, "Loading".
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy
from torch import nn

from . import hookspecs
from .commands import ONLY_ENV, is_builtin, selected_entry_points
from .errors import (
    PLUGIN_FAILURES,
    BackboneError,
    PluginConflictError,
    PluginError,
    PluginUnavailableError,
    SurgeryError,
    describe_error,
)

ENTRY_POINT_GROUP = "surgery.backbones"
RESOLVE_HOOK = "surgery_resolve_model"
STRICT_ENV = "SURGERY_STRICT_PLUGINS"
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
MAX_PROBLEMS = 8  # run-time errors kept per plugin record (the first ones; later ones are alike)


@dataclass
class PluginRecord:
    """What `surgery plugins` shows about one plugin."""

    name: str
    version: str | None
    module: str
    # "loaded"; "degraded" (loaded, but its code failed since: `problems`, also in `error`);
    # "failed" (import or registration); "missing" (named by SURGERY_PLUGINS, not installed);
    # "unavailable" (an optional dependency is not installed: `error` says what to install)
    status: str
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    builtin: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Registered with the host (its hooks are called)."""
        return self.status in ("loaded", "degraded")

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
    # factory keywords a checkpoint's metadata may set (`surgery.model_source`); any other is refused
    safe_kwargs: frozenset[str] = frozenset()
    # () -> path of the model's released weights on this machine (`--pretrained`); never downloads
    released_weights: Callable[[], Any] | None = None


@dataclass(frozen=True)
class MetricSpec:
    """A metric a plugin registered (`surgery_register_metrics`), run by `surgery.sweep.metrics`."""

    name: str
    compute: Callable[..., Any]
    plugin: str
    values: tuple[str, ...]
    backbones: tuple[str, ...] | None = None  # None: any backbone
    needs: str = ""
    accepts: Callable[..., str | None] | None = None
    loss: Callable[..., Any] | None = None
    higher_is_better: bool = True
    description: str = ""


class PluginHost:
    """One pluggy `PluginManager` plus what the plugins registered (backbones, models)."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.backbones: dict[str, Backbone] = {}
        self.models: dict[str, ModelSpec] = {}
        self.resolved: dict[str, ModelSpec] = {}  # names plugins resolved (`surgery_resolve_model`), kept
        self.metrics: dict[str, MetricSpec] = {}
        self.strict = strict_from_env()

    # -- loading -----------------------------------------------------------------------------

    def load_entry_points(self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
        """Load the plugins of the entry-point group (filtered by SURGERY_PLUGINS): the built-in
        ones first, then the others, each sorted by name."""
        given = None if entry_points is None else list(entry_points)
        entry_points, missing = selected_entry_points(ENTRY_POINT_GROUP, given)
        installed = ", ".join(sorted(ep.name for ep in (given if given is not None else
                                                         importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))))
        for name in missing:
            self._fail(name, None, "", f"{ONLY_ENV} names {name!r}, but no installed plugin has that entry "
                       f"point; installed: {installed or 'none'}", None, status="missing")
        for ep in sorted(entry_points, key=lambda e: (not is_builtin(e), e.name)):
            version = ep.dist.version if getattr(ep, "dist", None) is not None else None
            try:
                plugin = ep.load()
            except PluginUnavailableError as exc:  # an optional dependency missing: listed, not a failure
                self._fail(ep.name, version, ep.value, str(exc), exc, status="unavailable")
                continue
            except PLUGIN_FAILURES as exc:
                self._fail(ep.name, version, ep.value, f"import failed: {describe_error(exc)}", exc)
                continue
            self.add_plugin(plugin, ep.name, version=version, module=ep.value, builtin=is_builtin(ep))

    def add_plugin(self, plugin: Any, name: str, version: str | None = None, module: str | None = None,
                   builtin: bool = False) -> bool:
        """Register one plugin object, guarded and all-or-nothing. Returns whether it loaded."""
        module = module or getattr(plugin, "__name__", type(plugin).__name__)
        if name in self.records and self.records[name].active:
            # keep the loaded one's record; the refused one is listed under a distinct key
            self._fail(f"{name} ({module})", version, module, f"a plugin named {name!r} is already loaded "
                       f"(from {self.records[name].module})", None)
            return False
        backbones: dict[str, Backbone] = {}
        models: dict[str, ModelSpec] = {}
        metrics: dict[str, MetricSpec] = {}
        try:
            self.pm.register(plugin, name=name)
        except PLUGIN_FAILURES as exc:  # pluggy validates hook names and signatures here
            self._fail(name, version, module, f"registration failed: {describe_error(exc)}", exc)
            return False
        try:
            self._check_hook_names(plugin, name)
            self._call_own(name, "surgery_register_backbones", self._backbone_registrar(name, backbones))
            self._call_own(name, "surgery_register_models", self._model_registrar(name, backbones, models))
            self._call_own(name, "surgery_register_metrics", self._metric_registrar(name, metrics))
        except PLUGIN_FAILURES as exc:  # anything a plugin raises makes it fail alone
            self.pm.unregister(name=name)  # nothing it registered is kept
            self._fail(name, version, module, f"registration failed: {describe_error(exc)}", exc)
            return False
        self.backbones.update(backbones)
        self.models.update(models)
        self.metrics.update(metrics)
        self.records[name] = PluginRecord(
            name=name, version=version, module=module, status="loaded", builtin=builtin,
            hooks=sorted(caller.name for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []),
            backbones=sorted(backbones), models=sorted(models), metrics=sorted(metrics),
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
                     example_inputs: Callable | None = None, forward: Callable | None = None,
                     safe_kwargs: Iterable[str] = (), released_weights: Callable[[], Any] | None = None) -> None:
            owner = self.models.get(name) or staged.get(name)
            if owner is not None:
                raise PluginConflictError(
                    f"model {name!r} is registered by both plugin {owner.plugin!r} and plugin {plugin!r}")
            if backbone not in self.backbones and backbone not in backbones:
                raise PluginError(f"model {name!r} names backbone {backbone!r}, which no plugin registered")
            safe = (safe_kwargs,) if isinstance(safe_kwargs, str) else tuple(safe_kwargs)
            if not all(isinstance(k, str) and k.isidentifier() for k in safe):
                raise PluginError(f"model {name!r}: safe_kwargs must be keyword names, got {safe_kwargs!r}")
            if not callable(factory) or not (released_weights is None or callable(released_weights)):
                raise PluginError(f"model {name!r}: factory and released_weights must be callable")
            staged[name] = ModelSpec(name, factory, backbone, plugin, description, example_inputs, forward,
                                     frozenset(safe), released_weights)
        return register

    def _metric_registrar(self, plugin: str, staged: dict[str, MetricSpec]) -> Callable[..., None]:
        from .sweep.metrics import CORE_METRICS  # the core's own names, which no plugin may take

        def register(name: str, compute: Callable[..., Any], *, values: Iterable[str],
                     backbones: Iterable[str] | None = None, needs: str = "",
                     accepts: Callable[..., str | None] | None = None, loss: Callable[..., Any] | None = None,
                     higher_is_better: bool = True, description: str = "") -> None:
            owner = self.metrics.get(name) or staged.get(name)
            if owner is not None or name in CORE_METRICS:
                raise PluginConflictError(f"metric {name!r} is registered by both plugin "
                                          f"{owner.plugin if owner else 'surgery (core)'!r} and plugin {plugin!r}")
            values = tuple(values) if not isinstance(values, str) else (values,)
            if not isinstance(name, str) or not name or not callable(compute) or not values:
                raise PluginError(f"metric {name!r}: give a name, a callable compute and the names of its values")
            for hook in (accepts, loss):
                if hook is not None and not callable(hook):
                    raise PluginError(f"metric {name!r}: accepts and loss must be callable, got {hook!r}")
            staged[name] = MetricSpec(name, compute, plugin, values,
                                      None if backbones is None else tuple(backbones), needs, accepts, loss,
                                      bool(higher_is_better), description)
        return register

    def _fail(self, name: str, version: str | None, module: str, message: str, exc: BaseException | None,
              status: str = "failed") -> None:
        self.records[name] = PluginRecord(name=name, version=version, module=module, status=status, error=message)
        if self.strict and status != "unavailable":
            raise PluginError(f"plugin {name!r} ({module or 'not installed'}): {message}") from exc

    def record_problem(self, plugin: str, message: str) -> None:
        """A loaded plugin's code failed at run time: its record becomes "degraded" and says why."""
        record = self.records.get(plugin)
        if record is None or not record.active:  # registered on `pm` directly (tests): nothing to show
            return
        if message not in record.problems and len(record.problems) < MAX_PROBLEMS:
            record.problems.append(message)
        record.status, record.error = "degraded", "; ".join(record.problems)

    # -- queries -----------------------------------------------------------------------------

    def detect(self, backbone: Backbone, model: nn.Module) -> tuple[bool, str | None]:
        """(whether `backbone` claims `model`, the error when its detect raised). A raising detect
        claims nothing and is recorded against its plugin (strict mode: raises PluginError)."""
        try:
            return bool(backbone.detect(model)), None
        except PLUGIN_FAILURES as exc:
            message = (f"detect of backbone {backbone.name!r} raised {describe_error(exc)} "
                       f"on a model of type {type(model).__name__}")
            self.record_problem(backbone.plugin, message)
            if self.strict:
                raise PluginError(f"plugin {backbone.plugin!r}: {message}") from exc
            return False, f"{message} (plugin {backbone.plugin!r})"

    def check_detectors(self) -> None:
        """Run every backbone's detect once on a bare module, a model of no backbone, so that a detect
        failing for any model (a missing optional import) shows on its record before a model is needed."""
        probe = nn.Module()
        for backbone in list(self.backbones.values()):
            self.detect(backbone, probe)

    def identify(self, model: nn.Module) -> str:
        """The backbone name of a built model; an error naming the candidates when none or several match.
        A backbone whose detect raises is left out (and recorded against its plugin)."""
        matches, failures = [], []
        for backbone in list(self.backbones.values()):
            claimed, failure = self.detect(backbone, model)
            if claimed:
                matches.append(backbone)
            elif failure:
                failures.append(failure)
        if len(matches) == 1:
            return matches[0].name
        if not matches:
            known = ", ".join(sorted(self.backbones)) or "none (no plugin loaded; see `surgery plugins`)"
            failed = f"; detectors that failed: {'; '.join(failures)}" if failures else ""
            raise BackboneError(f"no plugin recognises a model of type {type(model).__name__}; "
                                f"known backbones: {known}{failed}")
        names = ", ".join(f"{b.name!r} (plugin {b.plugin!r})" for b in matches)
        raise PluginConflictError(f"a model of type {type(model).__name__} is claimed by several backbones: "
                                  f"{names}; pass backbone=... to choose one")

    def model_spec(self, name: str) -> ModelSpec:
        """The model `name`: registered, or resolved by a plugin; a `BackboneError` listing the
        registered models when no plugin knows it (or the error of a plugin that knows the name
        but cannot build it)."""
        spec = self.resolve_model(name)
        if spec is None:
            known = ", ".join(sorted(self.models)) or "none"
            asked = ", ".join(plugin for plugin, _ in self.implementations(RESOLVE_HOOK))
            resolvers = f"; no plugin resolves it either (asked: {asked})" if asked else ""
            raise BackboneError(f"no plugin can build a model named {name!r}; known models: {known}{resolvers}")
        return spec

    def resolve_model(self, name: str) -> ModelSpec | None:
        """The registered model `name`, else the one a plugin resolves it to (`surgery_resolve_model`,
        asked once per name), else None. A plugin that knows the name but cannot build it raises a
        `SurgeryError`, raised here when no other plugin resolves the name."""
        if not isinstance(name, str) or not name:
            raise BackboneError(f"a model name must be a non-empty string, got {name!r}")
        spec = self.models.get(name) or self.resolved.get(name)
        if spec is not None:
            return spec
        claims: list[ModelSpec] = []
        refusals: list[SurgeryError] = []
        for plugin, function in self.implementations(RESOLVE_HOOK):
            staged: dict[str, ModelSpec] = {}
            try:
                function(name=name, register=self._model_registrar(plugin, {}, staged))
            except SurgeryError as exc:  # the plugin knows the name and says why it cannot build it
                refusals.append(exc)
                continue
            except PLUGIN_FAILURES as exc:
                self.record_problem(plugin, f"{RESOLVE_HOOK} raised {describe_error(exc)}")
                raise PluginError(f"plugin {plugin!r}: {RESOLVE_HOOK} raised {describe_error(exc)} resolving "
                                  f"model name {name!r}") from exc
            if set(staged) - {name} or len(staged) > 1:
                raise PluginError(f"plugin {plugin!r}: {RESOLVE_HOOK} asked for {name!r} registered "
                                  f"{', '.join(map(repr, staged))}; it may register only the name asked for")
            claims.extend(staged.values())
        if len(claims) > 1:
            raise PluginConflictError(f"model name {name!r} is resolved by several plugins: "
                                      f"{', '.join(repr(c.plugin) for c in claims)}")
        if not claims:
            if refusals:
                raise refusals[0]
            return None
        self.resolved[name] = claims[0]
        return claims[0]

    def implementations(self, hook: str) -> list[tuple[str, Callable]]:
        """(plugin name, function) of every implementation of `hook`, in registration order
        (pluggy calls them in the reverse order: the last registered first).

        The engine calls these one by one (instead of `pm.hook.<name>(...)`) so that a result or
        an error can be attributed to the plugin that produced it.
        """
        return [(impl.plugin_name, impl.function) for impl in getattr(self.pm.hook, hook).get_hookimpls()]


def strict_from_env() -> bool:
    """SURGERY_STRICT_PLUGINS as a yes/no value; anything else is refused rather than guessed."""
    raw = os.environ.get(STRICT_ENV, "")
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise PluginError(f"{STRICT_ENV}={raw!r} is not a yes/no value; use 1, true, yes or on (a failing plugin "
                      f"is fatal) or 0, false, no, off or empty (it is recorded)")


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
