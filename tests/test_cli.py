"""Tests of the `surgery` command line (surgery/cli/).

Most tests call `main([...])` in-process and read stdout/stderr with capsys; one test runs the
installed console script in a subprocess, as a user would. Expected values come from outside
the CLI: timm models created directly with the wanted register count, the plugin module's own
tables, the checkpoint file's bytes and tensors, and `surgery.load` reading back what `resize`
wrote.

Every refusal is checked the same way (`assert_refused`): the expected non-zero exit, exactly
one line on stderr starting with "surgery: error:", no traceback. Where files are involved the
folder is compared before and after: the input byte-for-byte as it was, nothing new next to it
(no output, no temporary file left over).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

import surgery
import surgery_plugins.timm_vit as timm_vit
from surgery import strategies
from surgery.checkpoint import read_checkpoint
from surgery.cli import main
from surgery.plugins import PluginHost, reset_host

ARCH, TINY, _ = timm_vit.MODELS["vit_tiny_test"]
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def timm_reference(**overrides) -> torch.nn.Module:
    """The tiny ViT created by timm directly (no surgery involved), e.g. with `reg_tokens=4`."""
    return timm.create_model(ARCH, pretrained=False, **{**TINY, **overrides}).eval()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, expected_code: int | None = None, mentions: str = "") -> None:
    assert code != 0
    if expected_code is not None:
        assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("surgery: error: "), err
    assert "Traceback" not in err
    assert mentions.lower() in lines[0].lower(), err


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint saved by `surgery.save` from `vit_tiny_test` (class token, no registers)."""
    path = tmp_path / "vit.safetensors"
    surgery.save(surgery.build("vit_tiny_test"), str(path), metadata={"source": "test fixture"})
    return path


def folder_snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# -- plugins and models --------------------------------------------------------------------------


def test_plugins_json_lists_timm_vit_loaded_with_its_hooks(capsys):
    code, out, err = cli(capsys, "plugins", "--json")
    assert code == 0 and err == ""
    records = {r["name"]: r for r in json.loads(out)}
    record = records["timm_vit"]
    assert record["status"] == "loaded" and record["error"] is None
    assert record["version"] == importlib.metadata.version("token-surgery")
    own_hooks = sorted(n for n in vars(timm_vit) if n.startswith("surgery_") and callable(getattr(timm_vit, n)))
    assert record["hooks"] == own_hooks
    assert record["backbones"] == ["timm_vit"] and sorted(record["models"]) == sorted(timm_vit.MODELS)

    code, out, _ = cli(capsys, "plugins")
    assert code == 0 and "timm_vit" in out and "loaded" in out


class _BrokenPlugin:
    @surgery.hookimpl
    def surgery_register_backbones(self, register):
        raise RuntimeError("boom while registering")


@pytest.fixture
def host_with_broken_plugin():
    host = PluginHost()
    host.load_entry_points()
    assert not host.add_plugin(_BrokenPlugin(), "broken")
    old = reset_host(host)
    try:
        yield host
    finally:
        reset_host(old)


def test_plugins_lists_a_failed_plugin_with_its_error(capsys, host_with_broken_plugin):
    code, out, _ = cli(capsys, "plugins", "--json")
    records = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and records["timm_vit"]["status"] == "loaded"
    assert records["broken"]["status"] == "failed" and "boom while registering" in records["broken"]["error"]

    code, out, _ = cli(capsys, "plugins")
    assert code == 0 and "failed" in out and "boom while registering" in out


def test_models_lists_what_the_plugin_registered(capsys):
    code, out, err = cli(capsys, "models", "--json")
    assert code == 0 and err == ""
    entries = {e["name"]: e for e in json.loads(out)}
    ours = {name for name, e in entries.items() if e["plugin"] == "timm_vit"}
    assert ours == set(timm_vit.MODELS)
    for name, (_, _, description) in timm_vit.MODELS.items():
        assert entries[name] == {"name": name, "backbone": "timm_vit", "plugin": "timm_vit", "description": description}

    code, out, _ = cli(capsys, "models")
    assert code == 0 and all(name in out for name in timm_vit.MODELS)


# -- inspect -------------------------------------------------------------------------------------


def tensors_of(info: dict, site: str) -> dict[str, dict]:
    return {t["key"]: t for s in info["sites"] if s["name"] == site for t in s["tensors"]}


def test_inspect_model_name(capsys):
    code, out, err = cli(capsys, "inspect", "vit_tiny_test", "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    ref = timm_reference()
    assert info["backbone"] == "timm_vit" and info["kind"] == "model"
    assert info["counts"] == {"class_token": 1, "reg_tokens": 0}
    cls, reg = tensors_of(info, "class_token"), tensors_of(info, "reg_tokens")
    assert cls["cls_token"]["shape"] == list(ref.cls_token.shape)
    assert cls["pos_embed"]["shape"] == list(ref.pos_embed.shape) and cls["pos_embed"]["coupled"]
    assert reg["reg_token"]["shape"] is None  # timm keeps reg_token = None without registers
    assert reg["pos_embed"]["start"] == 1 and reg["pos_embed"]["axis"] == 1
    site = {s["name"]: s for s in info["sites"]}["class_token"]
    assert (site["min"], site["max"]) == (1, 1) and "global_pool" in site["note"]

    code, out, _ = cli(capsys, "inspect", "vit_tiny_test")
    assert code == 0
    for text in ("timm_vit", "class_token", "reg_tokens", "cls_token", "pos_embed", "(1, 17, 32)", "coupled"):
        assert text in out


def test_inspect_shows_views_and_steps(capsys, toy_host):
    """The site table on a plugin with a flat table seen through a view, and a stepped site."""
    from toy_backbone import ToyModel

    code, out, _ = cli(capsys, "inspect", "toy_tiny", "--json")
    assert code == 0
    info = json.loads(out)
    ref = ToyModel()
    adapter = tensors_of(info, "query_len")["adapter.weight"]
    assert adapter["shape"] == list(ref.adapter.weight.shape)
    assert adapter["view"] == [ref.query_layer, ref.query_len, ref.dim] and adapter["axis"] == 1
    assert {s["name"]: s["step"] for s in info["sites"]}["memory"] == 2

    code, out, _ = cli(capsys, "inspect", "toy_tiny")
    assert code == 0 and f"{tuple(ref.adapter.weight.shape)} as (2, 3, 8)" in out
    assert "0.. step 2" in out


def test_inspect_saved_checkpoint(tmp_path, capsys):
    model = surgery.build("vit_tiny_test")
    surgery.resize(model, reg_tokens=3, init="zeros")
    path = tmp_path / "reg3.safetensors"
    surgery.save(model, str(path))
    before = path.read_bytes()

    code, out, err = cli(capsys, "inspect", str(path), "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    ref = timm_reference(reg_tokens=3)
    assert info["kind"] == "checkpoint" and info["model"] == "vit_tiny_test"
    assert info["counts"] == {"class_token": 1, "reg_tokens": 3}
    reg = tensors_of(info, "reg_tokens")
    assert reg["reg_token"]["shape"] == list(ref.reg_token.shape)
    assert reg["pos_embed"]["shape"] == list(ref.pos_embed.shape)
    assert [(s["site"], s["from"], s["to"]) for s in info["recipe"]] == [("reg_tokens", 0, 3)]
    assert path.read_bytes() == before


def test_inspect_plain_timm_pth_needs_model(tmp_path, capsys):
    path = tmp_path / "timm_reg2.pth"
    torch.save(timm_reference(reg_tokens=2).state_dict(), path)
    before = path.read_bytes()

    code, _, err = cli(capsys, "inspect", str(path))
    assert_refused(code, err, mentions="--model")

    code, out, err = cli(capsys, "inspect", str(path), "--model", "vit_tiny_test", "--json")
    assert code == 0 and err == ""
    assert json.loads(out)["counts"] == {"class_token": 1, "reg_tokens": 2}
    assert path.read_bytes() == before


@pytest.mark.parametrize("target, mentions", [
    ("no_such_model", "vit_tiny_test"),  # the error lists the known models
    ("missing.safetensors", "does not exist"),
])
def test_inspect_unknown_target(capsys, target, mentions):
    code, _, err = cli(capsys, "inspect", target)
    assert_refused(code, err, expected_code=1, mentions=mentions)


# -- resize --------------------------------------------------------------------------------------


def test_resize_writes_new_counts_that_load_reads_back(tmp_path, capsys, ckpt):
    before = ckpt.read_bytes()
    out_path = tmp_path / "reg4.safetensors"
    code, out, err = cli(capsys, "resize", str(ckpt), "--set", "reg_tokens=4", "--init", "zeros", "-o", str(out_path))
    assert code == 0 and err == ""
    assert "reg_tokens: 0 -> 4" in out and "pos_embed" in out
    assert ckpt.read_bytes() == before

    loaded = surgery.build("vit_tiny_test")
    surgery.load(str(out_path), loaded)
    assert surgery.counts(loaded) == {"class_token": 1, "reg_tokens": 4}

    # A timm model created with 4 registers takes the file's weights as they are (strict) and
    # computes the same outputs as the model surgery.load built.
    weights = load_file(str(out_path))
    ref = timm_reference(reg_tokens=4)
    ref.load_state_dict(weights)
    with torch.no_grad():
        assert torch.equal(ref(IMAGES), loaded(IMAGES))

    # Old weights kept; the new register rows are what --init zeros promises.
    old = load_file(str(ckpt))
    assert set(weights) == set(old) | {"reg_token"}
    assert all(torch.equal(weights[k], old[k]) for k in old if k != "pos_embed")
    assert torch.equal(weights["pos_embed"][:, :1], old["pos_embed"][:, :1])
    assert torch.equal(weights["pos_embed"][:, 5:], old["pos_embed"][:, 1:])
    assert not weights["pos_embed"][:, 1:5].any() and not weights["reg_token"].any()
    # The input's own metadata entries travel along; the "surgery" entry describes the new file.
    _, metadata = read_checkpoint(str(out_path))
    assert metadata["source"] == "test fixture"
    assert metadata["surgery"]["counts"] == {"class_token": 1, "reg_tokens": 4}


def test_resize_refuses_existing_out_unless_forced(tmp_path, capsys, ckpt):
    out_path = tmp_path / "taken.safetensors"
    out_path.write_bytes(b"keep me")
    code, _, err = cli(capsys, "resize", str(ckpt), "--set", "reg_tokens=2", "-o", str(out_path))
    assert_refused(code, err, expected_code=2, mentions="--force")
    assert out_path.read_bytes() == b"keep me"

    code, _, err = cli(capsys, "resize", str(ckpt), "--set", "reg_tokens=2", "-o", str(out_path), "--force")
    assert code == 0, err
    assert load_file(str(out_path))["reg_token"].shape == (1, 2, 32)


@pytest.mark.parametrize("alias", ["same", "dotted", "symlink", "hardlink"])
def test_resize_refuses_to_write_its_input(tmp_path, capsys, ckpt, alias):
    out_path = {"same": ckpt, "dotted": tmp_path / "." / ckpt.name,
                "symlink": tmp_path / "link.safetensors", "hardlink": tmp_path / "hard.safetensors"}[alias]
    if alias == "symlink":
        out_path.symlink_to(ckpt)
    elif alias == "hardlink":
        os.link(ckpt, out_path)
    files = folder_snapshot(tmp_path)
    code, _, err = cli(capsys, "resize", str(ckpt), "--set", "reg_tokens=4", "-o", str(out_path), "--force")
    assert_refused(code, err, expected_code=2, mentions="input")
    assert folder_snapshot(tmp_path) == files


@pytest.mark.parametrize("extra, expected_code, mentions", [
    (["--set", "reg_tokens=four"], 2, "integer"),
    (["--set", "reg_tokens"], 2, "SITE=N"),
    (["--set", "=3"], 2, "SITE=N"),
    (["--set", "reg_tokens=2", "--set", "reg_tokens=3"], 2, "twice"),
    (["--set", "bogus=1"], 1, "bogus"),
    (["--set", "reg_tokens=-1"], 1, "minimum"),
    (["--set", "class_token=0"], 1, "global_pool"),
    (["--set", "reg_tokens=2", "--init", "magic"], 2, "magic"),
    (["--set", "reg_tokens=2", "--seed", "x"], 2, "--seed"),
    (["--set", "reg_tokens=2", "--init", "mean"], 1, "mean"),  # nothing to average over: no registers yet
])
def test_resize_bad_input_changes_nothing(tmp_path, capsys, ckpt, extra, expected_code, mentions):
    files = folder_snapshot(tmp_path)
    code, _, err = cli(capsys, "resize", str(ckpt), *extra, "-o", str(tmp_path / "out.safetensors"))
    assert_refused(code, err, expected_code=expected_code, mentions=mentions)
    assert folder_snapshot(tmp_path) == files  # input unchanged, no output, no temporary left over


def test_resize_missing_input(tmp_path, capsys):
    code, _, err = cli(capsys, "resize", str(tmp_path / "nope.safetensors"), "--set", "reg_tokens=1",
                       "-o", str(tmp_path / "out.safetensors"))
    assert_refused(code, err, expected_code=1, mentions="does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, content", [
    ("garbage.safetensors", b"\x00\x01 this is not a checkpoint " * 10),
    ("garbage.pth", b"PK\x03\x04 definitely not a zip " * 10),
    ("truncated.safetensors", None),  # the first half of a valid file
])
def test_resize_corrupt_input(tmp_path, capsys, ckpt, name, content):
    path = tmp_path / name
    path.write_bytes(content if content is not None else ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    files = folder_snapshot(tmp_path)
    code, _, err = cli(capsys, "resize", str(path), "--set", "reg_tokens=1", "--model", "vit_tiny_test",
                       "-o", str(tmp_path / "out.safetensors"))
    assert_refused(code, err, expected_code=1)
    assert folder_snapshot(tmp_path) == files


# -- help and demo -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["plugins"], ["models"], ["inspect"], ["resize"], ["demo"]])
def test_every_command_has_help(capsys, command):
    code, out, _ = cli(capsys, *command, "--help")
    assert code == 0 and out.startswith(f"usage: surgery {' '.join(command)}".rstrip())


def test_resize_help_names_every_strategy(capsys):
    _, out, _ = cli(capsys, "resize", "--help")
    assert all(name in out for name in (*strategies.GROWTH_NAMES, *strategies.SHRINK_NAMES))


def test_no_command_is_a_usage_error(capsys):
    code, _, err = cli(capsys)
    assert_refused(code, err, expected_code=2, mentions="choose a command")


def test_demo_keeps_a_checkpoint_that_loads(tmp_path, capsys):
    code, out, err = cli(capsys, "demo", "--set", "reg_tokens=2", "--out", str(tmp_path))
    assert code == 0, err
    assert "MISMATCH" not in out and "all checks passed" in out
    [path] = tmp_path.iterdir()
    ref = timm_reference(reg_tokens=2)
    ref.load_state_dict(load_file(str(path)))  # the file fits a timm model with 2 registers
    fresh = surgery.build("vit_tiny_test")
    surgery.load(str(path), fresh)
    assert surgery.counts(fresh) == {"class_token": 1, "reg_tokens": 2}


@pytest.mark.parametrize("model, change", [
    ("vit_tiny_reg_test", "reg_tokens: 2 -> 4"),  # default counts; registers without pos_embed rows
    ("eva_tiny_test", "reg_tokens: 0 -> 4"),  # another timm family (RoPE skips prefix tokens)
])
def test_demo_on_other_models(capsys, model, change):
    code, out, err = cli(capsys, "demo", "--model", model)
    assert code == 0, err
    assert change in out and "MISMATCH" not in out and "all checks passed" in out


def test_demo_bad_site(capsys):
    code, _, err = cli(capsys, "demo", "--set", "bogus=3")
    assert_refused(code, err, expected_code=1, mentions="bogus")


def test_console_script(tmp_path):
    """The installed `surgery` script, as a user runs it (and `python -m surgery`)."""
    exe = shutil.which("surgery")
    assert exe, "the `surgery` console script is not installed (pip install -e .)"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "demo" in done.stdout

    # the single-model walk (`surgery demo` alone tells the installed story: tests/plugins/imagebind_llm/test_story.py)
    done = subprocess.run([exe, "demo", "--model", "vit_tiny_test"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "reg_tokens: 0 -> 4" in done.stdout and "all checks passed" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint is gone

    done = subprocess.run([sys.executable, "-m", "surgery", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and surgery.__version__ in done.stdout


def test_help_imports_no_heavy_library():
    """`surgery --help` (every command module loaded, plugins' too) and `import surgery` import
    neither torch nor timm nor matplotlib nor tqdm: the command line answers at once."""
    code = ("import sys, surgery\n"
            "from surgery.cli import main\n"
            "assert main(['--help']) == 0 and main(['bench', '--help']) == 0\n"
            "print(sorted(m for m in ('torch', 'timm', 'matplotlib', 'tqdm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "e2e" in done.stdout and "profile" in done.stdout  # the plugin's commands were loaded


# -- bench and profile ---------------------------------------------------------------------------

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_bench_and_profile_have_help(capsys):
    code, out, _ = cli(capsys, "bench", "--help")
    assert code == 0 and out.startswith("usage: surgery bench") and all(
        k in out for k in ("kernels", "e2e", "surgery", "imagebind"))
    assert "--quick" in out and "--device" in out and "--out" in out
    code, out, _ = cli(capsys, "profile", "--help")
    assert code == 0 and out.startswith("usage: surgery profile") and "Perfetto" in out


@needs_no_gpu
@pytest.mark.parametrize("argv", [["bench", "kernels"], ["bench", "e2e", "--quick"], ["profile"],
                                  ["bench", "surgery", "--model", "vit_tiny_test", "--change", "reg_tokens=2"],
                                  ["bench", "imagebind", "--quick"]])
def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, capsys, argv):
    out_dir = tmp_path / "results"
    code, out, err = cli(capsys, *argv, "--device", "cuda", "--out", str(out_dir))
    assert_refused(code, err, expected_code=1, mentions="no CUDA device is available here")
    assert "allowed here: cpu" in err and not out_dir.exists()


def test_bench_option_of_another_benchmark_is_a_usage_error(capsys):
    code, _, err = cli(capsys, "bench", "e2e", "--ops", "query_concat")
    assert_refused(code, err, expected_code=2, mentions="--ops is an option of 'surgery bench kernels'")
    code, _, err = cli(capsys, "bench", "kernels", "--query-lens", "3")  # a plugin's kind's option, too
    assert_refused(code, err, expected_code=2, mentions="--query-lens is an option of 'surgery bench e2e'")
    code, _, err = cli(capsys, "bench", "kernels", "--bogus")
    assert_refused(code, err, expected_code=2, mentions="unrecognized arguments: --bogus")
    code, _, err = cli(capsys, "bench", "fast")
    assert_refused(code, err, expected_code=2, mentions="invalid choice")
    code, _, err = cli(capsys, "bench")
    assert_refused(code, err, expected_code=2, mentions="choose what 'surgery bench' runs: e2e, imagebind, kernels")


def _kernel_argv(tmp_path) -> list[str]:
    return ["bench", "kernels", "--quick", "--ops", "query_concat", "--backends", "cpp.out", "--threads", "1",
            "--no-progress", "--out", str(tmp_path)]


def test_bench_kernels_writes_rows_plots_and_a_summary(tmp_path, capsys):
    code, out, err = cli(capsys, *_kernel_argv(tmp_path))
    assert code == 0, err
    assert "| query_concat | float32 | 7b |" in out and f"results in {tmp_path}" in out
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert {r["backend"] for r in data["rows"]} == {"copy", "fill", "memset", "cpp.out"}  # the limits, the op
    assert all(r["status"] == "ok" and r["threads"] == 1 for r in data["rows"])
    assert (tmp_path / "kernels_cpu_float32.png").exists() and (tmp_path / "summary.md").exists()


def test_bench_kernels_quick_grid_runs_every_backend(tmp_path, capsys):
    """The whole `--quick` grid, as documented (CI runs it so the benchmark never rots): every op
    and every CPU backend, each checked against the reference and timed."""
    code, out, err = cli(capsys, "bench", "kernels", "--quick", "--threads", "1", "--no-progress",
                         "--out", str(tmp_path))
    assert code == 0, err
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"query_concat", "adapter_add", "adapter_attention"}
    assert {"copy", "upstream", "compile", "cpp"} <= {r["backend"] for r in rows}
    assert all(r["status"] == "ok" and r["ms_p50"] > 0 for r in rows)


def test_bench_kernels_refuses_a_backend_whose_output_is_wrong(tmp_path, capsys, monkeypatch):
    from surgery.bench import kernels

    real = kernels.implementations

    def with_wrong_cpp(case, device, backends):
        impls, missing = real(case, device, backends)
        good = impls["cpp.out"]

        def wrong(args, out):
            return good.call(args, out).mul_(2)  # every element wrong

        return {**impls, "cpp.out": kernels.Impl("cpp.out", wrong, needs_out=True)}, missing

    monkeypatch.setattr(kernels, "implementations", with_wrong_cpp)
    code, out, err = cli(capsys, *_kernel_argv(tmp_path))
    assert_refused(code, err, expected_code=1, mentions="refused because their output differs from the reference")
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]  # the results are still written
    wrong = [r for r in rows if r["backend"] == "cpp.out"]
    assert wrong and all(r["status"] == "refused" and r["ms_p50"] is None for r in wrong)


def test_bench_surgery_quick(tmp_path, capsys):
    code, out, err = cli(capsys, "bench", "surgery", "--model", "llama_adapter_v2_7b", "--change", "query_len=64",
                         "--change", "query_layer=8", "--quick", "--repeats", "2", "--no-progress",
                         "--out", str(tmp_path))
    assert code == 0, err
    rows = json.loads((tmp_path / "surgery_cost.json").read_text())["rows"]
    assert len(rows) == 10 and {r["site"] for r in rows} == {"query_len", "query_layer"}
    assert all(r["other_tensors_touched"] == 0 for r in rows)
    assert "| tokens swap | query_len | 10 -> 64 |" in out
    code, _, err = cli(capsys, "bench", "surgery", "--quick")  # the core names no model: the user does
    assert_refused(code, err, expected_code=2, mentions="--model")


def test_bench_e2e_on_the_tiny_model(tmp_path, capsys):
    code, out, err = cli(capsys, "bench", "e2e", "--quick", "--model", "llama_adapter_v2_tiny", "--query-lens", "3",
                         "--batches", "1,2", "--prompt-len", "4", "--threads", "1", "--no-progress", "--out",
                         str(tmp_path))
    assert code == 0, err
    points = json.loads((tmp_path / "e2e_points.json").read_text())["rows"]
    assert [(p["query_len"], p["batch"], p["tokens_identical"]) for p in points] == [(3, 1, True), (3, 2, True)]
    assert "identical at 2 of 2 points" in out and (tmp_path / "e2e_decode_float32.png").exists()


def test_bench_imagebind_on_the_tiny_config(tmp_path, capsys):
    code, out, err = cli(capsys, "bench", "imagebind", "--quick", "--config", "tiny", "--modalities", "vision,text",
                         "--batches", "1,2", "--min-run-time", "0.01", "--threads", "1", "--no-progress",
                         "--out", str(tmp_path))
    assert code == 0, err
    rows = json.loads((tmp_path / "imagebind_embed.json").read_text())["rows"]
    assert [(r["impl"], r["modality"], r["batch"], r["mode"]) for r in rows] == [
        ("ours", m, b, "eager") for m in ("vision", "text") for b in (1, 2)]
    assert all(r["items_per_s"] == pytest.approx(r["batch"] / r["seconds"]) for r in rows)
    assert "| ours | float32 | eager | vision | 2 |" in out and (tmp_path / "summary.md").exists()


def test_benchmarks_without_matplotlib_write_their_results_and_say_so(tmp_path, capsys, monkeypatch):
    from surgery.bench import report

    monkeypatch.setattr(report, "can_plot", lambda: False)  # as where the `plot` extra is not installed
    code, out, err = cli(capsys, *_kernel_argv(tmp_path))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels.csv", "kernels.json", "summary.md"]
    assert "plots skipped: matplotlib is not installed" in out
    assert "Plots skipped" in (tmp_path / "summary.md").read_text()


def test_profile_writes_a_trace(tmp_path, capsys):
    code, out, err = cli(capsys, "profile", "--model", "llama_adapter_v2_tiny", "--steps", "2", "--threads", "1",
                         "--out", str(tmp_path))
    assert code == 0, err
    assert "Self CPU" in out and "decode_step_1" in out and "adapter_attention" in out
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
