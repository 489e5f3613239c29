"""`surgery embed` end to end on the tiny registered ImageBind models, with tiny input files written
here. What it writes must be the model's own forward on the same inputs, prepared by the plugin's
loaders called directly; the printed cosine matrix must be torch's cosine similarity of those;
bad input is one line on stderr, a non-zero exit, and nothing written."""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import sys
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import surgery
from surgery.cli import main
from surgery_plugins.imagebind.point_loading import load_and_transform_point_cloud_data
from surgery_plugins.imagebind.tokenizer import BPETokenizer
from surgery_plugins.imagebind.transforms import load_and_transform_text, load_and_transform_vision_data

TINY, TINY_W3D = "imagebind_tiny_test", "imagebind_tiny_w3d_test"
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>"]  # 512 + 6 + 2 = the tiny text vocabulary (520)


def run(argv, capsys):
    code = main(["embed", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def built(name=TINY, seed=0):
    """The registered model as the command builds it: random weights drawn from --seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return surgery.build(name)


def picture(path, seed, size=(40, 52)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def array(path, shape, seed):
    np.save(path, np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    return str(path)


def vocab(folder, merges=MERGES):
    path = folder / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(path)


def cosine_printed(out, n):
    """The n x n matrix under the 'cosine similarity' line, as printed."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("cosine similarity"))
    rows = lines[start + 2:start + 2 + n]
    return torch.tensor([[float(v) for v in row.split()[-n:]] for row in rows], dtype=torch.float64)


def torch_cosine(vectors):
    v = torch.cat(vectors).double()
    return F.cosine_similarity(v[:, None, :], v[None, :, :], dim=-1)


def snapshot(folder):
    return {p: (os.path.getmtime(p), os.path.getsize(p)) for p in (os.path.join(folder, f) for f in os.listdir(folder))}


def refused(argv, capsys, folder, code=1):
    """The command fails with one error line and leaves the folder exactly as it was."""
    before = snapshot(folder)
    got, out, err = run(argv, capsys)
    assert got == code, err
    assert out == "" and snapshot(folder) == before
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("surgery: error: "), err
    return err.strip()


def test_embeddings_are_the_models_forward_with_k_vision_tokens(tmp_path, capsys):
    images = [picture(tmp_path / "a.png", 1), picture(tmp_path / "b.png", 2)]
    depth = array(tmp_path / "depth.npy", (32, 32), 3)
    thermal = array(tmp_path / "thermal.npy", (1, 32, 32), 4)
    imu = array(tmp_path / "imu.npy", (6, 64), 5)
    texts = ["the cat", "a dog"]
    out = tmp_path / "emb.safetensors"
    code, printed, err = run(["--model", TINY, "--image", *images, "--depth", depth, "--thermal", thermal,
                              "--imu", imu, "--text", *texts, "--bpe-vocab", vocab(tmp_path),
                              "--set", "num_cls_tokens.vision=2", "--head-mode", "vision=all", "-o", str(out)],
                             capsys)
    assert code == 0, err

    model = built()
    surgery.resize(model, **{"num_cls_tokens.vision": 2})
    model.set_head_mode({"vision": "all"})
    tok = BPETokenizer(vocab(tmp_path), context_length=model.config.modalities["text"].context_length)
    inputs = {"vision": load_and_transform_vision_data(images, image_size=56),
              "depth": torch.from_numpy(np.load(depth))[None, None],
              "thermal": torch.from_numpy(np.load(thermal))[None],
              "imu": torch.from_numpy(np.load(imu))[None],
              "text": load_and_transform_text(texts, tok)}
    with torch.no_grad():
        expected = model(inputs)
    keys = {"image": "vision", "depth": "depth", "thermal": "thermal", "imu": "imu", "text": "text"}
    with safe_open(str(out), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert set(written) == set(keys)
    assert written["image"].shape == (2, 2, 24) and written["text"].shape == (2, 24)
    for key, modality in keys.items():
        torch.testing.assert_close(written[key], expected[modality], rtol=0, atol=1e-6)
    assert json.loads(meta["inputs"])["image"] == images and json.loads(meta["head_mode"])["vision"] == "all"
    assert json.loads(meta["counts"])["num_cls_tokens.vision"] == 2

    # seven inputs: the cosine matrix of the image's mean over its 2 embeddings, and the others' own
    vectors = [expected["vision"].mean(dim=1)] + [expected[m] for m in ("depth", "thermal", "imu", "text")]
    printed_matrix = cosine_printed(printed, 7)
    torch.testing.assert_close(printed_matrix, torch_cosine(vectors), rtol=0, atol=5.1e-4)
    assert "a.png" in printed and '"the cat"' in printed and "k=2" in printed
    assert "num_cls_tokens.vision 1 -> 2" in printed


def test_points_and_mean_heads_into_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    clouds = [tmp_path / "a.npy", tmp_path / "b.xyz"]
    np.save(clouds[0], rng.standard_normal((100, 3)).astype(np.float32))
    np.savetxt(clouds[1], rng.standard_normal((80, 3)))
    image = picture(tmp_path / "c.png", 7)
    out = tmp_path / "emb.npz"
    code, printed, err = run(["--model", TINY_W3D, "--points", *map(str, clouds), "--image", image,
                              "--head-mode", "mean", "-o", str(out)], capsys)
    assert code == 0, err
    model = built(TINY_W3D)
    with torch.no_grad():
        expected = model({"point": load_and_transform_point_cloud_data(clouds, num_points=64, min_points=8),
                          "vision": load_and_transform_vision_data([image], image_size=56)}, head_mode="mean")
    with np.load(out) as written:
        assert sorted(written.files) == ["image", "points"]
        torch.testing.assert_close(torch.from_numpy(written["points"]), expected["point"], rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(written["image"]), expected["vision"], rtol=0, atol=1e-6)
    vectors = [expected["vision"], expected["point"]]  # the summary lists inputs in the options' order
    torch.testing.assert_close(cosine_printed(printed, 3), torch_cosine(vectors), rtol=0, atol=5.1e-4)


def test_npy_of_one_input_and_force(tmp_path, capsys):
    image = picture(tmp_path / "a.png", 1)
    out = tmp_path / "emb.npy"
    out.write_bytes(b"old")
    refused(["--model", TINY, "--image", image, "-o", str(out)], capsys, tmp_path, code=2)
    assert out.read_bytes() == b"old"
    code, _, err = run(["--model", TINY, "--image", image, "--seed", "3", "--force", "-o", str(out)], capsys)
    assert code == 0, err
    with torch.no_grad():
        expected = built(seed=3)({"vision": load_and_transform_vision_data([image], image_size=56)})["vision"]
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=0, atol=1e-6)


def test_weights_from_a_saved_file_and_an_official_layout(tmp_path, capsys):
    image = picture(tmp_path / "a.png", 1)
    model = built(seed=5)
    surgery.resize(model, **{"num_cls_tokens.vision": 3})
    saved = tmp_path / "ib.safetensors"
    surgery.save(model, saved)
    official = tmp_path / "imagebind_tiny.pth"
    torch.save(built(seed=6).state_dict(), official)  # a plain state dict: the plugin recognises its layout
    with torch.no_grad():
        pixels = load_and_transform_vision_data([image], image_size=56)
        expected = {saved: model({"vision": pixels})["vision"], official: built(seed=6)({"vision": pixels})["vision"]}
    for weights, want in expected.items():
        out = tmp_path / f"{weights.stem}.npy"
        code, printed, err = run(["--weights", str(weights), "--image", image, "-o", str(out)], capsys)
        assert code == 0, err
        torch.testing.assert_close(torch.from_numpy(np.load(out)), want, rtol=0, atol=1e-6)
        assert TINY in printed


def test_video_clips_from_an_array(tmp_path, capsys):
    clips = tmp_path / "clips.npy"
    np.save(clips, np.random.default_rng(0).standard_normal((2, 3, 2, 56, 56)).astype(np.float32))
    out = tmp_path / "v.npy"
    code, _, err = run(["--model", TINY, "--video", str(clips), "-o", str(out)], capsys)
    assert code == 0, err
    with torch.no_grad():
        expected = built()({"vision": torch.from_numpy(np.load(clips))[None]})["vision"]  # (1, 2 clips, ...)
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=0, atol=1e-6)


def test_video_files_are_decoded_with_pyav(tmp_path, capsys):
    av = pytest.importorskip("av")
    from surgery_plugins.imagebind.transforms import video_clips

    path = tmp_path / "moving.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(24):
            pixels = np.zeros((48, 64, 3), np.uint8)
            pixels[:, 2 * i:2 * i + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        frames = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))
    out = tmp_path / "v.npy"
    code, _, err = run(["--model", TINY, "--video", str(path), "-o", str(out)], capsys)
    assert code == 0, err
    with torch.no_grad():
        expected = built()({"vision": video_clips(frames, 8, size=56)[None]})["vision"]
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=0, atol=1e-6)


def test_a_video_file_without_pyav_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails as where PyAV is not installed
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00 ftypisom")
    line = refused(["--model", TINY, "--video", str(tmp_path / "clip.mp4"), "-o", str(tmp_path / "v.npy")],
                   capsys, tmp_path)
    assert "PyAV" in line and "pip install av" in line


def test_audio_from_a_wav_file(tmp_path, capsys):
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:  # 1.5 s of a 440 Hz tone at 16 kHz
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 16000)))
                               for i in range(24000)))
    out = tmp_path / "a.npy"
    try:
        import torchaudio  # noqa: F401
    except ModuleNotFoundError:
        line = refused(["--model", TINY, "--audio", str(path), "-o", str(out)], capsys, tmp_path)
        assert "--audio" in line and "torchaudio" in line
        return
    from surgery_plugins.imagebind.transforms import load_and_transform_audio_data

    code, _, err = run(["--model", TINY, "--audio", str(path), "-o", str(out)], capsys)
    assert code == 0, err
    with torch.no_grad():
        mels = load_and_transform_audio_data([path], num_mel_bins=36, target_length=46)
        expected = built()({"audio": mels})["audio"]
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra, code, words", [
    (["--image", "{bad}"], 1, ["bad.png", "not an image"]),
    (["--image", "{missing}"], 1, ["no such file"]),
    (["--image", "{a}", "--head-mode", "vision=sideways"], 2, ["--head-mode", "first, mean, all"]),
    (["--image", "{a}", "--head-mode", "point=all"], 1, ["'point'", "vision, text"]),
    (["--image", "{a}", "--head-mode", "text=all"], 1, ["text", "end-of-text"]),
    (["--image", "{a}", "--set", "num_cls_tokens.sound=2"], 1, ["num_cls_tokens.sound", "num_cls_tokens.vision"]),
    (["--image", "{a}", "--set", "num_cls_tokens.text=1"], 1, ["text"]),
    (["--image", "{a}", "-o", "{dir}/emb.txt"], 2, ["'.txt'", ".safetensors, .npz, .npy"]),
    (["--image", "{a}", "--batch-size", "0"], 2, ["--batch-size", ">= 1"]),
    (["--image", "{a}", "--depth", "{depth}", "-o", "{dir}/emb.npy"], 2, [".npy", ".safetensors or .npz"]),
    (["--points", "{depth}"], 1, ["--points", "no point encoder", TINY_W3D]),
    (["--depth", "{a}"], 1, ["--depth", ".npy or .pt"]),
    (["--imu", "{depth}"], 1, ["--imu", "(6, L)"]),
    (["--text", "a cat", "--bpe-vocab", "{vocab7}"], 1, ["521", "520"]),
    ([], 2, ["at least one input", "--image FILE"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, code, words):
    (tmp_path / "bad.png").write_bytes(b"not a picture at all")
    names = {"bad": str(tmp_path / "bad.png"), "missing": str(tmp_path / "none.png"), "dir": str(tmp_path),
             "a": picture(tmp_path / "a.png", 1), "depth": array(tmp_path / "d.npy", (32, 32), 1),
             "vocab7": vocab(tmp_path, [*MERGES, "a </w>"])}
    argv = ["--model", TINY, *[e.format(**names) for e in extra]]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "emb.safetensors")]
    line = refused(argv, capsys, tmp_path, code)
    assert all(w in line for w in words), line


def test_the_model_must_be_named_and_be_imagebind(tmp_path, capsys):
    image = picture(tmp_path / "a.png", 1)
    out = str(tmp_path / "e.npy")
    assert TINY in refused(["--image", image, "-o", out], capsys, tmp_path, code=2)
    assert "timm_vit" in refused(["--model", "vit_tiny_test", "--image", image, "-o", out], capsys, tmp_path, code=2)
    assert "--weights" in refused(["--model", "imagebind_huge", "--image", image, "-o", out], capsys, tmp_path)


def test_more_than_16_inputs_in_batches_print_no_matrix(tmp_path, capsys):
    images = [picture(tmp_path / f"{i}.png", i, size=(8, 8)) for i in range(17)]
    code, printed, err = run(["--model", TINY, "--image", *images, "--batch-size", "5", "-o", str(tmp_path / "e.npy")],
                             capsys)
    assert code == 0, err
    assert "(17, 24)" in printed and "cosine" not in printed
    with torch.no_grad():  # encoded 5 at a time: each input's embedding is its own, whatever its batch
        expected = built()({"vision": load_and_transform_vision_data(images, image_size=56)})["vision"]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "e.npy")), expected, rtol=0, atol=1e-5)


def test_heads_go_to_first_before_the_counts_change(tmp_path, capsys):
    # a file saved with the vision head in mode 'all' (which keeps its count >= 1) goes to 0 tokens
    model = built()
    model.set_head_mode({"vision": "all"})
    surgery.save(model, tmp_path / "all.safetensors")
    image = picture(tmp_path / "a.png", 1)
    code, printed, err = run(["--weights", str(tmp_path / "all.safetensors"), "--image", image, "--set",
                              "num_cls_tokens.vision=0", "--head-mode", "vision=first", "-o", str(tmp_path / "e.npy")],
                             capsys)
    assert code == 0, err
    model.set_head_mode({"vision": "first"})
    surgery.resize(model, **{"num_cls_tokens.vision": 0})
    with torch.no_grad():
        expected = model({"vision": load_and_transform_vision_data([image], image_size=56)})["vision"]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "e.npy")), expected, rtol=0, atol=1e-6)
    assert "num_cls_tokens.vision 1 -> 0" in printed and "vision head: all -> first" in printed


def test_the_readme_and_help_examples_run_as_written(tmp_path, monkeypatch, capsys):
    import re
    import shlex
    import subprocess
    from readme_blocks import bash_lines

    lines = bash_lines("surgery embed")
    assert main(["embed", "--help"]) == 0
    lines.append(re.search(r"example: (surgery embed .*)", capsys.readouterr().out).group(1))
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "python":
            assert subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, timeout=120).returncode == 0, line
            continue
        assert argv[:2] == ["surgery", "embed"], line
        code, printed, err = run([*argv[2:], "--force"], capsys)
        assert code == 0, (line, err)
        out = argv[argv.index("-o") + 1]
        with safe_open(out, "pt") as f:
            assert f.get_tensor("image").shape == (1, 2, 24)
        assert "(1, 2, 24)" in printed
        ran += 1
    assert ran == 2
