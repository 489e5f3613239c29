"""LLaMA-Adapter V2 multimodal: CLIP visual queries feeding adapters of the last LLaMA layers.

    model = LLaMAAdapter(AdapterConfig.named("tiny"), tokenizer)   # submodule names as upstream's
    model.generate(images, ["a prompt", ...])                      # batch > 1, greedy or top-p

`query_len` (Q) and `query_layer` (L) are plain attributes read at every forward, so the surgery
plugin can change them (with the tensors) at run time; everything derived from them is cached under
a key that contains them, and `drop_caches()` forgets it all. Generation keeps upstream's semantics
but computes the adapter keys/values once per image (`cache_adapter=False` keeps upstream's per-step
recomputation as the baseline).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from timm.models.vision_transformer import Block

from surgery import ops
from surgery.errors import ModelConfigError, ModelInputError
from .clip import ClipVision, ClipVisionConfig
from .llama import AdapterKV, KVCache, ModelArgs, Transformer, decode
from .tokenizer import SHIPPED_VOCAB

Prompt = Union[str, Sequence[int], Tensor]


@dataclass
class AdapterConfig:
    # LLaMA: Meta's params.json (7B) and what upstream's load() sets
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    vocab_size: int = 32000  # upstream: tokenizer.n_words
    multiple_of: int = 256
    norm_eps: float = 1e-6
    max_batch_size: int = 1  # recorded for compatibility; generation is not limited by it
    max_seq_len: int = 512
    w_bias: bool = False  # upstream turns it on whenever phase == "finetune" (all releases)
    w_lora: bool = False
    lora_rank: int = 16
    w_new_gate: bool = False
    # visual branch
    clip: ClipVisionConfig = field(default_factory=ClipVisionConfig)  # ViT-L/14 at 224
    v_embed_dim: int = 768
    v_depth: int = 8
    v_num_heads: int = 16
    v_mlp_ratio: float = 4.0
    query_len: int = 10
    query_layer: int = 31
    # "upstream": the zero gates, zero biases and zero LoRA l2 upstream starts from (a fresh
    # adapter is a no-op); "random": small random values there too, so that every branch and
    # every count changes the outputs (tiny test models, benchmarks)
    init: str = "upstream"

    def llama_args(self) -> ModelArgs:
        names = {f.name for f in dataclasses.fields(ModelArgs)}
        return ModelArgs(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    @classmethod
    def named(cls, size: str = "7b", **overrides: Any) -> "AdapterConfig":
        """A config from the table below, with any field overridden."""
        if size not in NAMED_CONFIGS:
            raise ModelConfigError(f"unknown config {size!r}; known: {sorted(NAMED_CONFIGS)}")
        base = dict(NAMED_CONFIGS[size])
        base["clip"] = ClipVisionConfig(**base["clip"])
        return cls(**{**base, **overrides})


NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # every branch on and random (gates, biases, LoRA), small enough for unit tests on a CPU
    # (tiny and bench: the vocabulary of the package's tokenizer, which their registered models decode with)
    "tiny": dict(dim=64, n_layers=4, n_heads=4, vocab_size=SHIPPED_VOCAB, multiple_of=32, max_seq_len=64,
                 w_bias=True, w_lora=True, lora_rank=4, w_new_gate=True,
                 clip=dict(image_size=28, patch_size=14, width=128, layers=2, heads=2, output_dim=32),
                 v_embed_dim=32, v_depth=2, v_num_heads=2, query_len=3, query_layer=3, init="random"),
    # 7B's shape ratios at a size a CPU decodes in seconds (benchmarks)
    "bench": dict(dim=1024, n_layers=16, n_heads=16, vocab_size=SHIPPED_VOCAB, max_seq_len=512, w_bias=True,
                  clip=dict(image_size=224, patch_size=32, width=512, layers=4, heads=8, output_dim=512),
                  v_embed_dim=512, v_depth=4, v_num_heads=8, query_len=10, query_layer=15, init="random"),
    # the released BIAS-7B architecture (LORA-BIAS-7B: w_lora=True, w_new_gate=True)
    "7b": dict(w_bias=True, clip={}),
}


def randomize_zero_inits(model: nn.Module, std: float = 0.5) -> None:
    """Give the parameters upstream zero-initialises (gates, new_gate, LLaMA biases, LoRA l2) random
    values; ImageBind-LLM's models use it too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gate", "new_gate"):
                p.uniform_(-1.0, 1.0)  # tanh(gate) well away from 0
            elif (name.startswith("llama.") and leaf == "bias") or "_l2." in name:
                p.normal_(0.0, std * 0.1)


class CLIPImageTower(nn.Module):
    """Holds the encoder at `.visual`, where upstream's `clip` keeps its image tower."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.visual = ClipVision(config)

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)  # (B, 1+N, C_clip), every token after ln_post and proj


class _Caches:
    """Everything generation derives from the counts, the weights, the batch, dtype and device.

    One object for the model's life (drop_caches empties it), so the model's attributes keep
    their identity; copies and pickles of the model start with it empty.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.kv_key: Optional[tuple] = None
        self.kv: Optional[list[KVCache]] = None
        self.adapter_inputs: Optional[_Inputs] = None  # what the adapter K/V were computed from
        self.adapter_kv: Optional[list[AdapterKV]] = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


def _state(t: Tensor) -> tuple:
    """What tells a tensor's contents apart without reading them: where and how they are laid
    out, and the in-place version counter (None for an inference tensor: it has none)."""
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, version)


class _Inputs:
    """The tensors a cached value was computed from, able to tell whether any has changed since.

    Each is held weakly (a cache must not keep replaced weights alive) and compared by identity,
    storage, layout and version counter, so an in-place edit (`p.mul_()` under no_grad, an
    optimizer step, `load_state_dict`) or a replaced Parameter is seen without reading values.
    Inference tensors have no version counter: the `source` (visual_query, small) is then kept as
    a copy and compared by value; any other untracked tensor means the value is never reused.
    Edits through `.data` bypass the version counter by PyTorch's design: `drop_caches()` then.
    """

    def __init__(self, source: Tensor, weights: Sequence[Tensor]):
        tensors = [source, *weights]
        self.refs = [weakref.ref(t) for t in tensors]
        self.states = [_state(t) for t in tensors]
        self.source_copy = source.clone() if source.is_inference() else None
        self.reusable = all(not w.is_inference() for w in weights)

    def unchanged(self, source: Tensor, weights: Sequence[Tensor]) -> bool:
        tensors = [source, *weights]
        if not self.reusable or len(tensors) != len(self.refs):
            return False
        for ref, state, t in zip(self.refs, self.states, tensors):
            if ref() is not t or _state(t) != state:
                return False
        return self.source_copy is None or torch.equal(self.source_copy, source)


class LLaMAAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, tokenizer: Any = None):
        super().__init__()
        config = dataclasses.replace(config)  # the model's own copy: the plugin edits its counts
        if tokenizer is not None:
            config.vocab_size = tokenizer.n_words  # as upstream
        self.config = config
        self.clip = CLIPImageTower(config.clip)
        self.clip_proj = nn.Linear(config.clip.output_dim, config.v_embed_dim)
        self.clip_proj_norm = nn.LayerNorm(config.v_embed_dim)
        self.query_len = config.query_len
        self.query_layer = config.query_layer
        self.visual_query = nn.Embedding(config.query_len, config.v_embed_dim)
        # timm 0.3.2's Block: nn.LayerNorm with eps 1e-5 (today's timm default is 1e-6)
        self.visual_blocks = nn.ModuleList(
            Block(config.v_embed_dim, config.v_num_heads, config.v_mlp_ratio, qkv_bias=True,
                  norm_layer=nn.LayerNorm)
            for _ in range(config.v_depth))
        self.visual_proj = nn.Linear(config.v_embed_dim, config.dim)
        self.visual_proj_norm = nn.LayerNorm(config.dim)
        self.adapter_query = nn.Embedding(config.query_len * config.query_layer, config.dim)
        self.tokenizer = tokenizer
        self.llama = Transformer(config.llama_args())
        self.criterion = nn.CrossEntropyLoss(ignore_index=0)
        self._caches = _Caches()
        if config.init == "random":
            randomize_zero_inits(self)
        elif config.init != "upstream":
            raise ModelConfigError(f"AdapterConfig.init must be 'upstream' or 'random', got {config.init!r}")

    # -- counts ----------------------------------------------------------------------------------

    def _n_plain(self) -> int:
        """Layers before the adapted ones: the last query_layer layers get adapters."""
        L, n = self.query_layer, len(self.llama.layers)
        if not 0 <= L <= n:
            raise ModelConfigError(f"query_layer={L} but the model has {n} layers")
        return n - L

    def drop_caches(self) -> None:
        """Forget the adapter K/V and KV-cache buffers (sized for the old counts)."""
        self._caches.clear()

    # -- visual branch ---------------------------------------------------------------------------

    def forward_visual(self, imgs: Tensor) -> Tensor:
        """images (B, 3, S, S) -> visual queries (B, query_len, dim), in the visual modules' dtype."""
        Q = self.query_len
        if self.visual_query.weight.shape[0] != Q:
            raise ModelConfigError(f"visual_query has {self.visual_query.weight.shape[0]} rows but query_len={Q}")
        feats = self.clip(imgs.to(self.clip_proj.weight.device))  # (B, 1+N, C_clip)
        # upstream: .float() under autocast; here: the dtype the projection runs in
        feats = feats.to(self.clip_proj.weight.dtype)
        feats = self.clip_proj_norm(self.clip_proj(feats))  # (B, 1+N, C)
        x = ops.query_concat(self.visual_query.weight, feats)  # (B, Q+1+N, C)
        for block in self.visual_blocks:
            x = block(x)  # (B, Q+1+N, C)
        x = x[:, :Q]  # (B, Q, C): the learned queries, now informed by the image
        return self.visual_proj_norm(self.visual_proj(x))  # (B, Q, D)

    def adapter_table(self) -> Tensor:
        """adapter_query.weight seen as (query_layer, query_len, dim)."""
        L, Q = self.query_layer, self.query_len
        w = self.adapter_query.weight  # (L*Q, D)
        if w.shape[0] != L * Q:
            raise ModelConfigError(f"adapter_query has {w.shape[0]} rows, not query_layer*query_len = {L}*{Q}")
        return w.view(L, Q, w.shape[1])  # (L, Q, D)

    def dynamic_adapters(self, visual_query: Tensor) -> Tensor:
        """The adapter tokens of every adapted layer: (L, B, Q, D)."""
        return ops.adapter_add(self.adapter_table(), visual_query)

    def _adapted_attentions(self) -> list[nn.Module]:
        return [layer.attention for layer in self.llama.layers[self._n_plain():]]

    def adapter_kv(self, visual_query: Tensor) -> list[AdapterKV]:
        """Adapter keys/values of every adapted layer, computed once for these images."""
        adapters = self.dynamic_adapters(visual_query)  # (L, B, Q, D)
        return [attn.adapter_kv(adapters[j]) for j, attn in enumerate(self._adapted_attentions())]

    def _adapter_kv_weights(self) -> list[Tensor]:
        """Every parameter `adapter_kv` reads: the table, and each adapted layer's wk, wv and gates."""
        weights = [self.adapter_query.weight]
        for attn in self._adapted_attentions():
            weights += [attn.wk.weight, attn.wv.weight, attn.gate]
            if attn.w_new_gate:
                weights.append(attn.new_gate)
        return weights

    def cached_adapter_kv(self, visual_query: Tensor) -> list[AdapterKV]:
        """`adapter_kv(visual_query)`, reused while the counts, every parameter it reads and the
        visual_query itself are the same tensors, unedited (see `_Inputs`)."""
        weights = self._adapter_kv_weights()  # also follows query_layer: another layer set, another list
        c = self._caches
        if c.adapter_inputs is None or not c.adapter_inputs.unchanged(visual_query, weights):
            c.adapter_inputs, c.adapter_kv = None, None  # a failure below leaves no stale pair
            adapter_kv = self.adapter_kv(visual_query)
            c.adapter_inputs, c.adapter_kv = _Inputs(visual_query, weights), adapter_kv
        return c.adapter_kv

    def kv_caches(self, batch: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        """The model's KV cache (one preallocated KVCache per layer), made on first use."""
        key = (self.query_len, self.query_layer, batch, self.config.max_seq_len, len(self.llama.layers),
               dtype, torch.device(device))
        c = self._caches
        if c.kv_key != key:
            c.kv = None  # free the old buffers before allocating the new ones
            c.kv = self.llama.new_kv_caches(batch, dtype, device, self.config.max_seq_len)
            c.kv_key = key
        return c.kv

    # -- language model --------------------------------------------------------------------------

    def _layers(self, h: Tensor, start_pos: int, *, adapters: Optional[Tensor] = None,
                adapter_kv: Optional[list[AdapterKV]] = None, visual_query: Optional[Tensor] = None,
                kv_caches: Optional[list[KVCache]] = None) -> Tensor:
        """Run every LLaMA layer: the first n_layers-L plain, the last L with their adapter from
        `adapter_kv`, else `adapters` (L, B, Q, D), else recomputed from `visual_query` as upstream."""
        adapter = None
        if adapter_kv is None and adapters is not None:
            adapter = adapters.__getitem__
        elif adapter_kv is None and self.query_layer:
            # the baseline: upstream's per-call view of the table, tokens re-added in every layer
            upstream = self.adapter_table().unsqueeze(1)  # (L, 1, Q, D)
            adapter = lambda j: upstream[j].repeat(visual_query.shape[0], 1, 1) + visual_query  # noqa: E731 (B, Q, D)
        return self.llama.forward_layers(h, start_pos, first_adapted=self._n_plain(), adapter=adapter,
                                         adapter_kv=adapter_kv, kv_caches=kv_caches)  # (B, T, D)

    def forward(self, tokens: Tensor, labels: Tensor, imgs: Tensor) -> tuple[Tensor, Tensor]:
        """Training loss (next-token cross-entropy, label 0 ignored), returned twice as upstream."""
        visual_query = self.forward_visual(imgs)  # (B, Q, D)
        h = self.llama.tok_embeddings(tokens)  # (B, T, D)
        h = self._layers(h, 0, adapters=self.dynamic_adapters(visual_query) if self.query_layer else None)
        output = self.llama.output(self.llama.norm(h))  # (B, T, V)
        output, labels = output[:, :-1, :], labels[:, 1:]  # predict token t+1 from position t
        if labels.sum() == 0:
            loss = output.mean() * 0  # nothing to learn from, but keep the graph
        else:
            loss = self.criterion(output.reshape(-1, output.shape[-1]).float(), labels.flatten())
        return loss, loss

    @torch.inference_mode()
    def forward_inference(self, visual_query: Tensor, tokens: Tensor, start_pos: int, *,
                          cache_adapter: bool = False, adapter_kv: Optional[list[AdapterKV]] = None,
                          kv_caches: Optional[list[KVCache]] = None) -> Tensor:
        """tokens (B, T) at positions [start_pos, start_pos+T) -> logits of the last one (B, V), float.

        Keys/values go to `kv_caches` (the model's own by default), so calls continue one another
        as upstream's do. The adapters come from `adapter_kv`, else from the per-image cache
        (`cache_adapter`), else are recomputed from `visual_query` in every layer (upstream).
        """
        tokens = tokens.to(self.llama.tok_embeddings.weight.device)
        h = self.llama.tok_embeddings(tokens)  # (B, T, D)
        if kv_caches is None:
            kv_caches = self.kv_caches(h.shape[0], h.dtype, h.device)
        if adapter_kv is None and cache_adapter and self.query_layer:
            adapter_kv = self.cached_adapter_kv(visual_query)
        h = self._layers(h, start_pos, adapter_kv=adapter_kv, visual_query=visual_query, kv_caches=kv_caches)
        h = self.llama.norm(h[:, -1, :])  # (B, D): norm is per position, only the last is needed
        return self.llama.output(h).float()  # (B, V)

    # -- generation ------------------------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ModelInputError("string prompts need a tokenizer: LLaMAAdapter(config, tokenizer)")
            return self.tokenizer.encode(prompt, bos=True, eos=False)
        ids = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
        return [int(t) for t in ids]

    @torch.inference_mode()
    def generate_tokens(self, imgs: Tensor, prompts: Sequence[Prompt], max_gen_len: int = 256,
                        temperature: float = 0.1, top_p: float = 0.75, cache_adapter: bool = True,
                        generator: Optional[torch.Generator] = None,
                        eos_id: Optional[int] = None, on_token: Optional[Any] = None) -> list[list[int]]:
        """The generated ids of each prompt (prompt removed, cut at EOS). See `generate`;
        `on_token(tokens (B,), generated (B,))` sees every position as it is decoded (`llama.decode`)."""
        prompts = [self._encode(p) for p in prompts]
        if len(prompts) == 0 or len(imgs) != len(prompts):
            raise ModelInputError(f"{len(imgs)} images for {len(prompts)} prompts: one image per prompt")
        if eos_id is None and self.tokenizer is not None:
            eos_id = self.tokenizer.eos_id
        visual_query = self.forward_visual(imgs)  # (B, Q, D)
        device = visual_query.device
        dtype = self.llama.tok_embeddings.weight.dtype
        kv_caches = self.kv_caches(len(prompts), dtype, device)
        adapter_kv = self.cached_adapter_kv(visual_query) if cache_adapter and self.query_layer else None

        def step(tokens: Tensor, start_pos: int) -> Tensor:
            return self.forward_inference(visual_query, tokens, start_pos, adapter_kv=adapter_kv, kv_caches=kv_caches)

        pad = self.tokenizer.pad_id if self.tokenizer is not None else -1  # never embedded
        return decode(step, prompts, max_seq_len=self.config.max_seq_len, max_gen_len=max_gen_len,
                      temperature=temperature, top_p=top_p, device=device, generator=generator,
                      eos_id=eos_id, pad_id=pad, on_token=on_token)

    @torch.inference_mode()
    def generate(self, imgs: Tensor, prompts: Sequence[Prompt], max_gen_len: int = 256,
                 temperature: float = 0.1, top_p: float = 0.75, cache_adapter: bool = True,
                 generator: Optional[torch.Generator] = None) -> list[str]:
        """One image per prompt (strings, or token id lists that include BOS) -> decoded answers.

        Greedy when temperature == 0, else temperature + top-p sampling (`generator` makes it
        reproducible). Stops when every sequence has produced EOS. `cache_adapter=False` is
        upstream's per-step recomputation of the adapters (the baseline; same tokens).
        """
        if self.tokenizer is None:
            raise ModelConfigError("generate decodes with a tokenizer: LLaMAAdapter(config, tokenizer), "
                                   "or use generate_tokens")
        ids = self.generate_tokens(imgs, prompts, max_gen_len, temperature, top_p, cache_adapter, generator)
        return [self.tokenizer.decode(t) for t in ids]
