"""A model's backbone and token sites as the plugins declare them, and the checks a request passes
before anything changes (`backbone_of`, `sites`, `check_request`).

`sites` asks every plugin about every part of the model and verifies the answers, so it is the costly
call: the engine's transaction reads the sites once per call, and again only after a change that may
have moved them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from . import strategies, verify
from .compose import Part
from .compose import calls as part_calls
from .errors import (BackboneError, CountError, PluginConflictError, PluginError, SiteError, SurgeryError,
                     short_repr)
from .plugins import PLUGIN_FAILURES, describe_error, get_host
from .site import TokenSite, module_paths


def backbone_of(model: nn.Module, backbone: str | None = None) -> str:
    """The backbone name of a built model (from the plugins' detectors). A `backbone` given (to
    choose among several that claim the model) must be a registered one whose detect claims it."""
    host = get_host()
    if backbone is None:
        return host.identify(model)
    if not isinstance(backbone, str) or backbone not in host.backbones:
        raise BackboneError(f"backbone={short_repr(backbone)} is not a registered backbone; known: "
                            f"{', '.join(sorted(host.backbones)) or 'none'}")
    claimed, failure = host.detect(host.backbones[backbone], model)
    if not claimed:
        raise BackboneError(f"backbone={backbone!r} does not recognise a model of type {type(model).__name__}"
                            f"{f' ({failure})' if failure else ''}; leave backbone= out to identify the model")
    return backbone


def sites(model: nn.Module, backbone: str | None = None) -> dict[str, TokenSite]:
    """All token sites of `model`, in application order, from every plugin that declares some."""
    return read_sites(model, backbone_of(model, backbone))


def read_sites(model: nn.Module, backbone: str, known: list[Part] | None = None) -> dict[str, TokenSite]:
    """`sites` of a model whose backbone is known (`known`: its parts, when already read)."""
    found: dict[str, TokenSite] = {}
    for plugin, function, part in part_calls(model, backbone, "surgery_token_sites", known):  # sub-models too
        try:
            declared = function(model=part.model, backbone=part.backbone)
        except SurgeryError:
            raise
        except PLUGIN_FAILURES as exc:
            raise PluginError(f"plugin {plugin!r}: surgery_token_sites raised {describe_error(exc)} "
                              f"for a {part.backbone!r} model") from exc
        for site in verify.declared_sites(plugin, part.backbone, declared):  # a PluginError for garbage
            if site.name in found:
                raise PluginConflictError(f"site {site.name!r} of backbone {backbone!r} is declared by both "
                                          f"plugin {found[site.name].plugin!r} and plugin {plugin!r}")
            site.plugin, site.part = plugin, part.path
            found[site.name] = site
    return found


def counts(model: nn.Module, backbone: str | None = None) -> dict[str, int]:
    """{site name: current count}."""
    return {name: site.count for name, site in sites(model, backbone).items()}


def validate(model: nn.Module, requested: Mapping[str, Any], backbone: str | None = None, *,
             init: str | Mapping[str, str] | None = None,
             shrink: str | Mapping[str, str] | None = None) -> dict[str, TokenSite]:
    """Check names, counts, strategies (`init`/`shrink`, names or {site: name} mappings) and the
    requested sites' declarations before anything changes; returns the sites."""
    declared = sites(model, backbone)
    check_request(declared, requested, module_paths(model), init=init, shrink=shrink)
    return declared


def check_request(declared: Mapping[str, TokenSite], requested: Mapping[str, Any], paths: Mapping[int, str], *,
                  init: str | Mapping[str, str] | None = None, shrink: str | Mapping[str, str] | None = None) -> None:
    """`validate` against sites already read: every requested name a site, every count one it
    allows, every strategy known, every requested site's declaration one the engine can apply."""
    allowed = ", ".join(declared) or "none"
    for name, count in requested.items():
        if name not in declared:
            raise SiteError(f"model has no token site {name!r}; its sites: {allowed}")
        check_count(declared[name], count)
    for option, choice, check in (("init", init, strategies.check_growth), ("shrink", shrink, strategies.check_shrink)):
        if choice is not None and not isinstance(choice, Mapping):
            check(choice)
        for name, strategy in (choice.items() if isinstance(choice, Mapping) else ()):
            if name not in declared:
                raise SiteError(f"{option}= names {name!r}, which is not a token site of the model; "
                                f"its sites: {allowed}")
            check(strategy)
    for name in requested:
        check_declaration(declared[name], declared, paths)


def check_count(site: TokenSite, count: Any) -> None:
    """A CountError naming the site and what it allows, unless `count` is one of its counts."""
    problem = site.violation(count)
    if problem:
        raise CountError(f"site {site.name!r}: {problem}; allowed: {site.allowed()}")


def check_declaration(site: TokenSite, declared: Mapping[str, TokenSite], paths: Mapping[int, str]) -> None:
    """Refuse, with a SiteError naming the site and the tensor, a declaration the engine would apply
    wrongly: an attribute the module does not have, an axis outside the tensor, a block outside it,
    or a tensor of the site's own whose extent along the axis is not its sites' blocks (for one
    site, `start + count`: declared on the wrong axis, the wrong dimension would grow)."""
    for t in site.tensors:
        key = t.key(paths)

        def refuse(problem: str) -> None:
            raise SiteError(f"site {site.name!r} (plugin {site.plugin!r}) declares tensor {key}, {problem}; "
                            f"the model was left as it was")

        if not hasattr(t.module, t.name):
            refuse(f"which its {type(t.module).__name__} does not have")
        value = t.current()
        if value is None and t.template is None:
            refuse("which is None, and the site gives no template for it")
        if not isinstance(t.tensor(), torch.Tensor):
            refuse(f"which is a {type(t.tensor()).__name__}, not a tensor")
        try:
            viewed = t.viewed()
            t.stored_shape(tuple(viewed.shape))
        except (RuntimeError, ValueError) as exc:
            refuse(f"whose view {t.view} does not fit its shape {list(t.tensor().shape)}: {exc}")
        if isinstance(t.axis, bool) or not isinstance(t.axis, int) or not -viewed.dim() <= t.axis < viewed.dim():
            refuse(f"with axis {t.axis!r}, outside its {viewed.dim()} dimensions {list(viewed.shape)}")
        extent = viewed.shape[t.axis]
        if not t.coupled:  # the sites' blocks must tile the axis: [0, a), [a, b), ... up to the extent
            blocks = sorted((u.start, s.count) for s in declared.values() for u in s.tensors
                            if u.module is t.module and u.name == t.name and not u.coupled
                            and u.view == t.view and u.axis % viewed.dim() == t.axis % viewed.dim())
            ends = [0] + [start + count for start, count in blocks]
            if [start for start, _ in blocks] != ends[:-1] or ends[-1] != extent:
                others = f" (with the other sites' blocks there: {ends[-1]})" if len(blocks) > 1 else ""
                refuse(f"along axis {t.axis} its extent is {extent}, not start + count = {t.start} + {site.count}"
                       f"{others}; a tensor of the site's own holds its tokens only (mark rows of a table that "
                       f"holds others too coupled=True)")
        elif t.start < 0 or t.start + site.count > extent:
            refuse(f"with the block [{t.start}, {t.start + site.count}) along axis {t.axis}, "
                   f"outside its extent {extent}")


__all__ = ["backbone_of", "sites", "read_sites", "counts", "validate", "check_request", "check_count",
           "check_declaration"]
