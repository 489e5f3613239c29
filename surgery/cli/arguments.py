"""Options several commands share, and the argparse types that check them before any work.

`--set SITE=N` (resize, demo), `--json`, `--allow-large`, and comma-separated lists of names or
positive integers (the benchmarks'). Public for the command modules of plugins.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from surgery.commands import UsageError


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


def requested_counts(pairs: Sequence[tuple[str, int]] | None) -> dict[str, int]:
    """The `--set` pairs as {site: count}; a site given twice with two counts is a usage error."""
    requested: dict[str, int] = {}
    for name, count in pairs or ():
        if name in requested and requested[name] != count:
            raise UsageError(f"--set {name} given twice ({requested[name]} and {count})")
        requested[name] = count
    return requested


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers, e.g. `1,10,64`."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated list of names, e.g. `float32,bfloat16`."""
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_allow_large_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-large", action="store_true",
                   help="build the model a checkpoint's metadata names even when it holds more elements than "
                        "the file's tensors (plus 2**24): only for files you trust")


def add_pretrained_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained", action="store_true",
                   help="load the model's released weights from where its plugin finds them on this machine "
                        "(timm models: the Hugging Face cache, HF_HUB_CACHE / HF_HOME); nothing is downloaded")


def add_set_option(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--set", action="append", type=site_count, metavar="SITE=N", required=required,
                   help="token count of a site, e.g. reg_tokens=4 (repeat for several sites)")
