"""The LLaMA of LLaMA-Adapter V2 against an independent reference written from upstream's semantics.

The reference below (`ref_*`, `RefLLaMA`) is a functional re-statement of upstream
`llama_adapter_v2_multimodal7b/llama/llama.py` (OpenGVLab/LLaMA-Adapter): complex
rotary embeddings through `view_as_complex`, explicit score matmuls, the adapter branch with its
own softmax, a KV cache laid out (B, S, H, hd) as upstream's. It reads the model's state dict
and shares no code with `surgery_plugins.llama_adapter.llama`. `test_model.py` builds the
adapter model's reference on top of it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from surgery.errors import ModelInputError
from surgery_plugins.llama_adapter.llama import (
    Attention, KVCache, ModelArgs, RMSNorm, RotaryCache, Transformer, apply_rotary_emb, causal_mask,
    ffn_hidden_dim,
)

TINY = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=100, multiple_of=32, norm_eps=1e-6,
                 max_batch_size=2, max_seq_len=32, w_bias=True, w_lora=True, lora_rank=4, w_new_gate=True)
TIGHT = dict(rtol=1e-5, atol=1e-5)


# -- the reference ----------------------------------------------------------------------------------


def ref_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end).float()
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64 (end, hd/2)


def ref_rope(xq, xk, freqs_cis):
    """Upstream: adjacent pairs as complex numbers, times e^{i theta}. x (B, T, H, hd)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    return (torch.view_as_real(xq_ * f).flatten(3).type_as(xq),
            torch.view_as_real(xk_ * f).flatten(3).type_as(xk))


def ref_mask(start_pos: int, seqlen: int, dtype) -> torch.Tensor:
    mask = torch.full((1, 1, seqlen, seqlen), float("-inf"))
    return torch.triu(mask, diagonal=start_pos + 1).to(dtype)


def ref_rmsnorm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RefLLaMA:
    """Upstream's Transformer as functions of a state dict (`prefix` = 'llama.' inside the adapter)."""

    def __init__(self, sd: dict, args: ModelArgs, prefix: str = ""):
        self.sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        self.args = args
        self.hd = args.dim // args.n_heads
        self.freqs_cis = ref_freqs_cis(self.hd, args.max_seq_len * 2)
        self.cache = None  # per layer (k, v), (B, S, H, hd): upstream's eval-mode cache

    def eval_cache(self, batch: int, dtype) -> None:
        shape = (batch, self.args.max_seq_len, self.args.n_heads, self.hd)
        self.cache = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                      for _ in range(self.args.n_layers)]

    def lin(self, name, x):
        return F.linear(x, self.sd[name + ".weight"], self.sd.get(name + ".bias"))

    def lora(self, p, name, x):
        return self.lin(f"{p}lora_{name}_l2", self.lin(f"{p}lora_{name}_l1", x))

    def attention(self, i, x, start_pos, freqs_cis, mask, adapter=None):
        p, a, hd = f"layers.{i}.attention.", self.args, self.hd
        B, T, _ = x.shape
        xq, xk, xv = self.lin(p + "wq", x), self.lin(p + "wk", x), self.lin(p + "wv", x)
        if a.w_lora:
            xq, xk, xv = xq + self.lora(p, "wq", x), xk + self.lora(p, "wk", x), xv + self.lora(p, "wv", x)
        xq, xk, xv = (t.view(B, T, a.n_heads, hd) for t in (xq, xk, xv))
        xq, xk = ref_rope(xq, xk, freqs_cis)
        if self.cache is not None:
            ck, cv = self.cache[i]
            ck[:B, start_pos:start_pos + T] = xk
            cv[:B, start_pos:start_pos + T] = xv
            keys, values = ck[:B, :start_pos + T], cv[:B, :start_pos + T]
        else:
            assert start_pos == 0
            keys, values = xk, xv
        if adapter is not None:
            L = adapter.shape[1]
            adapter_v = self.lin(p + "wv", adapter).view(B, L, a.n_heads, hd).transpose(1, 2)
            if L > 1:
                adapter_k = self.lin(p + "wk", adapter).view(B, L, a.n_heads, hd).transpose(1, 2)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(hd)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = torch.matmul(scores, values)
        if adapter is not None:
            gate = self.sd[p + "gate"]
            if L > 1:
                adapter_scores = torch.matmul(xq, adapter_k.transpose(2, 3)) / math.sqrt(hd)
                adapter_scores = gate.tanh() * F.softmax(adapter_scores.float(), dim=-1).type_as(xq)
                if a.w_new_gate:
                    adapter_scores = self.sd[p + "new_gate"] * adapter_scores
                out = out + torch.matmul(adapter_scores, adapter_v)
            else:
                out = out + gate.tanh() * adapter_v
        out = out.transpose(1, 2).contiguous().view(B, T, -1)
        y = self.lin(p + "wo", out)
        return y + self.lora(p, "wo", out) if a.w_lora else y

    def feed_forward(self, i, x):
        p = f"layers.{i}.feed_forward."
        if self.args.w_lora:
            h = F.silu(self.lin(p + "w1", x) + self.lora(p, "w1", x)) * (self.lin(p + "w3", x) + self.lora(p, "w3", x))
            return self.lin(p + "w2", h) + self.lora(p, "w2", h)
        return self.lin(p + "w2", F.silu(self.lin(p + "w1", x)) * self.lin(p + "w3", x))

    def block(self, i, x, start_pos, freqs_cis, mask, adapter=None):
        eps = self.args.norm_eps
        h = x + self.attention(i, ref_rmsnorm(x, self.sd[f"layers.{i}.attention_norm.weight"], eps),
                               start_pos, freqs_cis, mask, adapter)
        return h + self.feed_forward(i, ref_rmsnorm(h, self.sd[f"layers.{i}.ffn_norm.weight"], eps))

    def embed(self, tokens):
        return F.embedding(tokens, self.sd["tok_embeddings.weight"])

    def head(self, h):
        return F.linear(ref_rmsnorm(h, self.sd["norm.weight"], self.args.norm_eps), self.sd["output.weight"])

    def forward(self, tokens, start_pos=0, adapters=None):
        """All positions' logits; adapters: one (B, Q, D) or None per layer."""
        B, T = tokens.shape
        h = self.embed(tokens)
        freqs = self.freqs_cis[start_pos:start_pos + T]
        mask = ref_mask(start_pos, T, h.dtype)
        for i in range(self.args.n_layers):
            h = self.block(i, h, start_pos, freqs, mask, None if adapters is None else adapters[i])
        return self.head(h)


# -- helpers ----------------------------------------------------------------------------------------


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, with the scales that keep activations sane: gates well away from 0
    (so the adapters matter), norms around 1, biases and LoRA visible but small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gate", "new_gate"):
                value = torch.rand(p.shape, generator=gen) * 2 - 1
            elif "norm" in name and leaf == "weight":
                value = 1 + 0.1 * noise
            elif leaf == "bias":
                value = 0.1 * noise
            elif "embed" in name or name.endswith("_query.weight") or p.dim() < 2:
                value = noise
            else:
                value = noise / math.sqrt(p.shape[1])
            p.copy_(value)
    return module


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return randomize(Transformer(replace(TINY, **kw)), seed)


def tokens(B=2, T=9, vocab=100, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def adapter_tokens(B=2, Q=3, D=64, seed=2):
    return torch.randn(B, Q, D, generator=torch.Generator().manual_seed(seed))


def run_attention(attn: Attention, x, start_pos=0, adapter=None, adapter_kv=None, kv_cache=None):
    T = x.shape[1]
    rope = RotaryCache(attn.head_dim, 64).get(start_pos, T, x.device)
    return attn(x, start_pos, rope, causal_mask(start_pos, T, x.dtype, x.device), adapter, adapter_kv, kv_cache)


# -- tests ------------------------------------------------------------------------------------------


def test_parameter_names_and_shapes_are_upstreams():
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=4096, n_layers=2, n_heads=32, vocab_size=32000, w_bias=True,
                                      w_lora=True, w_new_gate=True))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ffn_hidden_dim(4096, 256) == 11008
    assert shapes["layers.1.attention.gate"] == (1, 32, 1, 1)
    assert shapes["layers.1.attention.new_gate"] == (1, 1, 1, 1)
    assert shapes["layers.1.feed_forward.lora_w2_l1.weight"] == (16, 11008)
    assert "layers.0.attention.wk.bias" not in shapes and "layers.0.attention.wq.bias" in shapes
    plain = Transformer(replace(TINY, w_bias=False, w_lora=False, w_new_gate=False))
    assert not [k for k in plain.state_dict() if "bias" in k or "lora" in k or "new_gate" in k]
    # upstream's initial values: a fresh adapter is a no-op
    attn = Transformer(TINY).layers[0].attention
    assert torch.equal(attn.gate, torch.zeros(1, 4, 1, 1)) and torch.equal(attn.new_gate, torch.ones(1, 1, 1, 1))
    assert not attn.wq.bias.any() and not attn.lora_wq_l2.weight.any()


def test_rmsnorm_matches_upstream_in_every_dtype():
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 64) * 30
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        n = RMSNorm(64, eps=1e-6).to(dtype)
        n.load_state_dict(norm.state_dict())
        xd = x.to(dtype)
        assert torch.equal(n(xd), ref_rmsnorm(xd, n.weight, 1e-6))


def test_rotary_matches_complex_reference_and_stays_float32():
    x = torch.randn(2, 7, 4, 16)
    cos, sin = RotaryCache(16, 64).get(3, 7, "cpu")
    ours = apply_rotary_emb(x, cos, sin)
    theirs, _ = ref_rope(x, x, ref_freqs_cis(16, 64)[3:10])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # the tables are not state, survive a cast of the model, and grow past 2 * max_seq_len
    model = tiny().to(torch.bfloat16)
    assert not any("freq" in k or "rope" in k or "rot" in k for k in model.state_dict())
    cos, sin = model.rope(100, 4, torch.device("cpu"))
    assert cos.dtype == torch.float32 and cos.shape == (4, 8)
    torch.testing.assert_close(torch.complex(cos, sin), ref_freqs_cis(16, 104)[100:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("flags", [dict(), dict(w_bias=False), dict(w_lora=False), dict(w_new_gate=False),
                                   dict(w_bias=False, w_lora=False, w_new_gate=False)],
                         ids=["all", "no-bias", "no-lora", "no-new-gate", "plain"])
def test_training_forward_with_adapters_matches_reference(flags, sdpa, monkeypatch):
    monkeypatch.setattr(Attention, "use_sdpa", sdpa)
    model = tiny(**flags)
    ref = RefLLaMA(model.state_dict(), model.params)
    tok = tokens()
    adapters = [None, adapter_tokens(seed=3), adapter_tokens(Q=1, seed=4), adapter_tokens(Q=5, seed=5)]
    h = model.tok_embeddings(tok)
    rope = model.rope(0, tok.shape[1], h.device)
    mask = causal_mask(0, tok.shape[1], h.dtype, h.device)
    for layer, adapter in zip(model.layers, adapters):
        h = layer(h, 0, rope, mask, adapter=adapter)
    ours = model.output(model.norm(h))
    theirs = ref.forward(tok, 0, adapters)
    torch.testing.assert_close(ours, theirs, **TIGHT)
    # and without adapters, the model's own forward
    torch.testing.assert_close(model(tok), ref.forward(tok), **TIGHT)


def test_adapter_kv_path_is_identical_to_recomputed_path():
    attn = tiny().layers[1].attention
    x = torch.randn(2, 6, 64)
    for Q in (1, 3):
        adapter = adapter_tokens(Q=Q)
        with torch.no_grad():
            a = run_attention(attn, x, adapter=adapter)
            b = run_attention(attn, x, adapter_kv=attn.adapter_kv(adapter))
        assert torch.equal(a, b)
    kv = attn.adapter_kv(adapter_tokens(Q=3))
    assert kv.k_t.shape == (2, 4, 16, 3) and kv.v.shape == (2, 4, 3, 16)
    assert attn.adapter_kv(adapter_tokens(Q=1)).k_t is None  # Q == 1: no key, as upstream


def test_q1_branch_is_a_gated_bias_without_new_gate():
    attn = tiny().layers[0].attention
    x, adapter = torch.randn(2, 5, 64), adapter_tokens(Q=1)
    with torch.no_grad():
        base = run_attention(attn, x)
        with_adapter = run_attention(attn, x, adapter=adapter)
        attn.new_gate.fill_(7.0)  # ignored by the Q == 1 branch
        assert torch.equal(run_attention(attn, x, adapter=adapter), with_adapter)
        # out + tanh(gate) * v before wo (and wo's LoRA), the same for every position
        v = attn.wv(adapter).view(2, 1, 4, 16).transpose(1, 2)
        delta = (attn.gate.tanh() * v).transpose(1, 2).reshape(2, 1, 64)
        wo = lambda o: attn.wo(o) + attn.lora_wo_l2(attn.lora_wo_l1(o))  # noqa: E731
        expected = wo(delta) - wo(torch.zeros_like(delta))  # the linear part only (wo.bias cancels)
        torch.testing.assert_close(with_adapter - base, expected.expand(2, 5, 64), **TIGHT)


def test_new_gate_scales_the_adapter_term():
    attn = tiny().layers[0].attention
    x, adapter = torch.randn(2, 5, 64), adapter_tokens(Q=3)
    with torch.no_grad():
        attn.gate.zero_()
        assert torch.equal(run_attention(attn, x, adapter=adapter), run_attention(attn, x))  # tanh(0) = 0
        randomize(attn, 3)
        outs = {}
        for g in (0.0, 1.0, 2.0):
            attn.new_gate.fill_(g)
            outs[g] = run_attention(attn, x, adapter=adapter)
    torch.testing.assert_close(outs[2.0] - outs[0.0], 2 * (outs[1.0] - outs[0.0]), **TIGHT)
    assert (outs[1.0] - outs[0.0]).abs().max() > 1e-3


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "explicit"])
def test_incremental_decode_with_kv_cache_equals_full_sequence(sdpa, monkeypatch):
    monkeypatch.setattr(Attention, "use_sdpa", sdpa)
    model = tiny()
    tok = tokens(T=12)
    full = model(tok)  # (B, T, V)
    caches = model.new_kv_caches(2, torch.float32, "cpu")
    steps = [model(tok[:, :5], 0, caches)]  # prefill
    steps += [model(tok[:, 5:8], 5, caches)]  # a chunk at start_pos > 0 (upstream cannot)
    steps += [model(tok[:, t:t + 1], t, caches) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TIGHT)
    # the reference's own cache gives the same, one token at a time after the prefill
    ref = RefLLaMA(model.state_dict(), model.params)
    ref.eval_cache(2, torch.float32)
    ref_steps = [ref.forward(tok[:, :5], 0)] + [ref.forward(tok[:, t:t + 1], t) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(ref_steps, dim=1), full, **TIGHT)


def test_kv_cache_is_preallocated_and_never_made_by_eval():
    model = tiny()
    before = {id(t) for m in model.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)}
    model.eval()
    model.train()
    after = {id(t) for m in model.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)}
    assert before == after
    cache = KVCache(3, 10, 4, 16, torch.bfloat16, "cpu")
    assert cache.k.shape == (3, 4, 10, 16) and cache.k.dtype == torch.bfloat16
    k, v = torch.randn(2, 4, 4, 16, dtype=torch.bfloat16), torch.randn(2, 4, 4, 16, dtype=torch.bfloat16)
    keys, values = cache.update(2, k, v)  # a batch smaller than the allocation uses its first rows
    assert keys.shape == (2, 4, 6, 16) and torch.equal(keys[:, :, 2:], k) and torch.equal(values[:, :, 2:], v)
    with pytest.raises(ModelInputError, match="cannot hold"):
        cache.update(8, k, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close_to_float32(dtype):
    model = tiny()
    tok = tokens(T=8)
    full = model(tok)
    half = tiny().to(dtype)
    caches = half.new_kv_caches(2, dtype, "cpu")
    out = torch.cat([half(tok[:, :4], 0, caches)] + [half(tok[:, t:t + 1], t, caches) for t in range(4, 8)], 1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    scale = full.abs().max()
    assert (out.float() - full).abs().max() / scale < 0.05
    # the half model is the reference run in that dtype too
    ref = RefLLaMA(half.state_dict(), half.params)
    torch.testing.assert_close(half(tok).float(), ref.forward(tok).float(), rtol=0.05, atol=0.05 * scale.item())


def test_causal_mask_generalises_upstreams():
    assert causal_mask(7, 1, torch.float32, "cpu") is None
    m = causal_mask(0, 4, torch.float32, "cpu")
    assert torch.equal(m, ref_mask(0, 4, torch.float32))
    m = causal_mask(2, 3, torch.float16, "cpu")[0, 0]
    assert m.shape == (3, 5) and m.dtype == torch.float16
    assert torch.equal(torch.isinf(m), torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]).bool())
