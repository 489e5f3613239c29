"""The CLI's promises under stress: exit 0 only when the work is done, only regular files are
replaced, and every refusal is one line (issue 13 items 2-3, issue 14 items 23-24).

Exit statuses and stderr are read as a user sees them; files are checked on disk (kind, bytes,
what `surgery.load` reads back). The broken-pipe case runs the real console entry point in a
subprocess whose stdout reader is already gone.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

import surgery
from surgery import ops
from surgery.cli import main
from surgery.errors import BackendUnavailableError, CheckpointError


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, expected_code: int, err: str, *mentions: str) -> None:
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgery: error: ") and "Traceback" not in err, err
    for text in mentions:
        assert text in lines[0], err


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "vit.safetensors"
    surgery.save(surgery.build("vit_tiny_test"), path)
    return path


# -- item 13.2: exit 0 only when the output file is written -----------------------------------------


def test_resize_writes_its_file_when_stdout_is_a_closed_pipe(tmp_path, ckpt):
    out = tmp_path / "reg2.safetensors"
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -n 0`: the reader is gone before the first line
    try:
        result = subprocess.run([sys.executable, "-m", "surgery", "resize", str(ckpt), "--set", "reg_tokens=2",
                                 "-o", str(out)], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    loaded = surgery.build("vit_tiny_test")
    surgery.load(out, loaded)
    assert surgery.counts(loaded)["reg_tokens"] == 2


# -- item 13.3: -o PATH --force replaces only a regular file -----------------------------------------


def _make(kind: str, path, tmp_path) -> None:
    if kind == "symlink":
        other = tmp_path / "elsewhere.bin"
        other.write_bytes(b"not yours to replace")
        path.symlink_to(other)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")


@pytest.mark.parametrize("kind, test, mentions", [("symlink", stat.S_ISLNK, "symbolic link"),
                                                  ("fifo", stat.S_ISFIFO, "a FIFO"),
                                                  ("device", stat.S_ISCHR, "a character device")])
def test_force_replaces_only_a_regular_file(tmp_path, capsys, ckpt, kind, test, mentions):
    out = tmp_path / "out.safetensors"
    _make(kind, out, tmp_path)
    code, _, err = run_cli(capsys, "resize", str(ckpt), "--set", "reg_tokens=2", "-o", str(out), "--force")
    assert_one_error_line(code, 1, err, mentions, "regular file")
    assert test(os.lstat(out).st_mode)  # still what it was
    if kind == "symlink":
        assert (tmp_path / "elsewhere.bin").read_bytes() == b"not yours to replace"
    with pytest.raises(CheckpointError, match=mentions):  # the library's save refuses it too
        surgery.save(surgery.build("vit_tiny_test"), out)
    assert test(os.lstat(out).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


# -- item 14.23: one error line, never a traceback ---------------------------------------------------


def test_demo_runs_a_model_whose_inputs_and_outputs_are_dicts(capsys):
    code, out, err = run_cli(capsys, "demo", "--model", "imagebind_tiny_test")
    assert code == 0, err
    assert "num_cls_tokens.vision: 1 -> 2" in out and "MISMATCH" not in out and "all checks passed" in out
    assert "surgery.resize(model, **{'num_cls_tokens.vision': 2})" in out  # printed code that runs


def test_demo_refuses_a_meta_model(capsys):
    code, _, err = run_cli(capsys, "demo", "--model", "llama_adapter_v2_7b", "--set", "query_len=12")
    assert_one_error_line(code, 2, err, "meta device")


@pytest.mark.parametrize("model", ["vit_tiny_test", "imagebind_tiny_test"])
def test_profile_refuses_a_model_it_cannot_generate_with(tmp_path, capsys, model):
    code, _, err = run_cli(capsys, "profile", "--model", model, "--out", str(tmp_path / "p"))
    assert_one_error_line(code, 2, err, f"{model!r} is of backbone", "llama_adapter_v2_tiny")
    assert not (tmp_path / "p").exists()


def _toy_plugin(**overrides):
    from toy_backbone import BACKBONE, ToyModel, ToyPlugin

    class Plugin(ToyPlugin):
        @surgery.hookimpl
        def surgery_register_models(self, register):
            register("toy_broken", overrides.get("factory", ToyModel), BACKBONE,
                     example_inputs=lambda m: (torch.randn(2, 5, m.dim),), forward=overrides.get("forward"))

    return Plugin()


def test_a_factory_raising_in_inspect_is_one_line(capsys, fresh_host):
    def factory(**kwargs):
        raise RuntimeError("weights server unreachable")

    assert fresh_host.add_plugin(_toy_plugin(factory=factory), "toy")
    code, _, err = run_cli(capsys, "inspect", "toy_broken")
    assert_one_error_line(code, 1, err, "model 'toy_broken' (plugin 'toy') cannot be built",
                          "RuntimeError: weights server unreachable")


def test_an_unexpected_error_is_one_line_naming_it(capsys, fresh_host, monkeypatch):
    def forward(model, x):
        raise ValueError("forward went wrong")

    assert fresh_host.add_plugin(_toy_plugin(forward=forward), "toy")
    code, _, err = run_cli(capsys, "demo", "--model", "toy_broken", "--set", "prompts=3")
    assert_one_error_line(code, 1, err, "unexpected error", "ValueError: forward went wrong")
    monkeypatch.setenv("SURGERY_DEBUG", "1")  # the traceback on request
    code, _, err = run_cli(capsys, "demo", "--model", "toy_broken", "--set", "prompts=3")
    assert code == 1 and "Traceback" in err


# -- item 14.24: SURGERY_KERNEL=bogus is refused ---------------------------------------------------------


def test_an_unknown_kernel_backend_in_the_environment_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_KERNEL", "bogus")
    with pytest.raises(BackendUnavailableError, match="'bogus' in SURGERY_KERNEL; choose one of: auto, eager"):
        ops.selected_backend()
    for command in ("backends", "models"):
        code, out, err = run_cli(capsys, command)
        assert_one_error_line(code, 1, err, "SURGERY_KERNEL")
        assert out == ""
    monkeypatch.setenv("SURGERY_KERNEL", " eager ")
    assert ops.selected_backend() == "eager"
    monkeypatch.setenv("SURGERY_KERNEL", "")
    assert ops.selected_backend() == "auto"
