"""`surgery generate` with ImageBind-LLM, end to end: the registered tiny model and tiny official
files; images, point clouds (and audio where torchaudio is installed) mixed by weight, k CLS tokens
as k visual tokens. The text must be the tokenizer's decoding of the model's own greedy
`generate_tokens` on the same inputs; bad input is one line on stderr, nothing written."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import surgery
from surgery_plugins.imagebind.point_loading import load_and_transform_point_cloud_data
from surgery_plugins.imagebind.transforms import load_and_transform_vision_data
from surgery_plugins.imagebind_llm.loading import load_official

import ibllm_files
from generate_runs import built, greedy, picture, refused, run  # LLaMA-Adapter's test folder: on sys.path

TINY = "imagebind_llm_tiny"


def cloud(path, seed: int, n: int = 300):
    np.save(path, np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32))
    return str(path)


def encoder_inputs(model, image: str, points: str, w_image: float, w_points: float) -> dict:
    vision, point = model.image_bind.config.modalities["vision"], model.image_bind.config.modalities["point"]
    return {"Image": [load_and_transform_vision_data([image], image_size=vision.input_size[-1]), w_image],
            "Point": [load_and_transform_point_cloud_data([points], num_points=point.input_size[0],
                                                          min_points=point.num_groups), w_points]}


def test_image_and_points_mixed_by_weight(tmp_path, monkeypatch, capsys):
    image, points = picture(tmp_path / "a.png", 1), cloud(tmp_path / "c.npy", 2)
    code, out, err = run(["--model", TINY, "--image", f"{image}:2", "--points", f"{points}:0.5",
                          "--prompt", "What is this?", "--temperature", "0", "--max-new-tokens", "8",
                          "--max-seq-len", "96"], monkeypatch, capsys)
    assert code == 0, err
    model = built(TINY, max_seq_len=96)
    expected = greedy(model, encoder_inputs(model, image, points, 2.0, 0.5), ["What is this?"], 8)[0]
    assert out.text == expected + "\n"
    assert len([w for w in out.writes if w.strip()]) > 1 and "tokens/s" in err
    # the weights matter: points alone write something else
    code, alone, _ = run(["--model", TINY, "--points", points, "--prompt", "What is this?", "--temperature", "0",
                          "--max-new-tokens", "8", "--max-seq-len", "96"], monkeypatch, capsys)
    assert code == 0 and alone.text != out.text


def test_k_cls_tokens_become_k_visual_tokens(tmp_path, monkeypatch, capsys):
    image, points = picture(tmp_path / "a.png", 3), cloud(tmp_path / "c.npy", 4)
    code, out, err = run(["--model", TINY, "--image", image, "--points", points, "--set", "num_cls_tokens.vision=4",
                          "--head-mode", "all", "--prompt", "look", "--raw", "--temperature", "0",
                          "--max-new-tokens", "10"], monkeypatch, capsys)
    assert code == 0, err
    assert "num_cls_tokens.vision 1 -> 4" in err
    model = built(TINY)
    model.image_bind.set_head_mode("all")
    surgery.resize(model, **{"num_cls_tokens.vision": 4})
    inputs = encoder_inputs(model, image, points, 1.0, 1.0)
    assert model.forward_visual(inputs).shape[1] == 4  # four visual tokens reach the LLaMA
    assert out.text == greedy(model, inputs, ["look"], 10, template=False)[0] + "\n"


def test_official_files(tmp_path, monkeypatch, capsys, tiny_tokenizer_path):
    files = ibllm_files.write_official(tmp_path / "files", tiny_tokenizer_path)
    image = picture(tmp_path / "a.png", 5)
    code, out, err = run(["--llama-dir", str(files.llama_dir), "--checkpoint", str(files.checkpoint),
                          "--imagebind", str(files.imagebind), "--imagebind-config", "tiny_w3d", "--image", image,
                          "--prompt", "a photo of", "--raw", "--temperature", "0", "--max-new-tokens", "8"],
                         monkeypatch, capsys)
    assert code == 0, err
    assert "shard 1 of 1" in err
    model = load_official(files.checkpoint, files.llama_dir, files.imagebind, imagebind="tiny_w3d")
    size = model.image_bind.config.modalities["vision"].input_size[-1]
    expected = greedy(model, {"Image": [load_and_transform_vision_data([image], image_size=size), 1]},
                      ["a photo of"], 8, template=False)[0]
    assert out.text == expected + "\n"


def test_weights_that_sum_to_zero(tmp_path, monkeypatch, capsys):
    image, points = picture(tmp_path / "a.png", 1), cloud(tmp_path / "c.npy", 2)
    line = refused(["--model", TINY, "--image", f"{image}:1", "--points", f"{points}:-1", "--prompt", "x"],
                   monkeypatch, capsys, tmp_path, 2)
    assert "weights sum to 0" in line


@pytest.mark.parametrize("make, says", [
    (lambda d: np.save(d / "flat.npy", np.zeros((300, 2), np.float32)), "flat.npy"),  # not (N, 3)
    (lambda d: np.save(d / "flat.npy", np.zeros((3, 3), np.float32)), "fewer than min_points"),
])
def test_a_point_cloud_it_cannot_read(make, says, tmp_path, monkeypatch, capsys):
    make(tmp_path)
    line = refused(["--model", TINY, "--points", str(tmp_path / "flat.npy"), "--prompt", "x"], monkeypatch, capsys,
                   tmp_path)
    assert says in line


def test_options_that_do_not_fit(tmp_path, monkeypatch, capsys):
    image = picture(tmp_path / "a.png", 1)
    line = refused(["--model", TINY, "--image", f"{image}:1", "--image", f"{image}:2", "--prompt", "x",
                    "--prompt", "y"], monkeypatch, capsys, tmp_path, 2)
    assert "one weight for all its files" in line
    line = refused(["--llama-dir", str(tmp_path), "--checkpoint", "7B.pth", "--clip", "c.pth", "--imagebind", "i.pth",
                    "--image", image, "--prompt", "x"], monkeypatch, capsys, tmp_path, 2)
    assert "official files take one encoder" in line


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is not None, reason="torchaudio is installed here")
def test_audio_without_torchaudio_says_so(tmp_path, monkeypatch, capsys):
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF....WAVE")
    line = refused(["--model", TINY, "--audio", str(wav), "--prompt", "x"], monkeypatch, capsys, tmp_path)
    assert "--audio" in line and "torchaudio" in line


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is None, reason="needs torchaudio")
def test_audio(tmp_path, monkeypatch, capsys):
    import torchaudio

    from surgery_plugins.imagebind.transforms import load_and_transform_audio_data

    wav = tmp_path / "a.wav"
    torchaudio.save(str(wav), torch.sin(torch.linspace(0, 2000, 16000 * 3))[None], 16000)
    code, out, err = run(["--model", TINY, "--audio", str(wav), "--prompt", "hear", "--raw", "--temperature", "0",
                          "--max-new-tokens", "6"], monkeypatch, capsys)
    assert code == 0, err
    model = built(TINY)
    bins, frames = model.image_bind.config.modalities["audio"].input_size
    audio = load_and_transform_audio_data([str(wav)], num_mel_bins=bins, target_length=frames)
    assert out.text == greedy(model, {"Audio": [audio, 1]}, ["hear"], 6, template=False)[0] + "\n"
