"""setup.py finds the CUDA toolkit the way a user expects: from CUDA_HOME, else from the `nvcc` on
PATH through symlinks and wrapper scripts (torch's own guess, nvcc's parent's parent, is wrong
for a wrapper in /usr/local/bin). Fake toolkits in tmp_path: no CUDA needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture(scope="module")
def setup_functions() -> dict:
    source = SETUP.read_text(encoding="utf-8")
    head = source.split("\next_modules, cmdclass = extension_build()")[0]  # the definitions, not the build
    namespace = {"__file__": str(SETUP), "__name__": "setup_under_test"}
    exec(compile(head, str(SETUP), "exec"), namespace)
    return namespace


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
def test_nvcc_wrappers_and_symlinks_lead_to_the_toolkit(setup_functions, tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda-12.4")
    toolkit_of = setup_functions["_toolkit_of_nvcc"]
    exec_wrapper = _script(tmp_path / "w1" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    env_wrapper = _script(tmp_path / "w2" / "nvcc", f'#!/bin/sh\n# a comment\nexec env A=1 "{home}/bin/nvcc" "$@"\n')
    monkeypatch.setenv("FAKE_CUDA_ROOT", str(home))
    var_wrapper = _script(tmp_path / "w3" / "nvcc", '#!/bin/sh\nexec "$FAKE_CUDA_ROOT/bin/nvcc" "$@"\n')
    (tmp_path / "w4").mkdir()
    (tmp_path / "w4" / "nvcc").symlink_to(exec_wrapper)  # a symlink to a wrapper
    for nvcc in (exec_wrapper, env_wrapper, var_wrapper, tmp_path / "w4" / "nvcc", home / "bin" / "nvcc"):
        assert setup_functions["os"].path.samefile(toolkit_of(str(nvcc)), home), nvcc
    # the order: a valid CUDA_HOME, else nvcc on PATH
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'w2'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    found, how = setup_functions["find_cuda_home"]()
    assert Path(found).samefile(home) and "nvcc on PATH" in how
    other = _toolkit(tmp_path / "other")
    monkeypatch.setenv("CUDA_HOME", str(other))
    assert setup_functions["find_cuda_home"]() == (str(other), "$CUDA_HOME")
    assert setup_functions["nvcc_version"](str(other)) == "12.4"


def test_a_wrapper_that_leads_nowhere(setup_functions, tmp_path):
    broken = _script(tmp_path / "w" / "nvcc", "#!/bin/sh\nexec /nonexistent/bin/nvcc \"$@\"\n")
    assert setup_functions["_toolkit_of_nvcc"](str(broken)) is None
