"""A checkpoint's metadata never chooses code, opens a file or sizes an allocation (surgery/model_source.py).

The metadata `surgery.save` writes names the registered model a file came from and the keyword
arguments it was built with; `surgery inspect` and `surgery resize` rebuild that model. These
tests write files whose metadata asks for more (timm's `checkpoint_path=` pointing at a pickle
payload, arguments no plugin declared safe, a model far larger than the file) and check, from
outside the code under test, what happened: which files Python opened (an audit hook), whether
the payload ran (the file it would create), which models were built with real weights (the
factory wrapped), and the real parameter counts of models built normally.
"""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import surgery
from surgery.cli import main
from surgery.errors import BackboneError, CheckpointError, ModelConfigError
from surgery.model_source import SIZE_MARGIN, model_for_checkpoint, size_on_meta

# -- what Python opened -----------------------------------------------------------------------------

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only inside `opened_files`


@contextlib.contextmanager
def opened_files():
    global _opened
    _opened = seen = []
    try:
        yield seen
    finally:
        _opened = None


# -- files with the metadata we choose ----------------------------------------------------------------


def with_metadata(path, model, **entry) -> None:
    """`surgery.save(model, path)`, then the "surgery" metadata entry changed as given (a hostile writer)."""
    surgery.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(metadata["surgery"])
    info.update(entry)
    metadata["surgery"] = json.dumps(info)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def payload(tmp_path):
    """A .pth next to the checkpoint that creates `ran` when unpickled with weights_only=False."""
    ran = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    path = tmp_path / "payload.pth"
    torch.save({"state_dict": Payload()}, path)
    return path, ran


@pytest.fixture
def real_builds(monkeypatch):
    """Names of the models whose factory returned a model holding real (not meta) tensors."""
    host = surgery.get_host()
    built: list[str] = []
    for name, spec in list(host.models.items()):
        def factory(_factory=spec.factory, _name=name, **kwargs):
            model = _factory(**kwargs)
            if any(not t.is_meta for t in (*model.parameters(), *model.buffers())):
                built.append(_name)
            return model
        monkeypatch.setitem(host.models, name, type(spec)(**{**spec.__dict__, "factory": factory}))
    return built


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *mentions: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgery: error: ") and "Traceback" not in err, err
    for text in mentions:
        assert text in lines[0], err


# -- item 13.1: metadata chooses no code and opens nothing ---------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "resize"])
def test_metadata_cannot_hand_checkpoint_path_to_timm(tmp_path, capsys, payload, command):
    payload_path, ran = payload
    ckpt = tmp_path / "vit.safetensors"
    with_metadata(ckpt, surgery.build("vit_tiny_test"), model_kwargs={"checkpoint_path": str(payload_path)})
    argv = [command, str(ckpt)] + (["--set", "reg_tokens=1", "-o", str(tmp_path / "out.safetensors")]
                                   if command == "resize" else [])
    with opened_files() as seen:
        code, _, err = run_cli(capsys, *argv)
    assert_one_error_line(code, err, "checkpoint_path", "allowed: class_token, reg_tokens")
    assert str(payload_path) not in seen  # never opened, by timm or anyone
    assert not ran.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kwargs", [{"depth": 64}, {"pretrained": True}, {"device": "cuda"},
                                    {"pretrained_cfg_overlay": {"file": "x.pth"}}, {"reg_tokens": 1, "img_size": 4096}])
def test_keyword_arguments_not_declared_safe_are_refused(kwargs):
    model = surgery.build("vit_tiny_test")
    state_dict = model.state_dict()
    entry = {"model": "vit_tiny_test", "model_kwargs": kwargs}
    refused = sorted(k for k in kwargs if k not in ("class_token", "reg_tokens"))
    with pytest.raises(CheckpointError, match=f"keyword argument\\(s\\) {', '.join(refused)}, which plugin 'timm_vit'"):
        model_for_checkpoint(entry, state_dict, where="test file")


@pytest.mark.parametrize("model_field, error", [("timm.models.vision_transformer:VisionTransformer", BackboneError),
                                                ("os.system", BackboneError), (["vit_tiny_test"], CheckpointError)])
def test_metadata_names_only_registered_models(model_field, error):
    with pytest.raises(error, match="known models|not a model name"):
        model_for_checkpoint({"model": model_field}, {}, where="test file")


def test_nested_or_odd_values_are_refused():
    state_dict = surgery.build("imagebind_tiny_test").state_dict()
    deep = {"model": "imagebind_tiny_test", "model_kwargs": {"num_cls_tokens": {"vision": [[[[[1]]]]]}}}
    with pytest.raises(CheckpointError, match="nested too deeply"):
        model_for_checkpoint(deep, state_dict, where="test file")
    with pytest.raises(CheckpointError, match="model_kwargs metadata is a list"):
        model_for_checkpoint({"model": "imagebind_tiny_test", "model_kwargs": [1]}, state_dict, where="test file")


def test_the_timm_factory_never_passes_a_file_argument_to_timm(payload):
    payload_path, ran = payload
    with opened_files() as seen, pytest.raises(ModelConfigError, match="checkpoint_path would make timm"):
        surgery.build("vit_tiny_test", checkpoint_path=str(payload_path))
    assert str(payload_path) not in seen and not ran.exists()


def test_declared_counts_rebuild_the_recorded_model(tmp_path, capsys):
    """What metadata may set still works: a ViT built with 2 registers, then resized to 3."""
    model = surgery.build("vit_tiny_test", reg_tokens=2)
    surgery.resize(model, reg_tokens=3, init="zeros")
    surgery.save(model, tmp_path / "reg3.safetensors")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "reg3.safetensors"), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["counts"] == {"class_token": 1, "reg_tokens": 3}
    assert [(s["from"], s["to"]) for s in info["recipe"]] == [(2, 3)]  # the file's recipe, from the recorded build


def test_bad_values_of_a_safe_argument_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "vit.safetensors"
    with_metadata(ckpt, surgery.build("vit_tiny_test"), model_kwargs={"reg_tokens": "many"})
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_error_line(code, err, "model 'vit_tiny_test' (plugin 'timm_vit') cannot be built with reg_tokens='many'")


# -- item 13.1: the size limit --------------------------------------------------------------------------


def test_a_model_larger_than_the_file_is_not_built_without_allow_large(tmp_path, capsys, real_builds):
    # a file of the tiny ViT (32,554 elements) whose metadata asks for 300,000 registers: 19.2M elements
    ckpt = tmp_path / "vit.safetensors"
    with_metadata(ckpt, surgery.build("vit_tiny_test"), model_kwargs={"reg_tokens": 300_000})
    real_builds.clear()
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_error_line(code, err, "--allow-large", "19,232,554 elements")
    assert real_builds == []  # counted on the meta device only

    code, out, err = run_cli(capsys, "inspect", str(ckpt), "--allow-large")
    assert code == 0, err
    assert real_builds == ["vit_tiny_test"] and "reg_tokens=0" in out  # built, then resized to the file's count


def test_a_small_file_cannot_name_a_large_registered_model(tmp_path, capsys, real_builds):
    ckpt = tmp_path / "tiny.safetensors"
    save_file({"w": torch.zeros(4)}, str(ckpt), metadata={"surgery": json.dumps(
        {"format": 1, "backbone": "timm_vit", "model": "vit_base_patch16_224", "model_kwargs": {}})})
    real_builds.clear()
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_error_line(code, err, "'vit_base_patch16_224'", "86,567,656 elements", "--allow-large")
    assert real_builds == []
    # the user naming the model is the user's choice: no size limit (the keys then do not fit)
    code, _, err = run_cli(capsys, "inspect", str(ckpt), "--model", "vit_tiny_test")
    assert_one_error_line(code, err, "does not fit the model")


@pytest.mark.parametrize("name, kwargs", [("vit_tiny_test", {}), ("vit_tiny_reg_test", {"reg_tokens": 5}),
                                          ("eva_tiny_test", {}), ("llama_adapter_v2_tiny", {"query_len": 6}),
                                          ("imagebind_tiny_test", {"num_cls_tokens": {"vision": 3}})])
def test_size_on_meta_is_the_real_models_size(name, kwargs):
    real = surgery.build(name, **kwargs)
    expected = sum(t.numel() for t in {id(t): t for t in (*real.parameters(), *real.buffers())}.values())
    assert size_on_meta(surgery.get_host().model_spec(name), kwargs) == expected


def test_size_on_meta_of_a_released_architecture():
    spec = surgery.get_host().model_spec("llama_adapter_v2_7b")
    on_meta = surgery.build("llama_adapter_v2_7b")  # the plugin's own default is meta
    assert size_on_meta(spec, {}) == sum(p.numel() for p in on_meta.parameters()) > SIZE_MARGIN


def test_a_factory_that_ignores_the_default_device_is_refused(fresh_host):
    from toy_backbone import BACKBONE, ToyModel, ToyPlugin

    class CpuOnly(ToyPlugin):
        @surgery.hookimpl
        def surgery_register_models(self, register):
            def factory(**kw):
                with torch.device("cpu"):
                    return ToyModel(**kw)
            register("toy_cpu", factory, BACKBONE, safe_kwargs=("prompts",))

    assert fresh_host.add_plugin(CpuOnly(), "toy")
    with pytest.raises(CheckpointError, match="does not build on the default device.*--allow-large"):
        size_on_meta(fresh_host.model_spec("toy_cpu"), {"prompts": 3})


def test_safe_kwargs_must_be_keyword_names(fresh_host):
    from toy_backbone import BACKBONE, ToyModel, ToyPlugin

    class Odd(ToyPlugin):
        @surgery.hookimpl
        def surgery_register_models(self, register):
            register("toy_odd", ToyModel, BACKBONE, safe_kwargs=["prompts", 3])

    assert not fresh_host.add_plugin(Odd(), "toy")
    assert "safe_kwargs must be keyword names" in fresh_host.records["toy"].error


# -- build_on_meta: a model sized by a file's numbers, stopped once larger than the file justifies ------


class CountedLinear(torch.nn.Linear):
    """nn.Linear that counts how many were built (on any device)."""

    built = 0

    def __init__(self, *args, **kwargs):
        CountedLinear.built += 1
        super().__init__(*args, **kwargs)


def layers(n: int) -> torch.nn.Module:
    """A model of `n` one-weight layers: what a config.json claiming `n` layers describes."""
    return torch.nn.Sequential(*(CountedLinear(1, 1, bias=False) for _ in range(n)))


def weights(numel: int, tensors: int = 1) -> dict:
    """A file's tensors, by their sizes only (meta tensors: build_on_meta reads nothing else)."""
    return {f"w{i}": torch.empty(numel, device="meta") for i in range(tensors)}


def test_build_on_meta_stops_a_model_of_a_million_layers_after_a_few():
    from surgery.model_source import BUILDING_SLACK, MODULE_MARGIN, MODULES_PER_TENSOR, build_on_meta

    CountedLinear.built = 0
    with pytest.raises(CheckpointError, match=r"the file \(from a test\) asks for 10\*\*6 layers, which holds more "
                                              r"than 1,028 tensors.*nothing allocated.*--allow-large"):
        build_on_meta(lambda: layers(10**6), "10**6 layers", justified_by=weights(1), where="the file (from a test)")
    # stopped while building, within twice the limit (a tied weight exists twice for a moment), not at 10**6
    assert CountedLinear.built <= BUILDING_SLACK * (MODULES_PER_TENSOR * 1 + MODULE_MARGIN) + 1
    model = build_on_meta(lambda: layers(3), "3 layers", justified_by=weights(1, tensors=3))  # what the file holds
    assert all(p.device.type == "meta" for p in model.parameters())


def test_build_on_meta_counts_elements_once_per_live_tensor(monkeypatch):
    from surgery.model_source import SIZE_MARGIN, build_on_meta

    big = SIZE_MARGIN + 1

    def tied():  # a head tied to its embedding (as transformers ties an lm_head): one tensor, counted once
        model = torch.nn.Module()
        model.embed = torch.nn.Embedding(big, 1)
        model.head = torch.nn.Linear(1, big, bias=False)  # its own weight, freed when tied below
        model.head.weight = model.embed.weight
        return model

    assert build_on_meta(tied, "a tied model", justified_by=weights(big, tensors=1))
    # the built model is held to the limit itself: the file's element plus the margin, not one more
    assert build_on_meta(lambda: torch.nn.Embedding(big, 1), "as many rows", justified_by=weights(1))
    with pytest.raises(CheckpointError, match="more than 16,777,217 elements"):
        build_on_meta(lambda: torch.nn.Embedding(big + 1, 1), "one row too many", justified_by=weights(1))


def test_build_on_meta_cannot_be_talked_out_of_its_limit():
    from surgery.model_source import SIZE_MARGIN, build_on_meta

    def stubborn():  # catches the refusal from each registration and goes on
        model = torch.nn.Module()
        for i in range(3):
            try:
                setattr(model, f"w{i}", torch.nn.Parameter(torch.empty(SIZE_MARGIN)))
            except Exception:
                pass
        return model

    with pytest.raises(CheckpointError, match="elements"):
        build_on_meta(stubborn, "a stubborn model", justified_by=weights(1))

    def unregistered():  # a tensor put where the registration hooks do not see it: the built model is counted
        model = torch.nn.Linear(1, 1)
        model._parameters["weight"] = torch.nn.Parameter(torch.empty(2 * SIZE_MARGIN, 1))
        return model

    with pytest.raises(CheckpointError, match="elements"):
        build_on_meta(unregistered, "a hidden tensor", justified_by=weights(1))


def test_build_on_meta_counts_only_its_own_thread():
    import threading

    from surgery.model_source import SIZE_MARGIN, build_on_meta

    def with_a_neighbour():  # another thread builds a large module meanwhile: not this model's
        other = threading.Thread(target=lambda: torch.nn.Linear(SIZE_MARGIN, 4, device="meta"))
        other.start()
        other.join()
        return torch.nn.Linear(1, 1)

    assert isinstance(build_on_meta(with_a_neighbour, "a small model", justified_by=weights(2)), torch.nn.Linear)


def test_allowing_large_lifts_the_limits_within_its_block():
    from surgery.model_source import allowing_large, build_on_meta, large_allowed

    assert not large_allowed()
    with allowing_large():
        assert large_allowed()
        assert len(build_on_meta(lambda: layers(1100), "1100 layers", justified_by=weights(1))) == 1100
    assert not large_allowed()
    with pytest.raises(CheckpointError, match="more than 1,028 modules"):  # the built model, held to the limit
        build_on_meta(lambda: layers(1100), "1100 layers", justified_by=weights(1))


def test_build_on_meta_counts_modules_as_they_are_attached():
    from surgery.model_source import build_on_meta

    def block():  # a layer of parameterless parts: its modules count as it is built
        return torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.ReLU())

    with pytest.raises(CheckpointError, match="more than 1,028 modules"):
        build_on_meta(lambda: torch.nn.ModuleList([block() for _ in range(10**6)]), "blocks", justified_by=weights(1))
