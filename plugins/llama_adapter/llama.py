"""The LLaMA language model of LLaMA-Adapter V2 (multimodal), with its adapter attention.

Upstream's parameter names and shapes (`llama_adapter_v2_multimodal7b/llama/llama.py`), so Meta's and
the released adapter checkpoints load as they are; ImageBind-LLM's `llama.py` is the same model
without `new_gate`, so that plugin builds on these pieces too. Deliberately unlike upstream: no
hard-coded device or dtype (caches are made on demand in the activations' dtype and device), rotary
tables in float32 kept out of the state dict (a buffer would be cast by `.to(bfloat16)`), an explicit
(B, H, S, hd) `KVCache`, adapter keys/values computable once per image (`Attention.adapter_kv`), and
the main softmax always applied (upstream's multimodal copy skips it when `mask is None`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery import ops
from surgery.errors import ModelConfigError, ModelInputError

from .tokenizer import sample_top_p


class AdapterKV(NamedTuple):
    """What one layer's adapter branch needs at every step, computed once per image.

    The key is stored transposed and contiguous, and the gates already squashed and cast, so a
    decoding step runs only the two small matmuls and the softmax (on a CPU each saved op is
    ~10 us per layer per step, a visible share of a decode step at query_len 10).
    """

    k_t: Optional[Tensor]  # (B, H, hd, Q) keys, transposed; None when Q <= 1 (no softmax then)
    v: Tensor  # (B, H, Q, hd)
    gate: Tensor  # (1, H, 1, 1) tanh(gate) in the activations' dtype
    new_gate: Optional[Tensor]  # (1, 1, 1, 1) in that dtype, when the layer has one


@dataclass
class ModelArgs:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    vocab_size: int = -1  # set from the tokenizer
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_batch_size: int = 32  # kept for compatibility; batches are not limited by it
    max_seq_len: int = 2048
    w_bias: bool = False  # bias tuning: wq/wo and w1/w2/w3 biases
    w_lora: bool = False  # LoRA on every projection
    lora_rank: int = 16
    w_new_gate: bool = False  # a second, scalar gate on the adapter scores

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def ffn_hidden_dim(dim: int, multiple_of: int) -> int:
    """Upstream's SwiGLU size: 2/3 of 4*dim, rounded up to a multiple of `multiple_of` (11008 at 7B)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalised in float32 (fp16 squares overflow), cast back, then scaled: upstream's order
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


# -- rotary embeddings ---------------------------------------------------------------------------


class RotaryCache:
    """cos/sin tables of the rotary embedding, float32, one pair per device, grown on demand.

    A plain object (not a module, not a buffer): it never enters the state_dict and is never
    cast by `model.to(dtype)`, so positions keep full precision whatever the model's dtype.
    """

    def __init__(self, head_dim: int, length: int, theta: float = 10000.0):
        self.head_dim, self.length, self.theta = head_dim, length, theta
        self.tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _build(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # outside inference mode: the tables are reused by training forwards, which must be able
        # to save them for backward
        with torch.inference_mode(False), torch.no_grad():
            half = torch.arange(0, self.head_dim, 2, device=device)[: self.head_dim // 2].float()
            inv_freq = 1.0 / (self.theta ** (half / self.head_dim))  # (hd/2,)
            t = torch.arange(length, device=device).float()
            angles = torch.outer(t, inv_freq)  # (S, hd/2)
            return torch.cos(angles), torch.sin(angles)

    def get(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin for positions [start, start + length): each (length, hd/2), float32."""
        device = torch.device(device)
        cos, sin = self.tables.get(device, (None, None))
        if cos is None or cos.shape[0] < start + length:
            size = max(self.length, start + length)
            cos, sin = self.tables[device] = self._build(size, device)
        return cos[start:start + length], sin[start:start + length]

    def clear(self) -> None:
        self.tables.clear()


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angle of (position, i): Meta's interleaved
    layout, the real form of upstream's complex product. x (B, T, H, hd); cos/sin (T, hd/2)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    x0, x1 = xf.unbind(-1)  # (B, T, H, hd/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(-2).type_as(x)  # (B, T, H, hd)


def causal_mask(start_pos: int, seqlen: int, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
    """Additive mask (1, 1, T, start_pos + T): query i sees keys j <= start_pos + i.

    Upstream builds (T, T) with `triu(diagonal=start_pos + 1)`, which equals this whenever it
    broadcasts (start_pos == 0, or T == 1 where it is all zeros). None for T == 1: nothing to hide.
    """
    if seqlen == 1:
        return None
    mask = torch.full((seqlen, start_pos + seqlen), float("-inf"), device=device)
    return torch.triu(mask, diagonal=start_pos + 1).to(dtype)[None, None]  # (1, 1, T, S)


# -- KV cache ------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of one layer, (B, H, S, hd), written at [:, :, pos:pos+T].

    Sized once (batch, max_len) in the dtype and on the device of the activations; a batch
    smaller than the allocation uses the first rows, as upstream's cache does.
    """

    def __init__(self, batch: int, max_len: int, n_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (B, H, S, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (B, H, S, hd)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, hd) at start_pos; return the keys/values of positions [0, start_pos + T)."""
        B, _, T, _ = k.shape
        end = start_pos + T
        if end > self.max_len or B > self.k.shape[0]:
            raise ModelInputError(f"KV cache of {tuple(self.k.shape[:1] + self.k.shape[2:3])} (batch, length) "
                                  f"cannot hold batch {B} up to position {end}")
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, H, S, hd) each


# -- layers --------------------------------------------------------------------------------------


def _lora(dim_in: int, rank: int, dim_out: int) -> tuple[nn.Linear, nn.Linear]:
    l1, l2 = nn.Linear(dim_in, rank, bias=False), nn.Linear(rank, dim_out, bias=False)
    nn.init.zeros_(l2.weight)  # a fresh LoRA is a no-op
    return l1, l2


class Attention(nn.Module):
    # the main branch through F.scaled_dot_product_attention (same math as scores + mask,
    # float softmax, @ values); False runs that explicit form, as upstream writes it
    use_sdpa: bool = True

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.w_lora = args.w_lora
        self.w_new_gate = args.w_new_gate
        dim = args.dim
        self.wq = nn.Linear(dim, dim, bias=args.w_bias)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=args.w_bias)
        if args.w_bias:
            nn.init.zeros_(self.wq.bias)
            nn.init.zeros_(self.wo.bias)
        if args.w_lora:
            self.lora_wq_l1, self.lora_wq_l2 = _lora(dim, args.lora_rank, dim)
            self.lora_wk_l1, self.lora_wk_l2 = _lora(dim, args.lora_rank, dim)
            self.lora_wv_l1, self.lora_wv_l2 = _lora(dim, args.lora_rank, dim)
            self.lora_wo_l1, self.lora_wo_l2 = _lora(dim, args.lora_rank, dim)
        # zero gate: a freshly added adapter changes nothing
        self.gate = nn.Parameter(torch.zeros(1, args.n_heads, 1, 1))
        if args.w_new_gate:
            self.new_gate = nn.Parameter(torch.ones(1, 1, 1, 1))

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)

    def adapter_kv(self, adapter: Tensor) -> AdapterKV:
        """Keys and values of the adapter tokens (B, Q, D): plain wk/wv (no LoRA, no RoPE).

        Depends on the image and the layer only, so generation computes it once per image
        instead of at every step. Like upstream, no key is computed for a single token (Q == 1
        is a gated bias, there is nothing to attend over).
        """
        adapter = adapter.to(self.wv.weight.dtype)
        Q = adapter.shape[1]
        v = self._heads(self.wv(adapter)).transpose(1, 2).contiguous()  # (B, H, Q, hd)
        k_t = self._heads(self.wk(adapter)).permute(0, 2, 3, 1).contiguous() if Q > 1 else None  # (B, H, hd, Q)
        gate = self.gate.tanh().to(v.dtype)  # (1, H, 1, 1)
        new_gate = self.new_gate.to(v.dtype) if self.w_new_gate else None
        return AdapterKV(k_t, v, gate, new_gate)

    def adapter_out(self, xq: Tensor, adapter_kv: AdapterKV) -> Optional[Tensor]:
        """The gated adapter term added to the attention output: xq (B, H, T, hd), rotated."""
        k_t, v, gate, new_gate = adapter_kv
        Q = v.shape[2]
        if Q == 0:
            return None  # no adapter tokens left: nothing to add
        if Q == 1:
            return gate * v  # (B, H, 1, hd), broadcast over T; upstream applies no new_gate here
        # a softmax of its own over the adapter tokens (not shared with the text keys), scaled by
        # tanh(gate) (and new_gate): one fused op (surgery.ops, eager/C++/CUDA/Triton)
        return ops.adapter_attention(xq, k_t, v, gate, new_gate)  # (B, H, T, hd)

    def forward(self, x: Tensor, start_pos: int, rope: tuple[Tensor, Tensor], mask: Optional[Tensor],
                adapter: Optional[Tensor] = None, adapter_kv: Optional[AdapterKV] = None,
                kv_cache: Optional[KVCache] = None) -> Tensor:
        """x (B, T, D) -> (B, T, D). `adapter` (B, Q, D) tokens, or `adapter_kv` computed from
        them by `adapter_kv()`; `kv_cache` holds the keys/values of earlier positions."""
        B, T, D = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)  # (B, T, D) each
        if self.w_lora:
            xq = xq + self.lora_wq_l2(self.lora_wq_l1(x))
            xk = xk + self.lora_wk_l2(self.lora_wk_l1(x))
            xv = xv + self.lora_wv_l2(self.lora_wv_l1(x))
        cos, sin = rope
        xq = apply_rotary_emb(self._heads(xq), cos, sin).transpose(1, 2)  # (B, H, T, hd)
        xk = apply_rotary_emb(self._heads(xk), cos, sin).transpose(1, 2)  # (B, H, T, hd)
        xv = self._heads(xv).transpose(1, 2)  # (B, H, T, hd)

        if kv_cache is not None:
            keys, values = kv_cache.update(start_pos, xk, xv)  # (B, H, S, hd) each
        else:
            keys, values = xk, xv  # (B, H, T, hd): a whole sequence from position start_pos

        if self.use_sdpa:
            out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask)  # (B, H, T, hd)
        else:
            scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)  # (B, H, T, S)
            if mask is not None:
                scores = scores + mask
            scores = F.softmax(scores.float(), dim=-1).type_as(xq)
            out = torch.matmul(scores, values)  # (B, H, T, hd)

        if adapter is not None:
            adapter_kv = self.adapter_kv(adapter)
        if adapter_kv is not None:
            extra = self.adapter_out(xq, adapter_kv)  # the ROTATED queries score the adapter keys
            if extra is not None:
                out = out + extra

        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        if self.w_lora:
            return self.wo(out) + self.lora_wo_l2(self.lora_wo_l1(out))
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.dim, ffn_hidden_dim(args.dim, args.multiple_of)
        self.w_lora = args.w_lora
        self.w1 = nn.Linear(dim, hidden, bias=args.w_bias)
        self.w2 = nn.Linear(hidden, dim, bias=args.w_bias)
        self.w3 = nn.Linear(dim, hidden, bias=args.w_bias)
        if args.w_bias:
            for w in (self.w1, self.w2, self.w3):
                nn.init.zeros_(w.bias)
        if args.w_lora:
            self.lora_w1_l1, self.lora_w1_l2 = _lora(dim, args.lora_rank, hidden)
            self.lora_w2_l1, self.lora_w2_l2 = _lora(hidden, args.lora_rank, dim)
            self.lora_w3_l1, self.lora_w3_l2 = _lora(dim, args.lora_rank, hidden)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w1(x), self.w3(x)  # (B, T, F) each
        if self.w_lora:
            gate = gate + self.lora_w1_l2(self.lora_w1_l1(x))
            up = up + self.lora_w3_l2(self.lora_w3_l1(x))
        h = F.silu(gate) * up  # (B, T, F)
        if self.w_lora:
            return self.w2(h) + self.lora_w2_l2(self.lora_w2_l1(h))
        return self.w2(h)  # (B, T, D)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: Tensor, start_pos: int, rope: tuple[Tensor, Tensor], mask: Optional[Tensor],
                adapter: Optional[Tensor] = None, adapter_kv: Optional[AdapterKV] = None,
                kv_cache: Optional[KVCache] = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask, adapter, adapter_kv, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, T, D)


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ModelConfigError("ModelArgs.vocab_size must be set (upstream takes it from the tokenizer)")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # upstream precomputes 2 * max_seq_len positions; the table grows if asked for more
        self.rotary = RotaryCache(params.head_dim, params.max_seq_len * 2)

    def rope(self, start_pos: int, seqlen: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.rotary.get(start_pos, seqlen, device)

    def new_kv_caches(self, batch: int, dtype: torch.dtype, device: torch.device | str,
                      max_len: Optional[int] = None) -> list[KVCache]:
        """One preallocated KVCache per layer, max_len positions (max_seq_len by default)."""
        p = self.params
        return [KVCache(batch, max_len or p.max_seq_len, p.n_heads, p.head_dim, dtype, device)
                for _ in range(self.n_layers)]

    def forward_layers(self, h: Tensor, start_pos: int, *, first_adapted: Optional[int] = None,
                       adapter: Optional[Callable[[int], Tensor]] = None,
                       adapter_kv: Optional[Sequence[AdapterKV]] = None,
                       kv_caches: Optional[Sequence[KVCache]] = None) -> Tensor:
        """Every layer over the hidden states h (B, T, D) at positions [start_pos, start_pos + T).

        Layers `first_adapted`, ... get adapters: layer first_adapted + j takes `adapter_kv[j]`
        (keys/values computed once per input), else the tokens `adapter(j)` (B, Q, D), whose
        keys/values the layer computes itself (upstream's per-step path); the layers before it
        (all of them when first_adapted is None) run plain. Without kv_caches the sequence
        attends only to itself (a training-style forward).
        """
        T = h.shape[1]
        rope = self.rope(start_pos, T, h.device)
        mask = causal_mask(start_pos if kv_caches is not None else 0, T, h.dtype, h.device)
        first = len(self.layers) if first_adapted is None else first_adapted
        for i, layer in enumerate(self.layers):
            cache = None if kv_caches is None else kv_caches[i]
            j = i - first
            if j < 0:
                h = layer(h, start_pos, rope, mask, kv_cache=cache)
            elif adapter_kv is not None:
                h = layer(h, start_pos, rope, mask, adapter_kv=adapter_kv[j], kv_cache=cache)
            else:
                h = layer(h, start_pos, rope, mask, adapter=None if adapter is None else adapter(j), kv_cache=cache)
        return h  # (B, T, D)

    def forward(self, tokens: Tensor, start_pos: int = 0,
                kv_caches: Optional[list[KVCache]] = None) -> Tensor:
        """Plain LLaMA, no adapter: tokens (B, T) -> logits (B, T, vocab) of every position.
        Without kv_caches the sequence attends only to itself (a training-style forward)."""
        h = self.forward_layers(self.tok_embeddings(tokens), start_pos, kv_caches=kv_caches)  # (B, T, D)
        return self.output(self.norm(h))  # (B, T, V)


# -- generation ----------------------------------------------------------------------------------


def decode(step: Callable[[Tensor, int], Tensor], prompts: Sequence[Sequence[int]], *, max_seq_len: int,
           max_gen_len: int, temperature: float, top_p: float, device: torch.device | str,
           generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
           pad_id: int = -1, on_token: Optional[Callable[[Tensor, Tensor], None]] = None) -> list[list[int]]:
    """Upstream's generation loop over token ids: the generated ids of each prompt (prompt
    removed, cut at EOS).

    `step(tokens (B, T), start_pos) -> logits (B, V)` runs the model on positions [start_pos,
    start_pos + T) and keeps its keys/values (a KV cache) so the next call continues. As upstream:
    prompts are left-aligned, the first call prefills the shortest prompt, then one position per
    call for all rows; positions inside a prompt keep the prompt's token. Greedy when temperature
    == 0, else temperature + top-p (`generator` makes it reproducible). Beyond upstream: any batch
    size, and the loop stops once every row has produced EOS.

    `on_token(tokens (B,), generated (B,) bool)` is called after every position with its token per
    row and whether it was generated (False: still inside that row's prompt): a caller streams text
    from it. Rows that already produced EOS keep being decoded until all have; their later tokens
    are not part of the result.
    """
    B = len(prompts)
    if B == 0:
        raise ModelInputError("no prompts: generation needs at least one")
    if min(len(p) for p in prompts) == 0:
        raise ModelInputError("empty prompt: a prompt needs at least one token (BOS)")
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    if int(lengths.max()) > max_seq_len:
        raise ModelInputError(f"a prompt of {int(lengths.max())} tokens exceeds max_seq_len={max_seq_len}")
    total_len = min(max_seq_len, max_gen_len + int(lengths.max()))
    tokens = torch.full((B, total_len), pad_id, dtype=torch.long, device=device)  # (B, S); pad is never embedded
    for k, p in enumerate(prompts):
        tokens[k, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    # prompt positions are kept as given; the others are generated
    input_text_mask = torch.arange(total_len, device=device)[None, :] < lengths[:, None]  # (B, S)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) produced EOS
    prev_pos = 0
    for cur_pos in range(int(lengths.min()), total_len):
        logits = step(tokens[:, prev_pos:cur_pos], prev_pos)  # (B, V)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
            next_token = sample_top_p(probs, top_p, generator)
        else:
            next_token = torch.argmax(logits, dim=-1)
        next_token = next_token.reshape(-1)  # (B,)
        generated = ~input_text_mask[:, cur_pos]
        next_token = torch.where(generated, next_token, tokens[:, cur_pos])
        tokens[:, cur_pos] = next_token
        if on_token is not None:
            on_token(next_token, generated)
        if eos_id is not None:
            done |= generated & (next_token == eos_id)
            if bool(done.all()):
                break
        prev_pos = cur_pos

    out = []
    for p, row in zip(prompts, tokens.tolist()):
        gen = row[len(p):len(p) + max_gen_len]
        if eos_id is not None and eos_id in gen:
            gen = gen[:gen.index(eos_id)]
        out.append(gen)
    return out
