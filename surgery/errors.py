"""One exception hierarchy for everything token-surgery refuses to do.

Every error names what was wrong and what is allowed. Whenever one of these is raised from
`resize`, `tokens`, `load` or the CLI, the model and every file are exactly as they were.
Catch `SurgeryError` to catch them all.
"""

from __future__ import annotations

import os
import traceback

# What plugin code may raise without taking the host down: any error, and `sys.exit()`.
# KeyboardInterrupt is the user's and still stops everything.
PLUGIN_FAILURES = (Exception, SystemExit)

# Where torch appends the C++ stack to an error's message (TORCH_SHOW_CPP_STACKTRACES=1, some builds)
CPP_BACKTRACE_MARKERS = ("\nC++ CapturedTraceback:", "\nException raised from ")


class SurgeryError(Exception):
    """Base class of every error raised by token-surgery."""


class PluginError(SurgeryError):
    """A backbone plugin failed to import or to register."""


class PluginConflictError(PluginError):
    """Two plugins claim the same backbone, model or site name."""


class PluginUnavailableError(PluginError):
    """A plugin that cannot work in this environment: an optional dependency is not installed.

    Raised by a plugin module while it is imported; `surgery plugins` lists it as "unavailable"
    with the message (which says what to install), and it is not a failure, even with
    SURGERY_STRICT_PLUGINS=1: nothing else is affected."""


class BackboneError(SurgeryError, LookupError):
    """A model no plugin recognises, or a model name no plugin can build."""


class SiteError(SurgeryError, LookupError):
    """A token site the model does not have."""


class CountError(SurgeryError, ValueError):
    """A token count that is not an integer or violates the site's constraints."""


class StrategyError(SurgeryError, ValueError):
    """An unknown init/shrink strategy, or one that cannot work on the tokens at hand."""


class ResizeError(SurgeryError):
    """A step of a resize failed (a plugin's error, out of memory, ...); the model was rolled back."""


class OptimizerError(SurgeryError, TypeError):
    """`optimizer=` given something that is not a torch optimizer (or a list of them)."""


class NestingError(SurgeryError, RuntimeError):
    """`tokens(...)` blocks of one model left out of order (the model is put back consistently first)."""


class OpInputError(SurgeryError, ValueError):
    """Bad input to a fused op (dtype or device mismatch, wrong rank or shape, empty tensor)."""


class BackendUnavailableError(SurgeryError, RuntimeError):
    """A kernel backend was asked for by name (argument or SURGERY_KERNEL) and cannot run here."""


class CheckpointError(SurgeryError):
    """A checkpoint that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code or build arbitrary objects; it was refused before running anything."""


class RecipeError(SurgeryError, ValueError):
    """A recipe that is malformed: not `{"backbone": ..., "steps": [...]}`, or a step with a missing,
    unknown or mistyped field."""


class ModelConfigError(SurgeryError, ValueError):
    """A model configuration or option that cannot be built or used (e.g. an unknown head mode)."""


class ModelInputError(SurgeryError, ValueError):
    """Input a model cannot take (unknown modality, wrong rank, channels, size or dtype); raised
    before anything is computed, so neither the model nor the input is changed."""


class BenchmarkError(SurgeryError):
    """A benchmark that cannot run (bad option, missing profiler support) or whose results would be wrong."""


class DeviceUnavailableError(BenchmarkError):
    """`--device` names a device that does not exist here, or that the benchmark does not support."""


class OutputMismatchError(BenchmarkError):
    """A backend's (or a generation path's) output disagrees with the reference: it is not timed."""


class SweepError(SurgeryError, ValueError):
    """A sweep that cannot run as asked: a bad grid, option, metric name or training choice."""


class MetricDataError(SweepError):
    """Data a metric cannot use (the error says what the metric needs), or a data source that cannot be read."""


def short_repr(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for naming untrusted values in an error message."""
    try:
        text = repr(value)
    except RecursionError:  # a deeply nested value
        return f"<a {type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(exc: BaseException) -> str:
    """`Type: message (at file:line)` of an exception raised by plugin code, for records and errors
    (without the C++ stack torch may append to the message: a one-line error stays one line)."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r}) was called{at}"
    message = str(exc)
    for marker in CPP_BACKTRACE_MARKERS:
        message = message.split(marker, 1)[0]
    return f"{type(exc).__name__}: {message}{at}"


__all__ = [
    "SurgeryError",
    "PluginError",
    "PluginConflictError",
    "BackboneError",
    "SiteError",
    "CountError",
    "StrategyError",
    "ResizeError",
    "OptimizerError",
    "NestingError",
    "OpInputError",
    "BackendUnavailableError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "RecipeError",
    "ModelConfigError",
    "ModelInputError",
    "BenchmarkError",
    "DeviceUnavailableError",
    "OutputMismatchError",
    "SweepError",
    "MetricDataError",
]
