"""setup.py, run as pip runs it, with `setuptools.setup` replaced by a recorder.

It finds the CUDA toolkit the way a user expects: from CUDA_HOME, else from the `nvcc` on PATH
through symlinks and wrapper scripts (torch's own guess, nvcc's parent's parent, is wrong for a
wrapper in /usr/local/bin). Fake toolkits in tmp_path: no CUDA needed. And what it hands to
setup() installs what the project ships: every plugin package, entry points that resolve, no
extension when SURGERY_NO_EXTENSION=1.
"""

from __future__ import annotations

import importlib
import os
import runpy
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "setup.py"


@pytest.fixture(scope="module")
def setup_run() -> tuple[dict, dict]:
    """(setup.py's globals, the keyword arguments it passed to setup()), from running the script
    in the repository root with the extension build off (nothing compiled, nothing installed)."""
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setuptools, "setup", lambda **kwargs: calls.append(kwargs))
        mp.setenv("SURGERY_NO_EXTENSION", "1")
        mp.chdir(ROOT)
        namespace = runpy.run_path(str(SETUP), run_name="__main__")
    assert len(calls) == 1, calls
    return namespace, calls[0]


def _toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.99'\n")
    nvcc.chmod(0o755)
    return root


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.skipif(os.name != "posix", reason="shell wrappers and symlinks")
def test_nvcc_wrappers_and_symlinks_lead_to_the_toolkit(setup_run, tmp_path, monkeypatch):
    functions, _ = setup_run
    home = _toolkit(tmp_path / "cuda-12.4")
    toolkit_of = functions["_toolkit_of_nvcc"]
    exec_wrapper = _script(tmp_path / "w1" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    env_wrapper = _script(tmp_path / "w2" / "nvcc", f'#!/bin/sh\n# a comment\nexec env A=1 "{home}/bin/nvcc" "$@"\n')
    monkeypatch.setenv("FAKE_CUDA_ROOT", str(home))
    var_wrapper = _script(tmp_path / "w3" / "nvcc", '#!/bin/sh\nexec "$FAKE_CUDA_ROOT/bin/nvcc" "$@"\n')
    (tmp_path / "w4").mkdir()
    (tmp_path / "w4" / "nvcc").symlink_to(exec_wrapper)  # a symlink to a wrapper
    for nvcc in (exec_wrapper, env_wrapper, var_wrapper, tmp_path / "w4" / "nvcc", home / "bin" / "nvcc"):
        assert os.path.samefile(toolkit_of(str(nvcc)), home), nvcc
    # the order: a valid CUDA_HOME, else nvcc on PATH
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'w2'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    found, how = functions["find_cuda_home"]()
    assert Path(found).samefile(home) and "nvcc on PATH" in how
    other = _toolkit(tmp_path / "other")
    monkeypatch.setenv("CUDA_HOME", str(other))
    assert functions["find_cuda_home"]() == (str(other), "$CUDA_HOME")
    assert functions["nvcc_version"](str(other)) == "12.4"


def test_a_wrapper_that_leads_nowhere(setup_run, tmp_path):
    broken = _script(tmp_path / "w" / "nvcc", "#!/bin/sh\nexec /nonexistent/bin/nvcc \"$@\"\n")
    assert setup_run[0]["_toolkit_of_nvcc"](str(broken)) is None


def test_no_extension_means_a_pure_python_install(setup_run):
    _, kwargs = setup_run
    assert kwargs["ext_modules"] == [] and kwargs["cmdclass"] == {}


def packages_in(folder: Path, name: str) -> set[str]:
    """The dotted names of `folder` and every package folder under it, `folder` installed as `name`."""
    return {".".join((name, *p.parent.relative_to(folder).parts)) for p in folder.rglob("__init__.py")}


def test_every_package_folder_is_installed_and_every_entry_point_resolves(setup_run):
    _, kwargs = setup_run
    assert kwargs["package_dir"]["surgery_plugins"] == "plugins"
    assert packages_in(ROOT / "surgery", "surgery") | packages_in(ROOT / "plugins", "surgery_plugins") \
        <= set(kwargs["packages"])
    for group, entries in kwargs["entry_points"].items():
        for entry in entries:
            name, target = (s.strip() for s in entry.split("=", 1))
            module, _, attr = target.partition(":")
            loaded = importlib.import_module(module)
            if attr:
                assert callable(getattr(loaded, attr)), (group, name)


def test_the_shipped_tokenizer_is_installed_as_package_data(setup_run):
    """The tiny and bench models decode with data/tokenizer.model: a wheel without it could not build them."""
    from surgery_plugins.llama_adapter.tokenizer import SHIPPED_TOKENIZER

    _, kwargs = setup_run
    folder = ROOT / "plugins" / "llama_adapter"
    installed = {p for pattern in kwargs["package_data"]["surgery_plugins.llama_adapter"] for p in folder.glob(pattern)}
    assert SHIPPED_TOKENIZER in installed and folder / "data" / "corpus.txt" in installed
