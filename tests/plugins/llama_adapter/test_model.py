"""LLaMAAdapter against a reference of upstream's LLaMA_adapter (OpenGVLab/LLaMA-Adapter
`llama_adapter_v2_multimodal7b/llama/llama_adapter.py`).

`RefAdapter` restates upstream's `forward_visual`, `forward`, `forward_inference` (adapters
recomputed at every step) and `generate` as functions of the model's state dict, on top of
test_llama's `RefLLaMA`, with timm 0.3.2's Block written out by hand. The CLIP tower is used as a
black box (it has its own tests). All weights are random, gates included, so every branch counts.
"""

from __future__ import annotations

import copy
import io
import math
import re
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery import ops
from surgery.errors import ModelConfigError, ModelInputError
from surgery_plugins.llama_adapter.clip import ClipVisionConfig
from surgery_plugins.llama_adapter.model import AdapterConfig, LLaMAAdapter
from official_files import KEYS
from test_llama import RefLLaMA, randomize, ref_mask

TIGHT = dict(rtol=1e-5, atol=1e-5)
PROMPTS = [[1, 17, 42, 99, 7, 123], [1, 5, 160]]  # left-aligned, different lengths


# -- the reference ----------------------------------------------------------------------------------


def ref_vit_block(sd, p, x, heads):
    """timm 0.3.2 Block: pre-LN (eps 1e-5), softmax attention, GELU MLP."""
    B, N, C = x.shape
    ln = lambda name, t: F.layer_norm(t, (C,), sd[p + name + ".weight"], sd[p + name + ".bias"], 1e-5)  # noqa: E731
    lin = lambda name, t: F.linear(t, sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
    qkv = lin("attn.qkv", ln("norm1", x)).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(dim=-1)
    x = x + lin("attn.proj", (attn @ v).transpose(1, 2).reshape(B, N, C))
    return x + lin("mlp.fc2", F.gelu(lin("mlp.fc1", ln("norm2", x))))


class RefAdapter:
    def __init__(self, model: LLaMAAdapter):
        self.sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.cfg = model.config
        self.clip = model.clip  # black box
        self.query_len, self.query_layer = model.query_len, model.query_layer
        self.llama = RefLLaMA(self.sd, self.cfg.llama_args(), prefix="llama.")

    def ln(self, name, x):
        return F.layer_norm(x, x.shape[-1:], self.sd[name + ".weight"], self.sd[name + ".bias"], 1e-5)

    def lin(self, name, x):
        return F.linear(x, self.sd[name + ".weight"], self.sd[name + ".bias"])

    def forward_visual(self, imgs):
        clip_feats = self.ln("clip_proj_norm", self.lin("clip_proj", self.clip(imgs).float()))
        visual_query = self.sd["visual_query.weight"].unsqueeze(0).repeat(len(imgs), 1, 1)
        x = torch.cat([visual_query, clip_feats], dim=1)
        for i in range(self.cfg.v_depth):
            x = ref_vit_block(self.sd, f"visual_blocks.{i}.", x, self.cfg.v_num_heads)
        return self.ln("visual_proj_norm", self.lin("visual_proj", x[:, :self.query_len, :]))

    def layers(self, h, start_pos, visual_query):
        B, T, _ = h.shape
        L, n = self.query_layer, self.cfg.n_layers
        freqs, mask = self.llama.freqs_cis[start_pos:start_pos + T], ref_mask(start_pos, T, h.dtype)
        for i in range(n - L):
            h = self.llama.block(i, h, start_pos, freqs, mask)
        adapter = self.sd["adapter_query.weight"].reshape(L, self.query_len, -1).unsqueeze(1)
        for j in range(L):
            dynamic_adapter = adapter[j].repeat(B, 1, 1) + visual_query
            h = self.llama.block(n - L + j, h, start_pos, freqs, mask, dynamic_adapter)
        return h

    def forward(self, tokens, labels, imgs):
        output = self.llama.head(self.layers(self.llama.embed(tokens), 0, self.forward_visual(imgs)))
        output, labels = output[:, :-1, :], labels[:, 1:]
        if labels.sum() == 0:
            return output.mean() * 0
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels.flatten(), ignore_index=0)

    def forward_inference(self, visual_query, tokens, start_pos):
        h = self.layers(self.llama.embed(tokens), start_pos, visual_query)
        return self.llama.head(h)[:, -1, :].float()

    def generate(self, imgs, prompts, max_gen_len, eos_id=None):
        """Upstream's greedy loop (temperature 0), with pad -1 and a fresh eval-mode cache."""
        bsz = len(prompts)
        self.llama.eval_cache(bsz, torch.float32)
        visual_query = self.forward_visual(imgs)
        min_p, max_p = min(map(len, prompts)), max(map(len, prompts))
        total_len = min(self.cfg.max_seq_len, max_gen_len + max_p)
        tokens = torch.full((bsz, total_len), -1).long()
        for k, t in enumerate(prompts):
            tokens[k, :len(t)] = torch.tensor(t).long()
        input_text_mask = tokens != -1
        prev_pos = 0
        for cur_pos in range(min_p, total_len):
            logits = self.forward_inference(visual_query, tokens[:, prev_pos:cur_pos], prev_pos)
            next_token = torch.argmax(logits, dim=-1).reshape(-1)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if bsz == 1 and next_token[0] == eos_id:
                break
            prev_pos = cur_pos
        out = []
        for i, t in enumerate(tokens.tolist()):
            t = t[len(prompts[i]): len(prompts[i]) + max_gen_len]
            out.append(t[:t.index(eos_id)] if eos_id in t else t)
        return out


# -- helpers ----------------------------------------------------------------------------------------


def tiny(seed=0, **overrides) -> LLaMAAdapter:
    torch.manual_seed(seed)
    return randomize(LLaMAAdapter(AdapterConfig.named("tiny", **overrides)), seed).eval()


def images(B=2, seed=3):
    return torch.randn(B, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def text(B=2, T=10, seed=4):
    return torch.randint(3, 200, (B, T), generator=torch.Generator().manual_seed(seed))


def resize_by_hand(model: LLaMAAdapter, query_len: int, query_layer: int, seed=5) -> None:
    """What the surgery plugin does, written out: keep the first queries and the rows of the last
    layers, draw the new ones, update the counts, drop the caches."""
    gen = torch.Generator().manual_seed(seed)
    L, Q = model.query_layer, model.query_len
    table = model.adapter_query.weight.detach().view(L, Q, -1)
    vq = model.visual_query.weight.detach()
    if query_len > Q:
        vq = torch.cat([vq, torch.randn(query_len - Q, vq.shape[1], generator=gen)])
        table = torch.cat([table, torch.randn(L, query_len - Q, table.shape[2], generator=gen)], 1)
    vq, table = vq[:query_len], table[:, :query_len]
    if query_layer > L:  # new layers in front: the adapted block is anchored at the end
        table = torch.cat([torch.randn(query_layer - L, query_len, table.shape[2], generator=gen), table])
    table = table[table.shape[0] - query_layer:]
    model.visual_query.weight = nn.Parameter(vq.contiguous())
    model.adapter_query.weight = nn.Parameter(table.reshape(query_layer * query_len, -1).contiguous())
    model.query_len, model.query_layer = query_len, query_layer
    model.drop_caches()


def read_keys(name):
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = re.fullmatch(r"(\S+) (\(.*\)) \S+", line).groups()
        out[key] = tuple(int(d) for d in shape.strip("(),").split(",") if d.strip())
    return out


# -- structure --------------------------------------------------------------------------------------


def test_state_dict_is_upstreams_key_list():
    with torch.device("meta"):
        lora = LLaMAAdapter(AdapterConfig.named("7b", w_lora=True, w_new_gate=True))
        bias = LLaMAAdapter(AdapterConfig.named("7b"))
    ours = [(k, tuple(v.shape)) for k, v in lora.state_dict().items() if not k.startswith("clip.")]
    theirs = [(k, s) for k, s in read_keys("llama_adapter_v2_7b_full_model_lora.txt").items()
              if not k.startswith("clip.")]
    assert ours == theirs  # same names, shapes and order (the CLIP tower has its own layout and tests)
    shapes = {k: tuple(v.shape) for k, v in bias.state_dict().items()}
    for ckpt, model_shapes in (("bias_adapter_ckpt", shapes),
                               ("lora_adapter_ckpt", {k: tuple(v.shape) for k, v in lora.state_dict().items()})):
        released = read_keys(f"llama_adapter_v2_7b_{ckpt}.txt")
        assert {k: model_shapes.get(k) for k in released} == released


def test_visual_blocks_are_timm_032_blocks():
    model = tiny()
    names = [k for k, _ in model.visual_blocks[0].named_parameters()]
    assert names == [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                     for p in ("weight", "bias")]
    for block in model.visual_blocks:
        assert type(block.norm1) is nn.LayerNorm and block.norm1.eps == block.norm2.eps == 1e-5
    assert model.clip_proj.in_features == model.config.clip.output_dim
    assert isinstance(model.query_len, int) and isinstance(model.query_layer, int)


def test_no_cuda_calls_in_the_plugin():
    """No `.cuda()` and no CUDA default tensor type in the code (docstrings may talk about them)."""
    folder = Path(__import__("surgery_plugins.llama_adapter", fromlist=["x"]).__file__).parent
    offenders = []
    for path in folder.glob("*.py"):
        toks = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                if t.type in (tokenize.NAME, tokenize.OP)]
        for a, b, c in zip(toks, toks[1:], toks[2:]):
            moves_to_cuda = (a.string, b.string, c.string) == (".", "cuda", "(")
            if moves_to_cuda or b.string in ("HalfTensor", "set_default_tensor_type"):
                offenders.append(f"{path.name}:{b.start[0]}")
    assert not offenders


# -- forward parity ---------------------------------------------------------------------------------


def test_forward_visual_and_training_loss_match_reference():
    model, imgs, tok = tiny(), images(), text()
    ref = RefAdapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_visual(imgs), ref.forward_visual(imgs), **TIGHT)
    model.generate_tokens(imgs, PROMPTS, max_gen_len=3)  # caches made in inference mode must not hurt training
    labels = tok.clone()
    labels[:, :4] = 0  # the prompt part is ignored (label 0)
    loss, same = model(tok, labels, imgs)
    assert loss is same
    torch.testing.assert_close(loss, ref.forward(tok, labels, imgs), **TIGHT)
    loss.backward()  # the trainable parts of both phases get gradients
    for p in (model.llama.layers[-1].attention.gate, model.adapter_query.weight, model.visual_query.weight,
              model.llama.layers[0].feed_forward.w1.bias, model.llama.layers[-1].attention.lora_wq_l2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    zero, _ = model(tok, torch.zeros_like(tok), imgs)
    assert zero.item() == 0 and zero.requires_grad


@pytest.mark.parametrize("cache_adapter", [False, True], ids=["recomputed", "cached"])
def test_forward_inference_matches_reference_step_by_step(cache_adapter):
    model, imgs, tok = tiny(), images(), text(T=9)
    ref = RefAdapter(model)
    ref.llama.eval_cache(2, torch.float32)
    with torch.no_grad():
        vq = model.forward_visual(imgs)
    steps = [(0, 5)] + [(t, t + 1) for t in range(5, 9)]
    for a, b in steps:
        ours = model.forward_inference(vq, tok[:, a:b], a, cache_adapter=cache_adapter)
        theirs = ref.forward_inference(vq, tok[:, a:b], a)
        assert ours.dtype == torch.float32 and ours.shape == (2, model.config.vocab_size)
        torch.testing.assert_close(ours, theirs, **TIGHT)
    # the last step's logits are the training forward's logits at that position
    with torch.no_grad():
        h = model._layers(model.llama.tok_embeddings(tok), 0, adapters=model.dynamic_adapters(vq))
        torch.testing.assert_close(model.llama.output(model.llama.norm(h))[:, -1], ours, **TIGHT)


def test_adapter_ops_equal_upstreams_per_layer_form():
    model, vq = tiny(), torch.randn(2, 3, 64)
    table = model.adapter_query.weight.detach().reshape(3, 3, -1).unsqueeze(1)
    adapters = model.dynamic_adapters(vq)
    assert adapters.shape == (3, 2, 3, 64)
    for j in range(3):
        assert torch.equal(adapters[j], table[j].repeat(2, 1, 1) + vq)
    q, feats = torch.randn(3, 8), torch.randn(2, 5, 8)
    assert torch.equal(ops.query_concat(q, feats), torch.cat([q.unsqueeze(0).repeat(2, 1, 1), feats], 1))
    with pytest.raises(ValueError, match="adapter has Q=4 tokens per layer but visual_query has Q=3"):
        ops.adapter_add(torch.randn(3, 4, 64), vq)


def test_q1_and_all_layers_adapted_match_reference():
    for q_len, q_layer in ((1, 2), (2, 4)):
        model = tiny(query_len=q_len, query_layer=q_layer)
        ref, imgs, tok = RefAdapter(model), images(), text(T=6)
        ref.llama.eval_cache(2, torch.float32)
        with torch.no_grad():
            vq = model.forward_visual(imgs)
            torch.testing.assert_close(vq, ref.forward_visual(imgs), **TIGHT)
        torch.testing.assert_close(model.forward_inference(vq, tok, 0, cache_adapter=True),
                                   ref.forward_inference(vq, tok, 0), **TIGHT)


# -- generation -------------------------------------------------------------------------------------


def test_greedy_generation_same_with_and_without_adapter_cache_and_as_reference():
    model, imgs = tiny(), images()
    cached = model.generate_tokens(imgs, PROMPTS, max_gen_len=12, temperature=0, cache_adapter=True)
    baseline = model.generate_tokens(imgs, PROMPTS, max_gen_len=12, temperature=0, cache_adapter=False)
    reference = RefAdapter(model).generate(imgs, PROMPTS, max_gen_len=12)
    assert cached == baseline == reference
    assert [len(t) for t in cached] == [12, 12] and len(set(cached[0])) > 2  # not degenerate


def test_batch_of_two_prompts_equals_each_prompt_alone():
    model, imgs = tiny(), images()
    batch = model.generate_tokens(imgs, PROMPTS, max_gen_len=10, temperature=0)
    alone = [model.generate_tokens(imgs[i:i + 1], [p], max_gen_len=10, temperature=0)[0]
             for i, p in enumerate(PROMPTS)]
    assert batch == alone


def test_sampling_is_reproducible_and_cache_independent():
    model, imgs = tiny(), images()

    def sample(cache_adapter, seed):
        return model.generate_tokens(imgs, PROMPTS, max_gen_len=10, temperature=1.0, top_p=0.9,
                                     cache_adapter=cache_adapter, generator=torch.Generator().manual_seed(seed))

    assert sample(True, 0) == sample(False, 0) == sample(True, 0)
    assert sample(True, 0) != sample(True, 1)


def test_eos_stops_every_sequence_and_is_cut(monkeypatch):
    model, imgs = tiny(), images()
    free = model.generate_tokens(imgs, PROMPTS, max_gen_len=12, temperature=0)
    # an EOS both rows produce: the loop must stop at the step where the later of them does
    eos = min(set(free[0]) & set(free[1]), key=lambda t: max(row.index(t) for row in free))
    calls = []
    original = LLaMAAdapter.forward_inference
    monkeypatch.setattr(LLaMAAdapter, "forward_inference",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    cut = model.generate_tokens(imgs, PROMPTS, max_gen_len=12, temperature=0, eos_id=eos)
    assert cut == [row[:row.index(eos)] for row in free]
    last = max(len(p) + row.index(eos) for p, row in zip(PROMPTS, free))  # position of the last EOS
    assert len(calls) == last - min(map(len, PROMPTS)) + 1


def test_string_prompts_are_tokenized_and_answers_decoded(tiny_tokenizer):
    torch.manual_seed(0)
    model = randomize(LLaMAAdapter(AdapterConfig.named("tiny", vocab_size=-1), tiny_tokenizer)).eval()
    assert model.config.vocab_size == tiny_tokenizer.n_words == model.llama.output.out_features
    prompts = ["describe this image", "what is in the picture ?"]
    ids = [tiny_tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    answers = model.generate(images(), prompts, max_gen_len=8, temperature=0)
    expected = model.generate_tokens(images(), ids, max_gen_len=8, temperature=0)
    assert answers == [tiny_tokenizer.decode(t) for t in expected]
    assert all(tiny_tokenizer.eos_id not in t for t in expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close_to_float32(dtype):
    model, imgs, tok = tiny(), images(), text(T=8)
    half = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        full = model.forward_inference(model.forward_visual(imgs), tok, 0)
        vq = half.forward_visual(imgs)
        assert vq.dtype == dtype
        low = half.forward_inference(vq, tok, 0, cache_adapter=True)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().max() / full.abs().max() < 0.08
    tokens = half.generate_tokens(imgs, PROMPTS, max_gen_len=6, temperature=0)
    assert [len(t) for t in tokens] == [6, 6]
    assert half.kv_caches(2, dtype, torch.device("cpu"))[0].k.dtype == dtype


# -- counts and caches ------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [(2, 3), (3, 2), (4, 4), (1, 1)], ids=lambda c: f"Q{c[0]}-L{c[1]}")
def test_changed_counts_generate_what_the_reference_does(counts):
    model, imgs = tiny(), images()
    model.generate_tokens(imgs, PROMPTS, max_gen_len=4, temperature=0)  # fills every cache
    resize_by_hand(model, *counts)
    for cache_adapter in (True, False):
        ours = model.generate_tokens(imgs, PROMPTS, max_gen_len=8, temperature=0, cache_adapter=cache_adapter)
        assert ours == RefAdapter(model).generate(imgs, PROMPTS, max_gen_len=8)


def test_stale_caches_are_never_used():
    model, imgs, tok = tiny(), images(), text(T=5)
    with torch.no_grad():
        vq = model.forward_visual(imgs)
    first = model.cached_adapter_kv(vq)
    assert model.cached_adapter_kv(vq) is first  # computed once per image
    assert model.cached_adapter_kv(vq.clone()) is not first  # another visual_query: recomputed
    with torch.no_grad():
        model.llama.layers[-1].attention.wv.weight.mul_(2)  # weights edited in place (a training step)
    assert model.cached_adapter_kv(vq) is not first
    # counts changed WITHOUT drop_caches: the keys still tell, and the result is the reference's
    model.forward_inference(vq, tok, 0, cache_adapter=True)
    holder = model._caches
    table = model.adapter_query.weight.detach().view(3, 3, -1)
    model.adapter_query.weight = nn.Parameter(table[1:].reshape(6, -1).clone())
    model.query_layer = 2
    ref = RefAdapter(model)
    ref.llama.eval_cache(2, torch.float32)
    torch.testing.assert_close(model.forward_inference(vq, tok, 0, cache_adapter=True),
                               ref.forward_inference(vq, tok, 0), **TIGHT)
    model.drop_caches()
    assert model._caches is holder and holder.kv is None and holder.adapter_kv is None
    model.forward_inference(vq, tok, 0, cache_adapter=True)
    assert copy.deepcopy(model)._caches.kv is None  # copies start empty
    model.query_len = 4  # out of step with the tensors: a clear error, not a silent misuse
    with pytest.raises(ModelConfigError, match="query_len"):
        model.forward_inference(vq, tok, 0)


def _edit_gate(m):
    m.llama.layers[-1].attention.gate.mul_(-1)


def _edit_new_gate(m):
    m.llama.layers[-2].attention.new_gate.add_(0.5)


def _edit_wk(m):
    m.llama.layers[-1].attention.wk.weight.mul_(1.5)


def _edit_table(m):
    m.adapter_query.weight[0].add_(1.0)


@pytest.mark.parametrize("edit", [_edit_gate, _edit_new_gate, _edit_wk, _edit_table],
                         ids=["gate", "new_gate", "wk", "adapter_query"])
def test_cached_adapter_sees_in_place_edits_of_every_parameter_it_reads(edit):
    model, imgs, tok = tiny(), images(), text(T=5)
    with torch.no_grad():
        vq = model.forward_visual(imgs)
    model.forward_inference(vq, tok, 0, cache_adapter=True)  # fills the per-image cache
    with torch.no_grad():
        edit(model)  # in place: same tensor objects, same storage
    ref = RefAdapter(model)  # the uncached computation, from the edited weights
    ref.llama.eval_cache(2, torch.float32)
    expected = ref.forward_inference(vq, tok, 0)
    torch.testing.assert_close(model.forward_inference(vq, tok, 0, cache_adapter=True), expected, **TIGHT)
    torch.testing.assert_close(model.forward_inference(vq, tok, 0, cache_adapter=False), expected, **TIGHT)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_cached_adapter_sees_in_place_edits_of_the_visual_query(mode):
    model, imgs, tok = tiny(), images(), text(T=5)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        vq = model.forward_visual(imgs)  # an inference tensor (no version counter) in inference mode
    first = model.cached_adapter_kv(vq)
    assert model.cached_adapter_kv(vq) is first  # unchanged: reused
    with context():
        vq[1].mul_(0.5)
    ref = RefAdapter(model)
    ref.llama.eval_cache(2, torch.float32)
    torch.testing.assert_close(model.forward_inference(vq, tok, 0, cache_adapter=True),
                               ref.forward_inference(vq, tok, 0), **TIGHT)


def test_cached_adapter_never_matches_a_replaced_or_untracked_parameter():
    model, imgs = tiny(), images()
    with torch.no_grad():
        vq = model.forward_visual(imgs)
    attn = model.llama.layers[-1].attention
    first = model.cached_adapter_kv(vq)
    # a new Parameter (possibly at the old one's id and address once that is freed): recomputed
    attn.gate = nn.Parameter(attn.gate.detach() * -1)
    second = model.cached_adapter_kv(vq)
    assert second is not first and torch.equal(second[-1].gate, attn.gate.detach().tanh())
    attn.new_gate = nn.Parameter(attn.new_gate.detach() + 1)
    assert torch.equal(model.cached_adapter_kv(vq)[-1].new_gate, attn.new_gate.detach())
    # an inference-tensor weight has no version counter: never reused
    with torch.inference_mode():
        attn.new_gate = nn.Parameter(torch.full((1, 1, 1, 1), 0.25), requires_grad=False)
    third = model.cached_adapter_kv(vq)
    assert model.cached_adapter_kv(vq) is not third
    assert torch.equal(third[-1].new_gate, torch.full((1, 1, 1, 1), 0.25))


def test_named_configs():
    tiny_cfg = AdapterConfig.named("tiny")
    assert (tiny_cfg.dim, tiny_cfg.n_layers, tiny_cfg.query_len, tiny_cfg.query_layer) == (64, 4, 3, 3)
    big = AdapterConfig.named("7b")
    assert (big.dim, big.n_layers, big.query_len, big.query_layer, big.clip.width) == (4096, 32, 10, 31, 1024)
    assert big.llama_args().norm_eps == 1e-6 and big.llama_args().max_seq_len == 512
    with pytest.raises(ModelConfigError, match="unknown config"):
        AdapterConfig.named("13b")
    model = LLaMAAdapter(AdapterConfig.named("tiny", init="upstream"))
    assert not model.llama.layers[0].attention.gate.any()  # upstream's init: adapters start as no-ops
    assert model.config is not tiny_cfg
    assert math.isclose(AdapterConfig().v_mlp_ratio, 4.0)


@pytest.mark.parametrize("imgs, prompts, match", [
    (2, [[1, 5]], "2 images for 1 prompts: one image per prompt"),
    (0, [], "0 images for 0 prompts"),
    (1, [[]], "empty prompt: a prompt needs at least one token"),
    (1, [[1] * 65], "a prompt of 65 tokens exceeds max_seq_len=64"),
    (1, ["a string"], "string prompts need a tokenizer"),
], ids=["images-vs-prompts", "no-prompts", "empty-prompt", "too-long", "string-without-tokenizer"])
def test_bad_generation_inputs_are_model_input_errors(imgs, prompts, match):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelInputError, match=match):
        model.generate_tokens(images(imgs) if imgs else torch.zeros(0, 3, 28, 28), prompts, max_gen_len=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_configurations_that_cannot_work_are_model_config_errors():
    with pytest.raises(ModelConfigError, match="AdapterConfig.init must be 'upstream' or 'random', got 'zeros'"):
        LLaMAAdapter(AdapterConfig.named("tiny", init="zeros"))
    with pytest.raises(ModelConfigError, match="image_size 30 is not a multiple of patch_size 14"):
        ClipVisionConfig(image_size=30, patch_size=14)
    with pytest.raises(ModelConfigError, match="vocab_size must be set"):
        LLaMAAdapter(AdapterConfig.named("tiny", vocab_size=-1))
    with pytest.raises(ModelConfigError, match="generate decodes with a tokenizer"):
        tiny().generate(images(1), [[1, 5]], max_gen_len=2)


# -- CUDA (skipped without a GPU) -------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_matches_cpu_and_generates_in_every_dtype():
    model, imgs, tok = tiny(), images(), text(T=8)
    ref = RefAdapter(model)
    ref.llama.eval_cache(2, torch.float32)
    expected = ref.forward_inference(ref.forward_visual(imgs), tok, 0)
    cpu_tokens = model.generate_tokens(imgs, PROMPTS, max_gen_len=8, temperature=0)
    gpu = copy.deepcopy(model).to("cuda")
    with torch.no_grad():
        logits = gpu.forward_inference(gpu.forward_visual(imgs.cuda()), tok.cuda(), 0, cache_adapter=True)
    torch.testing.assert_close(logits.cpu(), expected, rtol=1e-3, atol=1e-3)
    assert gpu.generate_tokens(imgs, PROMPTS, max_gen_len=8, temperature=0) == cpu_tokens  # CPU images are moved
    for dtype in (torch.bfloat16, torch.float16):
        half = copy.deepcopy(model).to("cuda", dtype)
        runs = [half.generate_tokens(imgs.cuda(), PROMPTS, max_gen_len=8, temperature=0, cache_adapter=c)
                for c in (True, False)]
        assert runs[0] == runs[1] and [len(t) for t in runs[0]] == [8, 8]
        with torch.no_grad():
            low = half.forward_inference(half.forward_visual(imgs.cuda()), tok.cuda(), 0)
        assert (low.cpu() - expected).abs().max() / expected.abs().max() < 0.08
    with torch.autocast("cuda", dtype=torch.bfloat16):  # upstream generates under autocast
        assert [len(t) for t in gpu.generate_tokens(imgs, PROMPTS, max_gen_len=4, temperature=0)] == [4, 4]
    assert gpu.kv_caches(2, torch.float32, torch.device("cuda"))[0].k.is_cuda
