"""The ImageBind plugin on the test host: through its entry point once installed, explicitly until then."""

import importlib.metadata

import pytest

from surgery.plugins import get_host
from surgery.testing import plugin_host
from surgery_plugins.imagebind import plugin as imagebind_plugin

INSTALLED = any(ep.name == "imagebind" for ep in importlib.metadata.entry_points(group="surgery.backbones"))


@pytest.fixture(autouse=True)
def imagebind_host():
    """A host that knows the `imagebind` backbone: the installed one, or a fresh one with the plugin added."""
    if INSTALLED:
        host = get_host()
        assert host.records["imagebind"].status == "loaded", host.records["imagebind"].error
        yield host
        return
    with plugin_host(("imagebind", imagebind_plugin)) as host:
        yield host
