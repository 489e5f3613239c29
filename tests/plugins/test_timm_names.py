"""Any timm ViT by its timm name, from a local file or the Hugging Face cache (issue 19 item 4).

`surgery inspect timm/<name>` and `surgery resize FILE --model <timm name>` end to end on timm's
own small test models (`test_vit`: class token; `test_vit2`: one register, no class token), with
timm itself as the reference: the models timm builds with the same names and counts, and files
timm's models wrote. Released weights come from a Hugging Face cache folder laid out as
huggingface_hub lays it, in a temporary folder, while an audit hook refuses (and records) every
network connection. Every refusal: one `surgery: error:` line, non-zero exit, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import textwrap

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.cli import main

from readme_blocks import bash_lines

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a snapshot's commit hash, as the hub gives one

# -- no network: every connection refused and recorded ------------------------------------------------

_attempts: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _attempts is not None and event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
        _attempts.append(f"{event} {args!r}")
        raise OSError(f"network disabled by the test ({event})")


sys.addaudithook(_audit)  # cannot be removed; it acts only inside the `no_network` fixture


@pytest.fixture
def no_network():
    global _attempts
    _attempts = seen = []
    try:
        yield seen
    finally:
        _attempts = None


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache folder, where huggingface_hub looks for this test."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_file(cache, repo: str, filename: str, write) -> None:
    """Put a file in `cache` as huggingface_hub does: the bytes in blobs/<sha256>, refs/main naming the
    snapshot's commit, snapshots/<commit>/<filename> a relative link to the blob."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    staging = folder / "download.tmp"
    write(staging)
    blob = folder / "blobs" / hashlib.sha256(staging.read_bytes()).hexdigest()
    blob.parent.mkdir(exist_ok=True)
    staging.rename(blob)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))


def timm_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, *mentions: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgery: error: ") and "Traceback" not in err, err
    for text in mentions:
        assert text in lines[0], err


# -- models by name ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, arch", [("timm/test_vit", "test_vit"), ("test_vit2", "test_vit2"),
                                        ("timm/test_vit.r160_in1k", "test_vit")])
def test_inspect_a_timm_name_shows_the_model_timm_builds(capsys, no_network, name, arch):
    code, out, err = cli(capsys, "inspect", name, "--json")
    assert code == 0, err
    info = json.loads(out)
    reference = timm_model(arch)
    reg = reference.reg_token.shape[1] if reference.reg_token is not None else 0
    cls = reference.cls_token.shape[1] if reference.cls_token is not None else 0
    assert (info["kind"], info["backbone"], info["weights"]) == ("model", "timm_vit", None)
    assert info["counts"] == {"class_token": cls, "reg_tokens": reg}
    built = surgery.build(name).state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert no_network == []


def test_resize_a_timm_file_by_its_plain_timm_name(tmp_path, capsys, no_network):
    """The issue's `surgery resize deit3.pth --model deit3_small_patch16_224`, on timm's small test ViT."""
    source = timm_model("test_vit2")  # one register, no class token
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "vit_reg3.safetensors"
    code, text, err = cli(capsys, "resize", str(tmp_path / "vit.pth"), "--model", "test_vit2",
                          "--set", "reg_tokens=3", "-o", str(out))
    assert code == 0, err
    assert "test_vit2 (named by --model)" in text
    written, before = load_file(str(out)), source.state_dict()
    reference = timm_model("test_vit2", reg_tokens=3)  # what timm builds with 3 registers
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(written)  # strict: timm takes the file as its own
    assert torch.equal(written["reg_token"][:, :1], before["reg_token"])  # the old register kept
    assert torch.equal(written["pos_embed"][:, :1], before["pos_embed"][:, :1])  # its position row
    assert torch.equal(written["pos_embed"][:, 3:], before["pos_embed"][:, 1:])  # the patches' rows
    assert all(torch.equal(written[k], v) for k, v in before.items() if k not in ("reg_token", "pos_embed"))
    # the file's metadata names the resolved model: inspect rebuilds it without --model
    code, text, err = cli(capsys, "inspect", str(out))
    assert code == 0, err
    assert "test_vit2 (named by checkpoint metadata)" in text and "reg_tokens=3" in text
    # and through the timm/ namespace, the same model
    code, text, err = cli(capsys, "inspect", str(tmp_path / "vit.pth"), "--model", "timm/test_vit2")
    assert code == 0 and "class_token=0, reg_tokens=1" in text, err
    assert no_network == []


def test_a_file_may_name_a_resolved_model_only_within_the_size_it_justifies(tmp_path, capsys, no_network):
    tiny = tmp_path / "tiny.safetensors"
    save_file({"w": torch.zeros(4)}, str(tiny), metadata={"surgery": json.dumps(
        {"format": 1, "backbone": "timm_vit", "model": "timm/vit_large_patch16_224", "model_kwargs": {}})})
    with torch.device("meta"):
        large = sum(p.numel() for p in timm.create_model("vit_large_patch16_224").parameters())
    code, _, err = cli(capsys, "inspect", str(tiny))
    assert_refused(code, err, "'timm/vit_large_patch16_224'", f"{large:,} elements", "--allow-large")
    # a name timm would fetch from the hub (hf-hub:) or a folder (local-dir:) is no timm name here
    for name in ("timm/hf-hub:timm/test_vit.r160_in1k", "hf-hub:timm/test_vit.r160_in1k", "timm/local-dir:/tmp"):
        save_file({"w": torch.zeros(4)}, str(tiny), metadata={"surgery": json.dumps(
            {"format": 1, "backbone": "timm_vit", "model": name, "model_kwargs": {}})})
        code, _, err = cli(capsys, "inspect", str(tiny))
        assert_refused(code, err)
    assert no_network == []


# -- released weights from the Hugging Face cache -------------------------------------------------------


def test_released_weights_load_from_the_cache_without_network(tmp_path):
    """A fresh process, HF_HOME pointing at a cache laid out as huggingface_hub lays it, every
    connection refused: inspect and resize --pretrained read the cached safetensors."""
    released = timm_model("test_vit").state_dict()
    home = tmp_path / "hf_home"
    cache_file(home / "hub", "timm/test_vit.r160_in1k", "model.safetensors",
               lambda p: save_file({k: v.contiguous() for k, v in released.items()}, str(p)))
    out, attempts = tmp_path / "reg2.safetensors", tmp_path / "network_attempts.txt"
    script = textwrap.dedent(f"""
        import sys
        def audit(event, args):
            if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
                open({str(attempts)!r}, "a").write(event + "\\n")
                raise OSError("network disabled by the test")
        sys.addaudithook(audit)
        from surgery.cli import main
        codes = [main(["inspect", "timm/test_vit", "--pretrained", "--json"]),
                 main(["resize", "--model", "timm/test_vit", "--pretrained", "--set", "reg_tokens=2",
                       "-o", {str(out)!r}])]
        sys.exit(max(codes))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert not attempts.exists(), attempts.read_text()
    info = json.loads(run.stdout[:run.stdout.index("\nloaded ")])
    assert info["weights"] == str(home / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / COMMIT /
                                  "model.safetensors")
    written = load_file(str(out))
    assert written["reg_token"].shape == (1, 2, 64)
    assert all(torch.equal(written[k], v) for k, v in released.items() if k != "pos_embed")
    assert torch.equal(written["pos_embed"][:, :1], released["pos_embed"][:, :1])
    assert torch.equal(written["pos_embed"][:, 3:], released["pos_embed"][:, 1:])


def test_a_cached_pickle_is_read_weights_only(hub_cache, capsys, no_network):
    """A repository with pytorch_model.bin only (no safetensors): read with torch.load(weights_only=True)."""
    released = timm_model("test_vit2").state_dict()
    cache_file(hub_cache, "timm/test_vit2.r160_in1k", "pytorch_model.bin", lambda p: torch.save(released, p))
    model, path = surgery.model_source.pretrained_model("timm/test_vit2")
    assert path.name == "pytorch_model.bin"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in released.items())
    assert no_network == []


def test_weights_not_in_the_cache_are_one_line_naming_what_and_where(tmp_path, hub_cache, capsys, no_network):
    out = tmp_path / "out.safetensors"
    for argv in (["inspect", "timm/test_vit", "--pretrained"],
                 ["resize", "--model", "timm/test_vit", "--pretrained", "--set", "reg_tokens=1", "-o", str(out)]):
        code, _, err = cli(capsys, *argv)
        assert_refused(code, err, "timm/test_vit.r160_in1k", "model.safetensors or pytorch_model.bin",
                       str(hub_cache), "nothing is downloaded")
    # the cache records that the repository has no such files (.no_exist): still not there
    for name in ("model.safetensors", "pytorch_model.bin"):
        marker = hub_cache / "models--timm--test_vit.r160_in1k" / ".no_exist" / COMMIT / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    (hub_cache / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (hub_cache / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text(COMMIT)
    code, _, err = cli(capsys, "inspect", "timm/test_vit", "--pretrained")
    assert_refused(code, err, "are not in the Hugging Face cache")
    code, _, err = cli(capsys, "inspect", "timm/test_vit4", "--pretrained")  # timm names no hub repository
    assert_refused(code, err, "'test_vit4' has no release on the Hugging Face hub")
    code, _, err = cli(capsys, "inspect", "vit_tiny_test", "--pretrained")  # a tiny config: no released weights
    assert_refused(code, err, "'vit_tiny_test' (plugin 'timm_vit') has no released weights")
    assert not out.exists() and no_network == []


# -- names that are refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, mentions", [
    ("timm/vit_tiny_patch16_2244", ("timm", "has no model named 'vit_tiny_patch16_2244'", "vit_tiny_patch16_224")),
    ("timm/test_resnet", ("'test_resnet' is a ResNet, not of a family the timm_vit plugin has token sites for",)),
    ("test_resnet", ("'test_resnet' is a ResNet",)),
    ("timm/test_vit.no_such_tag", ("'test_vit' has no pretrained tag 'no_such_tag'", "r160_in1k")),
    ("timm/hf-hub:timm/test_vit.r160_in1k", ("is not a timm model name",)),
    ("no_such_model_anywhere", ("no plugin can build a model named 'no_such_model_anywhere'", "asked: timm_vit")),
])
def test_names_that_are_refused_are_one_line_and_write_nothing(tmp_path, capsys, no_network, name, mentions):
    code, _, err = cli(capsys, "inspect", name)
    assert_refused(code, err, *mentions)
    torch.save(timm_model("test_vit").state_dict(), tmp_path / "vit.pth")
    before = sorted(os.listdir(tmp_path))
    code, _, err = cli(capsys, "resize", str(tmp_path / "vit.pth"), "--model", name, "--set", "reg_tokens=1",
                       "-o", str(tmp_path / "out.safetensors"))
    assert_refused(code, err, *mentions)
    assert sorted(os.listdir(tmp_path)) == before and no_network == []


@pytest.mark.parametrize("argv, mentions", [
    (["resize", "--set", "reg_tokens=1", "-o", "out.safetensors"], "give CKPT, or --model NAME --pretrained"),
    (["resize", "--pretrained", "--set", "reg_tokens=1", "-o", "out.safetensors"], "give --model NAME and no CKPT"),
    (["inspect", "vit.pth", "--pretrained"], "--pretrained is for a model name"),
])
def test_pretrained_is_for_a_model_name(tmp_path, capsys, monkeypatch, argv, mentions):
    monkeypatch.chdir(tmp_path)
    torch.save(timm_model("test_vit").state_dict(), tmp_path / "vit.pth")
    code, _, err = cli(capsys, *argv)
    assert_refused(code, err, mentions)
    assert sorted(os.listdir(tmp_path)) == ["vit.pth"]


# -- the README's example -----------------------------------------------------------------------------


def test_the_readme_timm_example_runs_as_written(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in bash_lines("--model deit3_small_patch16_224"):
        argv = shlex.split(line, comments=True)
        if argv[0] == "python":
            exec(compile(argv[2], "README.md", "exec"), {})
        else:
            assert argv[0] == "surgery", line
            code, out, err = cli(capsys, *argv[1:])
            assert code == 0, err
            outputs.append(out)
    reference = timm.create_model("deit3_small_patch16_224", reg_tokens=4)  # timm's own 4-register DeiT III
    reference.load_state_dict(load_file("deit3_reg4.safetensors"))  # strict
    assert "deit3_small_patch16_224 (named by checkpoint metadata)" in outputs[-1]
    assert "class_token=1, reg_tokens=4" in outputs[-1]
    assert "class_token=1, reg_tokens=4" in outputs[0]  # DINOv2 with 4 registers, by its timm name
    assert no_network == []
