"""Commands on the `surgery` command line, the core's and those plugins contribute.

A plugin adds commands (`surgery generate`) or benchmark kinds (`surgery bench e2e`) from a
*command module* listed under the `surgery.commands` entry-point group, which implements
`surgery_register_commands(register)`:

    # pyproject.toml: the same entry-point name as the plugin's `surgery.backbones` entry
    [project.entry-points."surgery.commands"]
    my_backbone = "my_package.surgery_commands"

    # my_package/surgery_commands.py: imported by every `surgery` call, `--help` included, so it
    # imports only the standard library at module level; `run` imports torch and the plugin.
    import surgery

    def add_arguments(parser):                 # an argparse parser of its own
        parser.add_argument("--model", default="my_tiny")

    def run(args) -> int:                      # the exit status; errors: raise surgery.errors.*
        import my_package.model
        ...
        return 0

    @surgery.hookimpl
    def surgery_register_commands(register):
        register("mycmd", run, help="one line for `surgery --help`", add_arguments=add_arguments)
        register("mykind", run_bench, group="bench", help="...")     # `surgery bench mykind`
        # a group of one's own: register("mygroup", None, help="...") (a kind must be typed), or
        # register("mygroup", run, kinds=True, ...) (typed alone, it runs `run`)

Why a module of its own rather than the backbone plugin: the command line must list every
command without importing torch or a model library (`surgery --help` answers at once).
Loading is guarded as for backbone plugins: a command module that fails to import or register
is recorded with its error (`surgery plugins` shows it) and the other commands work.
SURGERY_PLUGINS=a,b selects command modules by entry-point name as it selects plugins.
A command's `run` raises `surgery.errors.SurgeryError` (or `UsageError` for a bad combination
of options); the CLI prints one line for it, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .errors import PLUGIN_FAILURES, PluginConflictError, PluginError, describe_error

ENTRY_POINT_GROUP = "surgery.commands"
ONLY_ENV = "SURGERY_PLUGINS"
BUILTIN_DISTRIBUTION = "token-surgery"  # entry points of this distribution are the built-in ones


class UsageError(Exception):
    """A malformed command line (exit 2): a missing or contradictory option, said in one line."""


@dataclass(frozen=True)
class Command:
    """One command (or, with `group`, one kind under a group command such as `bench`).

    A group command (`kinds=True`, or `run` None) has kinds: the commands registered with
    `group=` its name, each a sub-command with its own options. Typed without a kind, a group
    runs its own `run` with its own options (`surgery demo`), or asks for a kind when it has none
    (`surgery bench`).
    """

    name: str
    run: Callable[[argparse.Namespace], int] | None
    help: str
    plugin: str
    description: str = ""
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    group: str | None = None
    kinds: bool = False

    @property
    def is_group(self) -> bool:
        return self.kinds or self.run is None

    @property
    def path(self) -> str:
        """How it is typed: `generate`, `bench e2e`."""
        return f"{self.group} {self.name}" if self.group else self.name


@dataclass
class CommandModuleRecord:
    """What `surgery plugins` shows about one command module."""

    name: str
    module: str
    status: str  # "loaded" or "failed"
    error: str | None = None
    commands: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def selected_entry_points(group: str, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None
                          ) -> tuple[list[importlib.metadata.EntryPoint], list[str]]:
    """The entry points of `group` (installed, or those given) that SURGERY_PLUGINS selects (all
    when it is unset), and the names it selects that none of them has."""
    entry_points = list(importlib.metadata.entry_points(group=group) if entry_points is None else entry_points)
    only = os.environ.get(ONLY_ENV)
    if only is None:
        return entry_points, []
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    installed = {ep.name for ep in entry_points}
    return [ep for ep in entry_points if ep.name in wanted], sorted(wanted - installed)


class CommandRegistry:
    """Every command the command line offers, by where it is typed (`generate`, `bench e2e`)."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.commands: dict[str, Command] = {}
        self.records: dict[str, CommandModuleRecord] = {}

    def add_module(self, module: Any, name: str, source: str | None = None) -> bool:
        """Register one command module, guarded and all-or-nothing. Returns whether it loaded."""
        source = source or getattr(module, "__name__", type(module).__name__)
        staged: dict[str, Command] = {}
        if name in self.records:
            self.records[f"{name} ({source})"] = CommandModuleRecord(
                name, source, "failed", f"a command module named {name!r} is already loaded")
            return False
        try:
            self.pm.register(module, name=name)
        except PLUGIN_FAILURES as exc:
            self.records[name] = CommandModuleRecord(name, source, "failed",
                                                     f"registration failed: {describe_error(exc)}")
            return False
        try:
            for impl in self.pm.hook.surgery_register_commands.get_hookimpls():
                if impl.plugin_name == name:
                    impl.function(register=self._registrar(name, staged))
        except PLUGIN_FAILURES as exc:
            self.pm.unregister(name=name)
            self.records[name] = CommandModuleRecord(name, source, "failed",
                                                     f"registration failed: {describe_error(exc)}")
            return False
        self.commands.update(staged)
        self.records[name] = CommandModuleRecord(name, source, "loaded", commands=sorted(staged))
        return True

    def load_entry_points(self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
        """Load the command modules of the entry-point group (or those given), as SURGERY_PLUGINS
        selects them: the built-in ones first (they keep their names), then the others by name."""
        entry_points, _ = selected_entry_points(ENTRY_POINT_GROUP, entry_points)
        for ep in sorted(entry_points, key=lambda e: (not is_builtin(e), e.name)):
            try:
                module = ep.load()
            except PLUGIN_FAILURES as exc:
                self.records[ep.name] = CommandModuleRecord(ep.name, ep.value, "failed",
                                                            f"import failed: {describe_error(exc)}")
                continue
            self.add_module(module, ep.name, ep.value)

    def _registrar(self, plugin: str, staged: dict[str, Command]) -> Callable[..., None]:
        def register(name: str, run: Callable[[argparse.Namespace], int] | None, *, help: str,
                     description: str = "", add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                     group: str | None = None, kinds: bool = False) -> None:
            if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum() or name[0] == "-":
                raise PluginError(f"command name {name!r}: use letters, digits, '-' and '_'")
            if run is not None and not callable(run) or add_arguments is not None and not callable(add_arguments):
                raise PluginError(f"command {name!r}: run and add_arguments must be callable")
            if not isinstance(help, str) or not help:
                raise PluginError(f"command {name!r}: give a one-line help text")
            command = Command(name, run, help, plugin, description, add_arguments, group, bool(kinds))
            if group is not None:
                parent = self.commands.get(group) or staged.get(group)
                if parent is None or not parent.is_group or parent.group is not None:
                    groups = ", ".join(sorted(c.name for c in {**self.commands, **staged}.values() if c.is_group))
                    raise PluginError(f"command {name!r} names group {group!r}, which is not a group command; "
                                      f"groups: {groups or 'none'}")
                if kinds:
                    raise PluginError(f"command {name!r}: a kind of group {group!r} cannot have kinds of its own")
            elif run is None and add_arguments is not None:
                raise PluginError(f"group command {name!r} without a run of its own takes no options (its kinds do)")
            if add_arguments is not None:  # options that argparse refuses fail the registration, not every call
                add_arguments(argparse.ArgumentParser(prog=f"surgery {command.path}", add_help=False))
            owner = self.commands.get(command.path) or staged.get(command.path)
            if owner is not None:
                raise PluginConflictError(f"command 'surgery {command.path}' is registered by both "
                                          f"{owner.plugin!r} and {plugin!r}")
            staged[command.path] = command
        return register

    def kinds(self, group: str) -> list[Command]:
        """The commands registered under a group command, by name."""
        return sorted((c for c in self.commands.values() if c.group == group), key=lambda c: c.name)

    def top_level(self) -> list[Command]:
        """The commands typed directly after `surgery`, group commands included."""
        return [c for c in self.commands.values() if c.group is None]


def add_to_parser(registry: CommandRegistry, subparsers: Any, parser_class: type) -> None:
    """Add every registered command to an argparse sub-parser action, groups with their kinds."""
    for command in registry.top_level():
        p = subparsers.add_parser(command.name, help=command.help, description=command.description or command.help,
                                  allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
        _configure(p, command)  # a group's own options (if it runs without a kind) come before its KIND
        if command.is_group:
            kinds = p.add_subparsers(dest=f"{command.name}_kind", metavar="KIND", parser_class=parser_class)
            for kind in registry.kinds(command.name):
                _add_one(kinds, kind)


def _add_one(subparsers: Any, command: Command) -> None:
    p = subparsers.add_parser(command.name, help=command.help, description=command.description or command.help,
                              allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p, command)


def _configure(parser: argparse.ArgumentParser, command: Command) -> None:
    if command.add_arguments is not None:
        command.add_arguments(parser)
    parser.set_defaults(command_object=command)


def is_builtin(ep: importlib.metadata.EntryPoint) -> bool:
    """Whether an entry point is token-surgery's own (its built-in plugins and command modules)."""
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or ""
    return name.lower().replace("_", "-").replace(".", "-") == BUILTIN_DISTRIBUTION
