"""`surgery demo` (typed alone) and `surgery demo study`: the study's story, end to end on the tiny models.

The story runs once for the module (`surgery demo --out DIR`, as CI runs it, with the checkpoint
kept); the tests read its output against references computed here: the models' own greedy
`generate` on the same picture and prompt, the tensor shapes upstream's layout gives for the
configs, the drift recomputed from the two embeddings, the kept checkpoint's tensors and what it
loads into. A check that fails (a load that perturbs a weight) prints MISMATCH and exits 1.
"""

from __future__ import annotations

import contextlib
import io
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import surgery
from surgery.cli import main
from surgery.options import model_options
from surgery_plugins.imagebind_llm import commands, story
from surgery_plugins.llama_adapter.tokenizer import format_prompt

CAST = story.SIZES["tiny"]
VISION = "num_cls_tokens.vision"
SECTIONS = ["1. LLaMA-Adapter V2 generates (query_len=10, as released)",
            "2. Swap query_len at runtime: 10 -> 1 -> 64, generating at each",
            "3. ImageBind: num_cls_tokens.vision 1 -> 4, the vision head in mode 'all'",
            "4. ImageBind-LLM: 4 CLS tokens become 4 visual tokens in every adapted layer",
            "5. Run with the original state for a while",
            "6. Undo for good, and forward again",
            "7. Save, and load into a freshly built model",
            "8. The recipe: every change, replayable on a fresh model"]


@pytest.fixture(scope="module")
def told(tmp_path_factory):
    """`surgery demo --out DIR` once: (exit status, stdout, stderr, DIR)."""
    folder = tmp_path_factory.mktemp("story")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", "--out", str(folder)])
    return code, out.getvalue(), err.getvalue(), folder


def line_of(text: str, start: str) -> str:
    [line] = [ln for ln in text.splitlines() if ln.startswith(start)]
    return line


def test_demo_alone_tells_the_story_in_order_and_every_check_holds(told):
    code, out, err, _ = told
    assert code == 0, err
    positions = [out.find(f"\n{section}") for section in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), positions
    assert "MISMATCH" not in out and out.rstrip().endswith("all checks passed")
    # section 2's undo check and the five of the guarantees, each a torch.equal
    assert out.count(": bit-exact") == 6
    assert "gibberish" in out and "could not start ImageBind" in out  # the study, told honestly


def greedy(model, inputs, max_new: int = 16) -> str:
    prompt = format_prompt(story.INSTRUCTION)
    return model.generate(inputs, [prompt], max_gen_len=max_new, temperature=0)[0]


def test_llama_adapter_text_and_timing_at_each_query_len(told):
    _, out, _, _ = told
    torch.manual_seed(0)
    model = surgery.build(CAST.llama_adapter, **CAST.llama_adapter_kwargs)
    image = story.picture(model.config.clip.image_size)
    expected = {10: greedy(model, image)}
    with surgery.tokens(model, query_len=1):  # a truncation, as the story's first resize
        expected[1] = greedy(model, image)
    lines = [ln for ln in out.splitlines() if re.match(r"  query_len=\d+ ", ln)]
    assert [int(ln.split()[0].split("=")[1]) for ln in lines] == [10, 1, 64, 10]
    for line in lines:
        q = int(line.split()[0].split("=")[1])
        assert re.search(r"prefill +\d+\.\d ms +decode +\d+\.\d tokens/s", line), line
        if q in expected:
            assert line.endswith(repr(expected[q])), (line, expected[q])
    L, D = model.query_layer, model.config.dim
    for q in (10, 1, 64):  # upstream's layout: adapter_query (L*Q, D) seen as (L, Q, D)
        assert f"adapter_query.weight {(L * q, D)} seen as (query_layer, query_len, dim) = {(L, q, D)}" in out


def test_imagebind_tensors_embeddings_and_drift(told):
    _, out, _, _ = told
    torch.manual_seed(0)
    encoder = surgery.build(CAST.imagebind)
    cfg = encoder.config.modalities["vision"]
    D, E = cfg.embed_dim, encoder.config.out_embed_dim
    patches = math.prod(n // k for n, k in zip(cfg.input_size, cfg.kernel_size))  # stride = kernel (upstream)
    assert re.search(rf"vision\.cls_token +\(1, 1, {D}\) +-> +\(1, 4, {D}\)", out)
    assert re.search(rf"vision\.pos_embedding_helper\.pos_embed +\(1, {1 + patches}, {D}\) +-> "
                     rf"+\(1, {4 + patches}, {D}\)", out)
    assert f"-> embedding (1, {E}) (normalised)" in out and f"embedding (1, 4, {E}): one per CLS token" in out

    image = story.picture(cfg.input_size[-1])
    with torch.no_grad():
        before = encoder({"vision": image})["vision"]
        surgery.resize(encoder, **{VISION: 4})
        surgery.set_options(encoder, head_mode={"vision": "all"})
        token0 = encoder({"vision": image})["vision"][:, 0]
    cos = float((before * token0).sum() / (before.norm() * token0.norm()))
    drift = line_of(out, "  drift of token 0 against the original embedding")
    shown_cos, shown_max = re.search(r"cosine (-?[\d.]+), max \|diff\| ([\d.e-]+)", drift).groups()
    assert float(shown_cos) == pytest.approx(cos, abs=1e-4)
    assert float(shown_max) == pytest.approx(float((token0 - before).abs().max()), rel=1e-2)
    assert 0 < float(shown_max)  # the new CLS tokens take part in attention: token 0 moves


def test_imagebind_llm_reads_four_visual_tokens_and_generates_its_own_text(told):
    _, out, _, _ = told
    torch.manual_seed(0)
    model = surgery.build(CAST.imagebind_llm, **CAST.imagebind_llm_kwargs)
    image = story.picture(model.image_bind.config.modalities["vision"].input_size[-1])
    inputs = {"Image": [image, 1.0]}
    first = greedy(model, inputs)
    surgery.resize(model, **{VISION: 4})
    surgery.set_options(model, head_mode={"vision": "all"})
    four = greedy(model, inputs)
    assert line_of(out, f"  {VISION}=1 ").endswith(repr(first))
    assert line_of(out, f"  {VISION}=4 ").endswith(repr(four))
    D, H, L = model.config.dim, model.config.n_heads, model.query_layer
    assert f"visual tokens (1, 1, {D}) (B, K, dim)" in out and f"visual tokens (1, 4, {D}) (B, K, dim)" in out
    # upstream's adapter attention over K tokens: keys (B, heads, head dim, K), values (B, heads, K, head dim)
    assert (f"each of the {L} adapted layers attends over 4 visual tokens: yes: keys (1, {H}, {D // H}, 4)"
            f" (B, heads, head dim, K), values (1, {H}, 4, {D // H})") in out


def test_the_kept_checkpoint_is_the_changed_model(told):
    code, out, _, folder = told
    [path] = folder.iterdir()
    assert path.name == f"{CAST.imagebind_llm}_{VISION}4.safetensors" and str(path) in out
    tensors = load_file(str(path))
    width = surgery.build(CAST.imagebind).config.modalities["vision"].embed_dim
    assert tuple(tensors["image_bind.modality_preprocessors.vision.cls_token"].shape) == (1, 4, width)
    fresh = surgery.build(CAST.imagebind_llm, **CAST.imagebind_llm_kwargs)
    surgery.load(str(path), fresh)
    assert surgery.counts(fresh)[VISION] == 4 and model_options(fresh)["head_mode"]["vision"] == "all"
    recipe = out[out.index(SECTIONS[-1]):]
    assert "num_cls_tokens.vision: 1 -> 4" in recipe and "option head_mode: vision first -> all" in recipe


def test_the_printed_code_runs_as_written(told):
    """Section 4's lines (`>>> model = surgery.build(...)`, `>>> surgery.resize(...)`, ...) give the
    state the story reports when run as printed."""
    _, out, _, _ = told
    section = out[out.index(SECTIONS[3]):out.index(SECTIONS[4])]
    code = [ln.split(">>> ", 1)[1] for ln in section.splitlines()
            if ln.startswith(("  >>> model = surgery.build(", "  >>> surgery."))]
    assert len(code) == 3, code
    namespace = {"surgery": surgery}
    for line in code:
        exec(line, namespace)
    model = namespace["model"]
    assert surgery.counts(model)[VISION] == 4 and model_options(model)["head_mode"]["vision"] == "all"
    assert model.config.max_seq_len == CAST.imagebind_llm_kwargs["max_seq_len"]


def test_a_failed_check_prints_mismatch_and_exits_1(capsys, monkeypatch):
    load = surgery.load

    def load_then_perturb(path, model, *args, **kwargs):
        result = load(path, model, *args, **kwargs)
        with torch.no_grad():
            model.prefix_query.weight[0, 0] += 1.0  # one weight of the loaded model differs from the saved one
        return result

    monkeypatch.setattr(surgery, "load", load_then_perturb)
    code = main(["demo", "study", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "    loaded model's output equals the saved model's: MISMATCH" in out
    assert out.rstrip().endswith("1 check(s) failed: loaded model's output equals the saved model's")
    assert "all checks passed" not in out


@pytest.mark.parametrize("argv, status, mentions", [
    (["demo", "study", "--max-new-tokens", "1"], 2, "--max-new-tokens must be at least 2"),
    (["demo", "study", "--size", "huge"], 2, "invalid choice: 'huge'"),
    (["demo", "--model", "vit_tiny_test", "study"], 2, "--model and --set choose the single-model walk"),
    (["demo", "--set", "reg_tokens=2", "study"], 2, "--model and --set choose the single-model walk"),
])
def test_bad_options_are_one_line(capsys, argv, status, mentions):
    code = main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == status and len(lines) == 1 and mentions in lines[0] and "Traceback" not in err, err


def test_without_the_plugins_it_needs_the_story_is_one_line_before_any_output(capsys, monkeypatch):
    models = dict(surgery.get_host().models)
    del models[CAST.llama_adapter]  # as if SURGERY_PLUGINS had left out the llama_adapter_v2 plugin
    monkeypatch.setattr(surgery.get_host(), "models", models)
    code = main(["demo", "study"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert CAST.llama_adapter in err and "llama_adapter_v2, imagebind and imagebind_llm plugins" in err


def test_an_existing_checkpoint_in_out_is_refused_before_any_work(capsys, tmp_path):
    kept = tmp_path / f"{CAST.imagebind_llm}_{VISION}4.safetensors"
    kept.write_bytes(b"mine")
    code = main(["demo", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and "already exists" in err and out == ""
    assert kept.read_bytes() == b"mine" and list(tmp_path.iterdir()) == [kept]


def test_the_sizes_are_the_command_options_and_name_registered_models():
    assert tuple(story.SIZES) == commands.STORY_SIZES
    models = surgery.get_host().models
    for cast in story.SIZES.values():
        assert {cast.llama_adapter, cast.imagebind, cast.imagebind_llm} <= set(models)
