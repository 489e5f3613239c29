"""ImageBindLLM against the reference of upstream's ImageBind-LLM (reference.py): the bridge in both
forms, the weighted sum of every modality, one visual token (the gated-bias branch) and k of them
(the gated softmax), inference, generation, the training loss and trainable sets, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from surgery.errors import ModelConfigError, ModelInputError
from surgery_plugins.imagebind.plugin import example_inputs as encoder_inputs
from surgery_plugins.imagebind_llm.config import ImageBindLLMConfig
from surgery_plugins.imagebind_llm.model import ImageBindLLM
from ibllm_reference import RefImageBindLLM
from test_llama import randomize

TIGHT = dict(rtol=1e-5, atol=1e-5)
PROMPTS = [[1, 17, 42, 99, 7, 123], [1, 5, 160]]  # left-aligned, different lengths
UPSTREAM_NAMES = {"vision": "Image", "text": "Text", "audio": "Audio", "depth": "Depth", "thermal": "Thermal",
                  "imu": "Imu", "point": "Point"}
CLS_MODALITIES = ("vision", "audio", "depth", "thermal", "imu", "point")  # each can give k tokens


def tiny(seed=0, **overrides) -> ImageBindLLM:
    """The tiny model with every LLaMA, bridge and prefix parameter random (gates, biases and LoRA
    included, so every branch counts); the encoder keeps its own init."""
    torch.manual_seed(seed)
    model = ImageBindLLM(ImageBindLLMConfig.named("tiny", **overrides))
    for name, child in model.named_children():
        if name != "image_bind":
            randomize(child, seed)
    return model.eval()


def raw_inputs(model, B=2):
    (encoded,) = encoder_inputs(model.image_bind, B)
    return encoded  # {modality: tensor}


def upstream_inputs(model, modalities=("vision",), weights=None, B=2):
    encoded = raw_inputs(model, B)
    weights = weights or [1] * len(modalities)
    return {UPSTREAM_NAMES[m]: [encoded[m], w] for m, w in zip(modalities, weights)}


def text(B=2, T=9, seed=4):
    return torch.randint(3, 200, (B, T), generator=torch.Generator().manual_seed(seed))


# -- structure --------------------------------------------------------------------------------------


def test_released_architecture_has_upstreams_keys_and_shapes():
    with torch.device("meta"):
        model = ImageBindLLM(ImageBindLLMConfig.named("7b"))
    sd = model.state_dict()
    assert sd["image_bind_proj.weight"].shape == (4096, 1024) and sd["image_bind_proj.bias"].shape == (4096,)
    for k in (1, 2, 3):
        assert sd[f"image_bind_norm_{k}.weight"].shape == (4096,) and f"image_bind_norm_{k}.bias" not in sd
        assert sd[f"image_bind_f1_{k}.weight"].shape == (16384, 4096) and f"image_bind_f1_{k}.bias" not in sd
        assert sd[f"image_bind_f2_{k}.weight"].shape == (4096, 16384)
        assert sd[f"image_bind_f3_{k}.weight"].shape == (16384, 4096)
    assert sd["prefix_query.weight"].shape == (32, 4096)
    bridge = sum(v.numel() for k, v in sd.items() if k.startswith("image_bind_"))
    # about 608M: image_bind_proj and three SwiGLU blocks of 4096 <-> 16384, as OpenGVLab/LLaMA-Adapter
    # imagebind_LLM/llama/llama_adapter.py builds them
    assert 600e6 < bridge < 610e6
    layer0 = {k[len("llama.layers.0."):] for k in sd if k.startswith("llama.layers.0.")}
    assert {"attention.gate", "attention.wq.bias", "attention.wo.bias", "feed_forward.w1.bias",
            "attention.lora_wq_l1.weight", "feed_forward.lora_w2_l2.weight"} <= layer0
    assert "attention.new_gate" not in layer0 and sd["llama.layers.0.attention.gate"].shape == (1, 32, 1, 1)
    assert sd["llama.tok_embeddings.weight"].shape == (32000, 4096)


def test_phase_and_legacy_bridge_shape_the_model():
    with torch.device("meta"):
        pretrain = ImageBindLLM(ImageBindLLMConfig.named("7b", phase="pretrain")).state_dict()
        legacy = ImageBindLLM(ImageBindLLMConfig.named("7b", legacy_bridge=True)).state_dict()
    assert not any("lora" in k or (k.startswith("llama.") and k.endswith(".bias")) for k in pretrain)
    assert legacy["image_bind_norm_1.bias"].shape == (4096,) and legacy["image_bind_f2_3.bias"].shape == (4096,)


# -- the visual path --------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy_bridge", [False, True], ids=["rmsnorm", "legacy"])
def test_forward_visual_matches_reference(legacy_bridge):
    model = tiny(legacy_bridge=legacy_bridge)
    inputs = upstream_inputs(model)
    with torch.no_grad():
        ours = model.forward_visual(inputs)
        expected = RefImageBindLLM(model).forward_visual(inputs)
    assert ours.shape == (2, 1, 64)
    torch.testing.assert_close(ours, expected, **TIGHT)


def test_every_modality_weighted_by_its_share_of_the_sum():
    model = tiny()
    modalities = tuple(model.image_bind.modalities)
    assert modalities == ("vision", "text", "audio", "depth", "thermal", "imu", "point")
    inputs = upstream_inputs(model, modalities, weights=[1, 0.5, 2, 1, 0.25, 3, 1.5])
    with torch.no_grad():
        ours = model.forward_visual(inputs)
        expected = RefImageBindLLM(model).forward_visual(inputs)
        scaled = model.forward_visual({k: [x, 10 * w] for k, (x, w) in inputs.items()})  # only shares count
    torch.testing.assert_close(ours, expected, **TIGHT)
    torch.testing.assert_close(scaled, ours, rtol=1e-4, atol=1e-4)
    # each modality counts: dropping one changes the result
    alone = {k: v for k, v in inputs.items() if k != "Point"}
    assert not torch.allclose(model.forward_visual(alone).detach(), ours.detach(), atol=1e-3)


def test_input_names_are_upstreams_or_imagebinds_any_case():
    model = tiny()
    x = raw_inputs(model)["vision"]
    with torch.no_grad():
        a = model.forward_visual({"Image": [x, 1]})
        for name in ("Video", "vision", "IMAGE"):
            torch.testing.assert_close(model.forward_visual({name: [x, 1]}), a, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_visual({"image": x}), a, rtol=0, atol=0)  # a bare tensor: weight 1


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("modality", CLS_MODALITIES)
def test_k_cls_tokens_become_k_visual_tokens_as_the_reference(modality, k):
    model = tiny(num_cls_tokens={modality: k}, head_mode={modality: "all"})
    other = "text"  # one token (its end-of-text), added to each of the k
    inputs = upstream_inputs(model, (modality, other), weights=[1, 0.5])
    tok = text()
    ref = RefImageBindLLM(model)
    with torch.no_grad():
        visual = model.forward_visual(inputs)
        expected = ref.forward_visual(inputs)
        assert visual.shape == (2, k, 64)
        torch.testing.assert_close(visual, expected, **TIGHT)
        ref.llama.eval_cache(2, torch.float32)
        logits_ref = ref.forward_inference(expected, tok, 0)
        for adapter_kv in (None, model.adapter_kv(visual)):
            logits = model.forward_inference(visual, tok, 0, adapter_kv=adapter_kv,
                                             kv_caches=model.llama.new_kv_caches(2, torch.float32, "cpu"))
            torch.testing.assert_close(logits, logits_ref, **TIGHT)
    kv = model.adapter_kv(visual)
    assert kv[0].v.shape == (2, 4, k, 16)
    assert (kv[0].k_t is None) == (k == 1)  # one token: the gated bias; more: the gated softmax needs keys


def test_one_token_in_mode_all_is_upstreams_first_token():
    first = tiny()
    every = tiny(head_mode={"vision": "all"})
    inputs = upstream_inputs(first)
    with torch.no_grad():
        torch.testing.assert_close(every.forward_visual(inputs), first.forward_visual(inputs), **TIGHT)


def test_modalities_with_different_token_counts():
    model = tiny(num_cls_tokens={"vision": 4, "audio": 2}, head_mode={"vision": "all", "audio": "all"})
    inputs = upstream_inputs(model, ("vision", "audio", "depth"))
    with pytest.raises(ModelInputError, match=r"different numbers of visual tokens \(Image 4, Audio 2, Depth 1\)"):
        model.forward_visual(inputs)
    model.image_bind.set_head_mode({"audio": "mean"})  # audio now gives one token: added to vision's four
    with torch.no_grad():
        torch.testing.assert_close(model.forward_visual(inputs), RefImageBindLLM(model).forward_visual(inputs),
                                   **TIGHT)


# -- inference and generation -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
def test_forward_inference_step_by_step_matches_reference(k):
    model = tiny(num_cls_tokens={"vision": k}, head_mode="all")
    inputs, tok = upstream_inputs(model), text(T=9)
    ref = RefImageBindLLM(model)
    ref.llama.eval_cache(2, torch.float32)
    with torch.no_grad():
        visual = model.forward_visual(inputs)
        kv = model.adapter_kv(visual)
        for start, end in ((0, 6), (6, 7), (7, 8), (8, 9)):  # prefill, then one position at a time
            expected = ref.forward_inference(visual, tok[:, start:end], start)
            torch.testing.assert_close(model.forward_inference(visual, tok[:, start:end], start), expected, **TIGHT)
        fresh = model.llama.new_kv_caches(2, torch.float32, "cpu")  # the same steps through adapter_kv
        for start, end in ((0, 6), (6, 7), (7, 8), (8, 9)):
            out = model.forward_inference(visual, tok[:, start:end], start, adapter_kv=kv, kv_caches=fresh)
        torch.testing.assert_close(out, expected, **TIGHT)


def ref_step(model, visual, tokens):
    ref = RefImageBindLLM(model)
    ref.llama.eval_cache(tokens.shape[0], torch.float32)
    return ref.forward_inference(visual, tokens, 0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_generation_with_and_without_adapter_cache_is_the_reference(k):
    model = tiny(num_cls_tokens={"vision": k}, head_mode="all")
    inputs = upstream_inputs(model, ("vision", "text"), weights=[1, 1])
    cached = model.generate_tokens(inputs, PROMPTS, max_gen_len=10, temperature=0, cache_adapter=True)
    baseline = model.generate_tokens(inputs, PROMPTS, max_gen_len=10, temperature=0, cache_adapter=False)
    reference = RefImageBindLLM(model).generate(inputs, PROMPTS, max_gen_len=10)
    assert cached == baseline == reference
    assert [len(t) for t in cached] == [10, 10] and len(set(cached[0] + cached[1])) > 2  # not degenerate


def test_batch_of_two_equals_each_alone():
    model = tiny(num_cls_tokens={"vision": 2}, head_mode="all")
    encoded = raw_inputs(model)
    both = model.generate_tokens({"Image": [encoded["vision"], 1]}, PROMPTS, max_gen_len=8, temperature=0)
    alone = [model.generate_tokens({"Image": [encoded["vision"][i:i + 1], 1]}, [p], max_gen_len=8, temperature=0)[0]
             for i, p in enumerate(PROMPTS)]
    assert both == alone


def test_sampling_is_reproducible_and_cache_independent():
    model = tiny()
    inputs = upstream_inputs(model)

    def sample(cache_adapter, seed):
        return model.generate_tokens(inputs, PROMPTS, max_gen_len=8, temperature=1.0, top_p=0.9,
                                     cache_adapter=cache_adapter, generator=torch.Generator().manual_seed(seed))

    assert sample(True, 0) == sample(False, 0) == sample(True, 0)
    assert sample(True, 0) != sample(True, 1)


def test_string_prompts_are_tokenized_and_answers_decoded(tiny_tokenizer_path):
    from surgery_plugins.llama_adapter.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_tokenizer_path)
    torch.manual_seed(0)
    model = ImageBindLLM(ImageBindLLMConfig.named("tiny", vocab_size=-1), tokenizer).eval()
    assert model.llama.output.out_features == tokenizer.n_words
    prompts = ["describe this image", "what is in the picture ?"]
    inputs = upstream_inputs(model)
    answers = model.generate(inputs, prompts, max_gen_len=6, temperature=0)
    ids = model.generate_tokens(inputs, [tokenizer.encode(p, bos=True, eos=False) for p in prompts],
                                max_gen_len=6, temperature=0)
    assert answers == [tokenizer.decode(t) for t in ids]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generates_and_stays_close_to_float32(dtype):
    model = tiny(num_cls_tokens={"vision": 2}, head_mode="all")
    inputs, tok = upstream_inputs(model), text(T=8)
    half = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        full = model.forward_inference(model.forward_visual(inputs), tok, 0)
        visual = half.forward_visual(inputs)
        assert visual.dtype == dtype
        low = half.forward_inference(visual, tok, 0, adapter_kv=half.adapter_kv(visual))
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().max() / full.abs().max() < 0.1
    runs = [half.generate_tokens(inputs, PROMPTS, max_gen_len=5, temperature=0, cache_adapter=c) for c in (True, False)]
    assert runs[0] == runs[1] and [len(t) for t in runs[0]] == [5, 5]


# -- training ---------------------------------------------------------------------------------------


def test_training_loss_matches_reference_and_trains_the_phase_set():
    model = tiny(num_cls_tokens={"vision": 2}, head_mode="all").train()
    images = raw_inputs(model)["vision"]
    tokens = text(T=8)
    labels = tokens.clone()
    labels[:, :3] = 0  # the prompt part is ignored (label 0)
    loss, again = model(tokens, labels, images)
    assert loss is again
    expected = RefImageBindLLM(model).forward(tokens, labels, images)
    torch.testing.assert_close(loss, expected, **TIGHT)
    zero, _ = model(tokens, torch.zeros_like(labels), images)
    assert zero.item() == 0.0 and zero.requires_grad

    trained = model.set_trainable("pretrain")
    assert set(trained) == {n for n, _ in model.named_parameters()
                            if (n.startswith("llama.") and n.endswith(".gate")) or n.startswith("image_bind_")
                            or n == "prefix_query.weight"}
    model.zero_grad()
    model(tokens, labels, images)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)

    trained = model.set_trainable("finetune")
    assert trained and all(n.startswith("llama.") and ("norm" in n or "bias" in n or "lora" in n) for n in trained)
    assert "llama.layers.0.attention.lora_wq_l1.weight" in trained and "llama.norm.weight" in trained
    with pytest.raises(ModelConfigError, match="unknown phase 'warmup'"):
        model.set_trainable("warmup")


# -- bad input --------------------------------------------------------------------------------------


def _bad_inputs(model):
    x = raw_inputs(model)
    return {
        "unknown modality": ({"Smell": [x["vision"], 1]}, r"unknown modality 'Smell'; this model takes Image, Video"),
        "weights sum to zero": ({"Image": [x["vision"], 1], "Audio": [x["audio"], -1]}, "weights sum to 0"),
        "batch sizes differ": ({"Image": [x["vision"], 1], "Audio": [x["audio"][:1], 1]},
                               r"different batch sizes \(Image 2, Audio 1\)"),
        "not a pair": ({"Image": [x["vision"]]}, r"expected \[tensor, weight\]"),
        "weight not finite": ({"Image": [x["vision"], float("nan")]}, "weight must be a finite number"),
        "empty": ({}, "non-empty dict"),
        "point cloud not (B, N, 3)": ({"Image": [x["vision"], 1], "Point": [x["point"][..., :2], 1]},
                                      r"point: expected point clouds of shape \(B, N, 3\)"),
        "fewer points than groups": ({"Point": [x["point"][:, :4], 1]}, "a cloud of 4 points cannot make 8 groups"),
    }


BAD_INPUTS = ["unknown modality", "weights sum to zero", "batch sizes differ", "not a pair", "weight not finite",
              "empty", "point cloud not (B, N, 3)", "fewer points than groups"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_changes_nothing(case):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, message = _bad_inputs(model)[case]
    copies = {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in inputs.items()}
    with pytest.raises(ModelInputError, match=message):
        model.generate_tokens(inputs, PROMPTS[:1] * 2, max_gen_len=2, temperature=0)
    for k, v in inputs.items():  # the caller's inputs are untouched
        assert all(not isinstance(a, torch.Tensor) or torch.equal(a, b) for a, b in zip(v, copies[k]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_more_prompts_than_items_is_refused():
    model = tiny()
    with pytest.raises(ModelInputError, match="2 items for 1 prompts"):
        model.generate_tokens(upstream_inputs(model), PROMPTS[:1], max_gen_len=2, temperature=0)


# -- CUDA (skipped without a GPU) -------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_matches_cpu_and_generates_in_every_dtype():
    model = tiny(num_cls_tokens={"vision": 4}, head_mode="all")
    inputs, tok = upstream_inputs(model), text(T=8)
    expected = ref_step(model, model.forward_visual(inputs).detach(), tok)
    cpu_tokens = model.generate_tokens(inputs, PROMPTS, max_gen_len=8, temperature=0)
    gpu = copy.deepcopy(model).to("cuda")
    with torch.no_grad():
        visual = gpu.forward_visual(inputs)  # CPU inputs are moved to the encoder
        logits = gpu.forward_inference(visual, tok.cuda(), 0, adapter_kv=gpu.adapter_kv(visual))
    torch.testing.assert_close(logits.cpu(), expected, rtol=1e-3, atol=1e-3)
    assert gpu.generate_tokens(inputs, PROMPTS, max_gen_len=8, temperature=0) == cpu_tokens
    for dtype in (torch.bfloat16, torch.float16):
        half = copy.deepcopy(model).to("cuda", dtype)
        runs = [half.generate_tokens(inputs, PROMPTS, max_gen_len=8, temperature=0, cache_adapter=c)
                for c in (True, False)]
        assert runs[0] == runs[1] and [len(t) for t in runs[0]] == [8, 8]
