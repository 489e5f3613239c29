"""`surgery generate` with LLaMA-Adapter V2, end to end: a registered tiny model and tiny files in
the official layout. The text it streams must be the tokenizer's decoding of the model's own
greedy `generate_tokens` on the same inputs; bad input is one line on stderr, nothing written."""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.images import load_images
from surgery_plugins.llama_adapter.loading import load_official
from surgery_plugins.llama_adapter.tokenizer import Tokenizer

import official_files as of
from generate_runs import built, greedy, picture, refused, run

TINY = "llama_adapter_v2_tiny"


def test_streams_the_models_greedy_text(tmp_path, monkeypatch, capsys):
    image = picture(tmp_path / "a.png", 1)
    code, out, err = run(["--model", TINY, "--image", image, "--prompt", "Describe this image.",
                          "--temperature", "0", "--max-new-tokens", "9"], monkeypatch, capsys)
    assert code == 0, err
    expected = greedy(built(), load_images(image, 28), ["Describe this image."], 9)[0]
    assert out.text == expected + "\n"
    assert len([w for w in out.writes if w.strip()]) > 1  # written as it was decoded, not at the end
    assert "prefill" in err and "tokens/s" in err and "ms" in err


def test_raw_prompt_and_a_batch_print_each_answer(tmp_path, monkeypatch, capsys):
    a, b = picture(tmp_path / "a.png", 1), picture(tmp_path / "b.png", 2)
    prompts = ["a photo of", "the image shows"]
    code, out, err = run(["--model", TINY, "--image", a, "--image", b, "--prompt", prompts[0], "--prompt", prompts[1],
                          "--raw", "--temperature", "0", "--max-new-tokens", "6"], monkeypatch, capsys)
    assert code == 0, err
    expected = greedy(built(), load_images([a, b], 28), prompts, 6, template=False)
    assert out.text == f"[1] {expected[0]}\n[2] {expected[1]}\n"
    # one image for every prompt
    code, out, _ = run(["--model", TINY, "--image", a, "--prompt", prompts[0], "--prompt", prompts[1], "--raw",
                        "--temperature", "0", "--max-new-tokens", "6"], monkeypatch, capsys)
    assert code == 0
    assert out.text == "".join(f"[{i}] {t}\n" for i, t in
                               enumerate(greedy(built(), load_images([a, a], 28), prompts, 6, template=False), 1))


def test_set_resizes_the_model_first(tmp_path, monkeypatch, capsys):
    image = picture(tmp_path / "a.png", 3)
    args = ["--model", TINY, "--image", image, "--prompt", "cat", "--raw", "--temperature", "0",
            "--max-new-tokens", "12"]
    code, plain, _ = run(args, monkeypatch, capsys)
    assert code == 0
    code, resized, err = run([*args, "--set", "query_len=1", "--set", "query_layer=1"], monkeypatch, capsys)
    assert code == 0, err
    assert "query_len 3 -> 1" in err and "query_layer 3 -> 1" in err
    model = built()
    surgery.resize(model, query_len=1, query_layer=1)
    assert resized.text == greedy(model, load_images(image, 28), ["cat"], 12, template=False)[0] + "\n"
    assert resized.text != plain.text  # the counts change what it writes


def test_sampling_repeats_with_its_seed(tmp_path, monkeypatch, capsys):
    image = picture(tmp_path / "a.png", 4)
    args = ["--model", TINY, "--image", image, "--prompt", "x", "--raw", "--temperature", "1.5", "--top-p", "0.95",
            "--max-new-tokens", "12"]
    first = run([*args, "--seed", "3"], monkeypatch, capsys)[1].text
    assert run([*args, "--seed", "3"], monkeypatch, capsys)[1].text == first
    model = built(seed=3)
    tok = model.tokenizer
    ids = model.generate_tokens(load_images(image, 28), [tok.encode("x", bos=True, eos=False)], max_gen_len=12,
                                temperature=1.5, top_p=0.95, generator=torch.Generator().manual_seed(3))
    assert first == tok.decode(ids[0]) + "\n"


@pytest.fixture
def official(tmp_path, tiny_tokenizer_path):
    return of.write_official(tmp_path / "files", tiny_tokenizer_path, shards=2)


def test_official_files(official, tmp_path, monkeypatch, capsys):
    image = picture(tmp_path / "a.png", 5)
    code, out, err = run(["--llama-dir", str(official.llama_dir), "--checkpoint", str(official.adapter),
                          "--clip", str(official.clip), "--v-num-heads", "4", "--image", image,
                          "--prompt", "a photo of", "--raw", "--temperature", "0", "--max-new-tokens", "8"],
                         monkeypatch, capsys)
    assert code == 0, err
    assert "shard 1 of 2" in err and "shard 2 of 2" in err  # loading progress, a line per shard
    model = load_official(official.adapter, official.llama_dir, "7B", official.clip, v_num_heads=4)
    size = model.config.clip.image_size
    assert out.text == greedy(model, load_images(image, size), ["a photo of"], 8, template=False)[0] + "\n"


def test_a_missing_shard(official, tmp_path, monkeypatch, capsys):
    image = picture(tmp_path / "a.png", 5)
    (official.llama_dir / "7B" / "consolidated.00.pth").unlink()
    line = refused(["--llama-dir", str(official.llama_dir), "--checkpoint", str(official.adapter), "--clip",
                    str(official.clip), "--image", image, "--prompt", "x"], monkeypatch, capsys, tmp_path)
    assert "consolidated.00.pth" in line


def test_a_tokenizer_of_another_vocabulary(official, tmp_path, monkeypatch, capsys, tiny_tokenizer_path):
    image = picture(tmp_path / "a.png", 5)
    line = refused(["--model", TINY, "--tokenizer", str(tiny_tokenizer_path), "--image", image, "--prompt", "x"],
                   monkeypatch, capsys, tmp_path)
    assert f"has {Tokenizer(tiny_tokenizer_path).n_words} pieces but the model's vocabulary has 1000" in line
    # official files: the folder's tokenizer.model does not fit Meta's weights
    (official.llama_dir / "tokenizer.model").write_bytes(built().tokenizer.model_path.read_bytes())
    line = refused(["--llama-dir", str(official.llama_dir), "--checkpoint", str(official.adapter), "--clip",
                    str(official.clip), "--image", image, "--prompt", "x"], monkeypatch, capsys, tmp_path)
    rows = torch.load(official.llama_dir / "7B" / "consolidated.00.pth", weights_only=True)["tok_embeddings.weight"]
    assert (f"tok_embeddings.weight has {rows.shape[0]} vocabulary rows but {official.llama_dir / 'tokenizer.model'} "
            f"has 1000 pieces: the tokenizer is not this LLaMA's") in line


def test_an_image_that_cannot_be_decoded(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG but not really")
    line = refused(["--model", TINY, "--image", str(bad), "--prompt", "x"], monkeypatch, capsys, tmp_path)
    assert "bad.png" in line and "not an image" in line
    line = refused(["--model", TINY, "--image", str(tmp_path / "none.png"), "--prompt", "x"], monkeypatch, capsys,
                   tmp_path)
    assert "none.png: no such file" in line


@pytest.mark.parametrize("argv, says", [
    (["--audio", "{a}"], "unknown modality for LLaMA-Adapter V2: --audio; it takes --image"),
    (["--image", "{a}:0.5"], "does not mix inputs"),
    (["--image", "{a}", "--image", "{a}", "--image", "{a}"], "3 --image files for 1 prompts"),
    ([], "give --image FILE"),
    (["--image", "{a}", "--clip", "c.pth"], "--clip is for official files"),
    (["--image", "{a}", "--checkpoint", "c.pth"], "give one or the other"),
    (["--image", "{a}", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--image", "{a}", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_options(argv, says, tmp_path, monkeypatch, capsys):
    a = picture(tmp_path / "a.png", 1)
    line = refused(["--model", TINY, "--prompt", "x", *(v.format(a=a) for v in argv)], monkeypatch, capsys,
                   tmp_path, code=2)
    assert says in line


def test_a_model_without_weights_or_of_another_kind(tmp_path, monkeypatch, capsys):
    a = picture(tmp_path / "a.png", 1)
    line = refused(["--model", "llama_adapter_v2_7b", "--image", a, "--prompt", "x"], monkeypatch, capsys, tmp_path)
    assert "meta device" in line
    line = refused(["--model", "vit_tiny_test", "--image", a, "--prompt", "x"], monkeypatch, capsys, tmp_path, 2)
    assert "backbone 'timm_vit'" in line
    line = refused(["--llama-dir", str(tmp_path), "--checkpoint", "c.pth", "--image", a, "--prompt", "x"],
                   monkeypatch, capsys, tmp_path, 2)
    assert "need the encoder's weights: --clip FILE (LLaMA-Adapter V2)" in line


def test_a_prompt_longer_than_the_model_reads(tmp_path, monkeypatch, capsys):
    a = picture(tmp_path / "a.png", 1)
    line = refused(["--model", TINY, "--image", a, "--prompt", "describe every detail " * 10], monkeypatch, capsys,
                   tmp_path)
    assert "the model reads 64 positions" in line
    code, out, err = run(["--model", TINY, "--max-seq-len", "160", "--image", a, "--prompt",
                          "describe every detail " * 10, "--temperature", "0", "--max-new-tokens", "3"],
                         monkeypatch, capsys)
    assert code == 0, err


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import shlex
    import subprocess
    import sys
    from readme_blocks import bash_lines

    lines = bash_lines("surgery generate")
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "python":
            assert subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, timeout=120).returncode == 0, line
        else:
            assert argv[:2] == ["surgery", "generate"], line
            code, out, err = run(argv[2:], monkeypatch, capsys)
            assert code == 0 and out.text.endswith("\n") and "tokens/s" in err, (line, err)
            ran += 1
    assert ran == 2
