"""load_official / save_official against tiny files in ImageBind-LLM's official layout (ibllm_files.py).

The files are written from upstream's key names (scaled down), never from our model's state dict,
and every check reads the expected values back from the files: what the loader put where is
compared with what the files hold.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import ibllm_files as files
from surgery.errors import CheckpointError, UnsafeCheckpointError
from surgery_plugins.imagebind_llm.config import ImageBindLLMConfig
from surgery_plugins.imagebind_llm.loading import is_official_key, load_official, save_official
from surgery_plugins.imagebind_llm.model import ImageBindLLM
from test_imagebind_llm_model import PROMPTS, upstream_inputs
from test_loading import base_from_files, read


def load(f: files.Files, **kwargs) -> ImageBindLLM:
    return load_official(f.checkpoint, f.llama_dir, f.imagebind, imagebind="tiny_w3d", **kwargs)


@pytest.fixture
def official(tmp_path, tiny_tokenizer_path) -> files.Files:
    return files.write_official(tmp_path, tiny_tokenizer_path)


def assert_holds_the_files(model: ImageBindLLM, f: files.Files) -> None:
    sd = model.state_dict()
    checkpoint = read(f.checkpoint)["model"]
    encoder = read(f.imagebind)
    base = base_from_files(f.llama_dir)
    assert set(sd) == set(checkpoint) | {"image_bind." + k for k in encoder} | {
        "llama." + k for k in base if "rope" not in k}
    for key, value in sd.items():
        if key in checkpoint:
            expected = checkpoint[key]
        elif key.startswith("image_bind."):
            expected = encoder[key[len("image_bind."):]]
        else:
            expected = base[key[len("llama."):]]
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=0, atol=0, msg=key)


# -- the layout -------------------------------------------------------------------------------------


def convert_ckpt_keeps(key: str) -> bool:
    """upstream convert_ckpt.py: drop image_bind.* and every llama.* key without bias/gate/lora/norm."""
    if key.startswith("image_bind."):
        return False
    return not (key.startswith("llama.") and not any(w in key for w in ("bias", "gate", "lora", "norm")))


def test_released_key_set_is_what_convert_ckpt_keeps():
    with torch.device("meta"):
        sd = ImageBindLLM(ImageBindLLMConfig.named("7b")).state_dict()
    kept = [k for k in sd if is_official_key(k)]
    assert kept == [k for k in sd if convert_ckpt_keeps(k)]
    assert "prefix_query.weight" in kept and "llama.layers.31.feed_forward.lora_w3_l2.weight" in kept
    assert "llama.norm.weight" in kept and "llama.output.weight" not in kept
    assert sum(sd[k].numel() for k in kept if k.startswith("image_bind_")) > 600e6


@pytest.mark.parametrize("phase,legacy_bridge", [("finetune", False), ("pretrain", False), ("finetune", True)])
def test_official_files_load_into_the_architecture_they_describe(tmp_path, tiny_tokenizer_path, phase, legacy_bridge):
    f = files.write_official(tmp_path, tiny_tokenizer_path, phase=phase, legacy_bridge=legacy_bridge)
    model = load(f)
    assert model.config.phase == phase and model.config.legacy_bridge == legacy_bridge
    assert model.query_layer == 4 and not model.training
    assert_holds_the_files(model, f)
    tokens = model.generate_tokens(upstream_inputs(model), PROMPTS, max_gen_len=4, temperature=0)
    assert [len(t) for t in tokens] == [4, 4]


def test_dtype_and_head_mode_at_load(official):
    model = load(official, dtype=torch.bfloat16, head_mode={"vision": "all"})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.image_bind.head_mode("vision") == "all"


def test_save_official_round_trip_also_after_surgery(official, tmp_path):
    import surgery

    model = load(official)
    surgery.resize(model.image_bind, **{"num_cls_tokens.vision": 3})  # the encoder file carries its counts
    model.image_bind.set_head_mode({"vision": "all"})
    with torch.no_grad():
        model.prefix_query.weight.mul_(1.5)
    with pytest.raises(CheckpointError, match="folder .*out does not exist"):  # checked before anything is written
        save_official(model, tmp_path / "7B-first.pth", imagebind_path=tmp_path / "out" / "imagebind.pth")
    assert not (tmp_path / "7B-first.pth").exists()
    (tmp_path / "out").mkdir()
    saved = save_official(model, tmp_path / "out" / "7B.pth", imagebind_path=tmp_path / "out" / "imagebind.pth")
    assert set(read(saved)) == {"model"}  # upstream's release layout
    assert all(is_official_key(k) for k in read(saved)["model"])
    again = load_official(saved, official.llama_dir, tmp_path / "out" / "imagebind.pth", imagebind="tiny_w3d",
                          head_mode={"vision": "all"})
    assert again.image_bind.num_cls_tokens("vision") == 3
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0, msg=key)
    inputs = upstream_inputs(model)
    assert again.generate_tokens(inputs, PROMPTS, max_gen_len=5, temperature=0) == \
        model.generate_tokens(inputs, PROMPTS, max_gen_len=5, temperature=0)
    flat = save_official(model, tmp_path / "7B.safetensors")  # safetensors: the subset, flat
    assert load_official(flat, official.llama_dir, official.imagebind, imagebind="tiny_w3d").state_dict()[
        "prefix_query.weight"].equal(model.prefix_query.weight)


# -- what is refused --------------------------------------------------------------------------------


def _extra(sd):
    sd["llama.layers.0.attention.new_gate"] = torch.ones(1, 1, 1, 1)


def _missing(sd):
    del sd["image_bind_f2_3.weight"]


def _shape(sd):
    sd["llama.layers.1.attention.gate"] = torch.zeros(1, 8, 1, 1)


def _encoder_keys(sd):
    sd["image_bind.modality_heads.vision.2.weight"] = torch.zeros(24, 32)


@pytest.mark.parametrize("edit,message", [
    (_extra, r"1 unexpected key\(s\) .*: llama\.layers\.0\.attention\.new_gate"),
    (_missing, r"lacks 1 key\(s\) .*: image_bind_f2_3\.weight"),
    (_shape, r"llama\.layers\.1\.attention\.gate has shape \(1, 8, 1, 1\), .* needs \(1, 4, 1, 1\)"),
    (_encoder_keys, r"unexpected key\(s\) .*image_bind\.modality_heads\.vision\.2\.weight"),
], ids=["unexpected", "missing", "shape", "encoder-in-7B"])
def test_keys_that_do_not_fit_are_named(tmp_path, tiny_tokenizer_path, edit, message):
    f = files.write_official(tmp_path, tiny_tokenizer_path, edit=edit)
    with pytest.raises(CheckpointError, match=message):
        load(f)


def test_an_encoder_of_another_shape_or_width_is_refused(official, tmp_path):
    wrong = files.encoder_state_dict()
    wrong["modality_trunks.vision.blocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"modality_trunks\.vision\.blocks\.0\.attn\.in_proj_weight"):
        load_official(official.checkpoint, official.llama_dir, tmp_path / "wrong.pth", imagebind="tiny_w3d")
    torch.save(files.encoder_state_dict("small_w3d"), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match=r"gives 128-d embeddings but .* image_bind_proj takes 24"):
        load_official(official.checkpoint, official.llama_dir, tmp_path / "small.pth", imagebind="small_w3d")


def test_missing_files_unsafe_pickles_and_release_names(official, tmp_path):
    with pytest.raises(CheckpointError, match="no ImageBind weights: pass imagebind_weights="):
        load_official(official.checkpoint, official.llama_dir, imagebind="tiny_w3d")
    model = load_official(official.checkpoint, official.llama_dir, imagebind="tiny_w3d", allow_random_imagebind=True)
    assert model.image_bind.config.out_embed_dim == 24
    with pytest.raises(CheckpointError, match=r"7B is the name of an upstream release: download https://"):
        load_official("7B", official.llama_dir, official.imagebind, imagebind="tiny_w3d")
    with pytest.raises(CheckpointError, match="LLaMA folder .* does not exist"):
        load_official(official.checkpoint, tmp_path / "nowhere", official.imagebind, imagebind="tiny_w3d")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"model": {"prefix_query.weight": Payload()}}, fh)
    with pytest.raises(UnsafeCheckpointError):
        load_official(evil, official.llama_dir, official.imagebind, imagebind="tiny_w3d")
    assert not Path("pwned").exists()
