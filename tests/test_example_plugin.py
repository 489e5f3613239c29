"""The example third-party plugin (examples/surgery-toy-plugin), installed the way a user would.

It goes into a throwaway virtual environment that sees this one's packages (token-surgery, torch,
timm, pytest) through `--system-site-packages`, so the install is offline and takes seconds, and
nothing lands in the environment running these tests. Then: the plugin host finds it through its
entry point (directly, and through `surgery plugins --json`), and the example's own test suite,
built on the conformance kit, passes there; installed with its counter left out, it fails the
kit's fresh-build comparison (and only that check).
"""

import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path
from typing import Callable

import pytest

from surgery.testing import ConformanceSuite

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "surgery-toy-plugin"
DIST, ENTRY_POINT, MODULE = "surgery-toy-plugin", "prompt_tuned", "surgery_toy_plugin.plugin"

RECORDS = "import json, surgery; print(json.dumps([r.to_dict() for r in surgery.get_host().records.values()]))"


def _env() -> dict:
    """This environment, minus what would filter or change plugin loading; no bytecode written."""
    env = {k: v for k, v in os.environ.items() if k not in ("SURGERY_PLUGINS", "SURGERY_STRICT_PLUGINS", "PYTHONPATH")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(*command, cwd=REPO, timeout=300) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, command))} exited {result.returncode}\n"
                                    f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result.stdout


def _installed_here() -> bool:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _install(root: Path, edit: Callable[[Path], None] | None = None) -> Path:
    """A venv under `root` with the example installed from a copy (a build writes build/ and
    *.egg-info), changed by `edit` first; its python."""
    assert not _installed_here(), f"{DIST} is installed in the test environment itself; uninstall it"
    source = root / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    if edit is not None:
        edit(source)
    venv.EnvBuilder(system_site_packages=True, symlinks=True, with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    _see_this_environment(python)
    # this environment's pip, run by the venv's interpreter, installs into the venv
    _run(python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", source)
    return python


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """A venv with the example installed."""
    yield _install(tmp_path_factory.mktemp("toy-plugin"))
    assert not _installed_here(), f"installing into the venv leaked {DIST} into the test environment"


def _see_this_environment(python: Path) -> None:
    """`--system-site-packages` shows the *base* interpreter's packages; when these tests run in a
    virtual environment themselves, its packages live elsewhere, so a .pth file adds its
    site-packages (processing their .pth files too: token-surgery may be an editable install)."""
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages() if os.path.isdir(d)]
    Path(purelib, "_test_environment.pth").write_text("\n".join(lines) + "\n")


def _check_records(records: list) -> None:
    by_name = {r["name"]: r for r in records}
    assert ENTRY_POINT in by_name, f"the example plugin was not found; records: {list(by_name)}"
    toy = by_name[ENTRY_POINT]
    assert toy["status"] == "loaded", toy["error"]
    assert (toy["version"], toy["module"], toy["error"]) == ("0.1.0", MODULE, None)
    assert toy["backbones"] == ["prompt_tuned"] and toy["models"] == ["prompt_tuned_tiny"]
    assert toy["hooks"] == ["surgery_register_backbones", "surgery_register_models", "surgery_token_sites"]
    assert by_name["timm_vit"]["status"] == "loaded"  # the built-in plugin loads beside it


def test_example_is_listed_by_the_plugin_host(venv_python):
    _check_records(json.loads(_run(venv_python, "-c", RECORDS)))


def test_example_is_listed_by_the_cli(venv_python):
    _check_records(json.loads(_run(venv_python, "-m", "surgery", "plugins", "--json")))


def test_example_builds_and_resizes_in_the_venv(venv_python):
    script = ("import surgery; m = surgery.build('prompt_tuned_tiny'); surgery.resize(m, prompts=7); "
              "print(surgery.backbone_of(m), surgery.counts(m), m.num_prompts)")
    assert _run(venv_python, "-c", script).split() == ["prompt_tuned", "{'prompts':", "7}", "7"]


def test_example_own_tests_pass_in_the_venv(venv_python):
    out = _run(venv_python, "-m", "pytest", EXAMPLE / "tests", "-q", "-p", "no:cacheprovider")
    summary = out.strip().splitlines()[-1]  # "24 passed in 4.79s"
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in .*", summary), out
    checks = len([name for name in dir(ConformanceSuite) if name.startswith("test_")])
    assert int(summary.split()[0]) == 2 * checks + 2, out  # two suites and two plain tests


COUNTER = '            counters=[Counter(model, "num_prompts")],\n'


def _forget_the_counter(source: Path) -> None:
    """The mistake the kit exists for: the site declared without its `num_prompts` counter."""
    plugin = source / "src" / "surgery_toy_plugin" / "plugin.py"
    text = plugin.read_text()
    assert text.count(COUNTER) == 1, "the example's counter declaration moved; update COUNTER"
    plugin.write_text(text.replace(COUNTER, ""))


def test_example_without_its_counter_fails_the_kit(tmp_path):
    """Growing the prompts without `num_prompts` still changes the outputs, and the model round-trips
    and restores; the fresh build at the target count (the factory takes `prompts=`) gives it away."""
    python = _install(tmp_path, _forget_the_counter)
    suite = tmp_path / "source" / "tests" / "test_conformance.py"
    result = subprocess.run([str(python), "-m", "pytest", f"{suite}::TestPromptTunedTiny", "-q", "-rf",
                             "-p", "no:cacheprovider"], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    out = result.stdout
    checks = len([name for name in dir(ConformanceSuite) if name.startswith("test_")])
    assert result.returncode == 1 and f"1 failed, {checks - 1} passed" in out, out
    assert re.search(r"^FAILED \S+::TestPromptTunedTiny::test_matches_fresh_build\b", out, flags=re.M), out
    assert "AssertionError: inside tokens(prompts=0): the resized model is not the fresh build" in out, out
    assert "attribute <model>.num_prompts still holds 4, as before the resize; a fresh build at these counts " \
           "holds 0" in out, out


def test_nothing_of_the_example_is_visible_here():
    assert not _installed_here()
    names = {ep.name for ep in importlib.metadata.entry_points(group="surgery.backbones")}
    assert ENTRY_POINT not in names and "surgery_toy_plugin" not in sys.modules
