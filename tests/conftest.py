import pytest

from surgery.plugins import PluginHost, get_host, reset_host


@pytest.fixture
def toy_host():
    """A host with only the toy plugin (tests/toy_backbone.py); the real one is put back after."""
    from toy_backbone import ToyPlugin

    host = PluginHost()
    plugin = ToyPlugin()
    assert host.add_plugin(plugin, "toy")
    old = reset_host(host)
    try:
        yield plugin
    finally:
        reset_host(old)


@pytest.fixture
def fresh_host():
    """An empty host (no entry points loaded) installed for the test."""
    host = PluginHost()
    old = reset_host(host)
    try:
        yield host
    finally:
        reset_host(old)


@pytest.fixture(scope="session", autouse=True)
def _load_real_plugins_once():
    get_host()
