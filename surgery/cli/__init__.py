"""The `surgery` command line: see a model's token sites, and change them in checkpoint files.

Every command, the core's included, comes from a command module through `surgery.commands`; the
core's (builtin.py) registers first, so no plugin takes its names. Errors are one line, `surgery:
error: ...`, exit 2 for a malformed command line and 1 for a refusal, with no traceback
(SURGERY_DEBUG=1 shows it) and no file written or changed. torch is imported only by the commands
that need a model, so `surgery --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from typing import Any, Iterable, Sequence

from surgery.commands import Command, CommandRegistry, UsageError, add_to_parser

from .format import format_sites, site_dicts
from .inspect import open_checkpoint

CORE_COMMANDS = "surgery"  # the name the core's command module is registered under
KERNEL_ENV = "SURGERY_KERNEL"  # `surgery.ops.ENV`, named here so that `--help` needs no torch


class Parser(argparse.ArgumentParser):
    """argparse, but its errors become one line (`UsageError`) rather than usage text and exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def command_registry(entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> CommandRegistry:
    """The core's commands, then those of the installed command modules (`surgery.commands` entry
    points; or of the entry points given)."""
    from . import builtin

    registry = CommandRegistry()
    registry.add_module(builtin, CORE_COMMANDS)
    registry.load_entry_points(entry_points)
    return registry


def build_parser(registry: CommandRegistry | None = None) -> argparse.ArgumentParser:
    """The argument parser (no torch import: `--help` stays instant)."""
    from surgery import __version__

    parser = Parser(prog="surgery", allow_abbrev=False,
                    description="Change how many learned tokens (class, register, prompt tokens...) a model uses.",
                    epilog="Run 'surgery demo' for a tour; 'surgery COMMAND --help' for each command.")
    parser.add_argument("--version", action="version", version=f"token-surgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_to_parser(registry or command_registry(), sub, Parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 refused, 2 bad command line)."""
    try:
        registry = command_registry()
        parser = build_parser(registry)
        try:
            args, extras = parser.parse_known_args(argv)
        except SystemExit as exc:  # --help and --version
            return exc.code if isinstance(exc.code, int) else 0
        command = getattr(args, "command_object", None)
        if command is None:
            names = ", ".join(c.name for c in registry.top_level())
            raise UsageError(f"choose a command: {names} (see 'surgery --help')")
        if extras:
            raise UsageError(_foreign_option(registry, command, extras) or
                             f"unrecognized arguments: {' '.join(extras)} (see 'surgery {command.path} --help')")
        if os.environ.get(KERNEL_ENV, "").strip():  # a typo there is refused before any work
            from surgery import ops

            ops.selected_backend()
        if command.run is None:  # a group command typed without its kind
            kinds = ", ".join(k.name for k in registry.kinds(command.name)) or "none installed"
            raise UsageError(f"choose what 'surgery {command.name}' runs: {kinds} "
                             f"(see 'surgery {command.name} --help')")
        with _ReaderMayLeave():
            return command.run(args)
    except SystemExit as exc:  # plugin or library code calling sys.exit(): never a success
        return _fail(SystemExit(f"sys.exit({exc.code!r}) was called during the command; it was stopped"), 1)
    except UsageError as exc:
        return _fail(exc, 2)
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from surgery.errors import SurgeryError, describe_error

        if isinstance(exc, (SurgeryError, OSError)):
            return _fail(exc, 1)
        # a bug (ours or a library's): still one line, saying so; SURGERY_DEBUG=1 shows the traceback
        return _fail(exc, 1, f"unexpected error, please report it (SURGERY_DEBUG=1 shows the traceback): "
                             f"{describe_error(exc)}")


def _foreign_option(registry: CommandRegistry, command: Command, extras: Sequence[str]) -> str:
    """'--ops is an option of 'surgery bench kernels', not of 'surgery bench e2e'' when an unknown
    option belongs to another kind of the same group (read from the kinds' own parsers); else ''."""
    if command.group is None:
        return ""
    for option in (e.split("=", 1)[0] for e in extras if e.startswith("--")):
        for kind in registry.kinds(command.group):
            if kind.name == command.name or kind.add_arguments is None:
                continue
            parser = argparse.ArgumentParser(add_help=False)
            kind.add_arguments(parser)
            if option in parser._option_string_actions:
                return f"{option} is an option of 'surgery {kind.path}', not of 'surgery {command.path}'"
    return ""


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


__all__ = ["UsageError", "build_parser", "command_registry", "format_sites", "main", "open_checkpoint", "site_dicts"]
