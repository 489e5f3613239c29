"""ImageBind-LLM: ImageBind's joint embedding as the visual input of every adapted LLaMA layer.

    model = ImageBindLLM(ImageBindLLMConfig.named("tiny"), tokenizer)
    model.generate({"Image": [images, 1], "Audio": [audio, 0.5]}, ["a prompt", ...])

Upstream (`imagebind_LLM/llama/llama_adapter.py`) reads one token per modality; here a modality whose
head is in mode `all` gives one visual token per CLS token, and each adapted layer attends over the K
tokens (one token is upstream's path exactly). Two modalities with different counts above one are
refused: token i of one encoder has no counterpart in the other. The LLaMA is the LLaMA-Adapter V2
plugin's; generation computes each layer's adapter keys/values once per input (`cache_adapter`).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery import ops
from surgery.errors import ModelConfigError, ModelInputError
from surgery_plugins.imagebind.model import ImageBindModel
from surgery_plugins.llama_adapter.llama import AdapterKV, KVCache, Transformer, decode
from surgery_plugins.llama_adapter.model import randomize_zero_inits  # the same zero-initialised set

from .bridge import add_bridge, bridge_names, run_bridge
from .config import PHASES, ImageBindLLMConfig
from .knn import KnnCache

Prompt = Union[str, Sequence[int], Tensor]
ALIASES = {"image": "vision", "video": "vision"}  # upstream's 'Image' and 'Video' both go to ImageBind's vision
WEIGHT_EPS = 1e-6  # upstream divides the weights by their sum + 1e-6


class _DecodeCaches:
    """The KV cache that successive `forward_inference` calls continue (upstream keeps one in every
    Attention), sized once per (batch, dtype, device). Copies and pickles of the model start empty."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key: Optional[tuple] = None
        self.kv: Optional[list[KVCache]] = None

    def get(self, llama: Transformer, batch: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        key = (batch, dtype, torch.device(device), llama.params.max_seq_len, len(llama.layers))
        if self.key != key:
            self.kv = None  # free the old buffers before allocating the new ones
            self.kv = llama.new_kv_caches(batch, dtype, device)
            self.key = key
        return self.kv

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


class ImageBindLLM(nn.Module):
    def __init__(self, config: ImageBindLLMConfig, tokenizer: Any = None):
        super().__init__()
        config = copy.deepcopy(config)  # the model's own copy: the plugin edits its counts
        if tokenizer is not None:
            config.vocab_size = tokenizer.n_words  # as upstream
        self.config = config
        self.image_bind = ImageBindModel(config.imagebind_config())
        # from here on the encoder's own config describes it (its sites keep it in step)
        config.imagebind, config.num_cls_tokens, config.head_mode, config.modalities = \
            self.image_bind.config, {}, None, None
        add_bridge(self, self.image_bind.config.out_embed_dim, config.dim, config.legacy_bridge)
        self.tokenizer = tokenizer
        self.llama = Transformer(config.llama_args())
        self.query_layer = config.query_layer
        self.prefix_query = nn.Embedding(config.query_layer, config.dim)  # one row per adapted layer
        self.criterion = nn.CrossEntropyLoss(ignore_index=0)
        self.knn: Optional[KnnCache] = None
        self._decode = _DecodeCaches()
        if config.init == "random":
            randomize_zero_inits(self)

    # -- counts and caches -----------------------------------------------------------------------

    def _n_plain(self) -> int:
        """Layers before the adapted ones: the last query_layer layers get adapters."""
        L, n = self.query_layer, len(self.llama.layers)
        if not 1 <= L <= n:
            raise ModelConfigError(f"query_layer={L} but the model has {n} layers")
        return n - L

    def drop_caches(self) -> None:
        """Forget the KV-cache buffers that forward_inference continues."""
        self._decode.clear()

    # -- the visual input ------------------------------------------------------------------------

    def modality(self, name: str) -> str:
        """ImageBind's modality for an input name: upstream's 'Image' / 'Video' / 'Audio' / 'Text' /
        'Point' ..., or the encoder's own names ('vision', 'imu', ...), case-insensitively."""
        if not isinstance(name, str):
            raise ModelInputError(f"input names are strings, got {name!r}")
        modality = ALIASES.get(name.lower(), name.lower())
        if modality not in self.image_bind.modalities:
            names = ["Image", "Video", *(m.capitalize() for m in self.image_bind.modalities if m != "vision")]
            raise ModelInputError(f"unknown modality {name!r}; this model takes {', '.join(names)} "
                                  f"(ImageBind's {', '.join(self.image_bind.modalities)})")
        return modality

    def visual_tokens(self, modality: str) -> int:
        """How many visual tokens a modality gives: its CLS-token count when its head is in mode
        `all`, else one (`first`, `mean`, text's end-of-text token)."""
        if self.image_bind.head_mode(modality) == "all":
            return self.image_bind.num_cls_tokens(modality)
        return 1

    def _parse_inputs(self, inputs: Mapping[str, Any]) -> list[tuple[str, Tensor, float]]:
        """[(modality, tensor, normalised weight)], every input checked before any encoder runs
        (names, pairs, weights, batch sizes, and that the modalities' token counts combine)."""
        if not isinstance(inputs, Mapping) or not inputs:
            got = "an empty dict" if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ModelInputError(f"forward_visual takes a non-empty dict {{modality: [tensor, weight]}}, got {got}")
        parsed = []
        for name, value in inputs.items():
            modality = self.modality(name)
            x, weight = (value, 1.0) if isinstance(value, Tensor) else _pair(name, value)
            if not isinstance(x, Tensor) or x.dim() == 0:
                got = "a 0-d tensor" if isinstance(x, Tensor) else type(x).__name__
                raise ModelInputError(f"{name}: expected a batched tensor (items along dim 0), got {got}")
            parsed.append((name, modality, x, _weight(name, weight)))
        batches = {name: x.shape[0] for name, _, x, _ in parsed}
        if len(set(batches.values())) > 1:
            raise ModelInputError("the inputs have different batch sizes ("
                                  + ", ".join(f"{n} {b}" for n, b in batches.items())
                                  + "); every modality describes the same items, one row each")
        total = sum(w for *_, w in parsed)
        if abs(total) <= WEIGHT_EPS:
            raise ModelInputError(f"the modality weights sum to {total:g}; they are divided by their sum, so it "
                                  f"must not be 0 (give positive weights, e.g. 1 each)")
        counts = {name: self.visual_tokens(modality) for name, modality, _, _ in parsed}
        K = max(counts.values())
        if any(k not in (1, K) for k in counts.values()):
            raise ModelInputError("the modalities give different numbers of visual tokens ("
                                  + ", ".join(f"{n} {k}" for n, k in counts.items())
                                  + "); each must give the same K or one (a single token is added to each of "
                                    "the K): set num_cls_tokens or head modes to agree")
        return [(m, x, w / (total + WEIGHT_EPS)) for _, m, x, w in parsed]

    def encode(self, inputs: Mapping[str, Any], cache_size: int = 10, cache_t: float = 20.0,
               cache_weight: float = 0.5) -> Tensor:
        """The combined joint-space embedding (B, K, E): each modality's normalised embedding
        (k tokens, or one added to each of the K), weighted by its share of the weights' sum;
        then the kNN cache when one is attached."""
        parsed = self._parse_inputs(inputs)
        if self.knn is not None:
            self.knn.check(cache_size, cache_t, cache_weight)
        feats = None
        for modality, x, weight in parsed:
            e = F.normalize(self.image_bind({modality: x})[modality], dim=-1)  # (B, E) or (B, k, E)
            term = (e if e.dim() == 3 else e.unsqueeze(1)) * weight  # (B, k, E), k in (1, K)
            feats = term if feats is None else feats + term  # upstream's sum, in input order
        if self.knn is not None:
            feats = self.knn.mix(feats, cache_size, cache_t, cache_weight)
        return feats  # (B, K, E)

    def forward_visual(self, inputs: Mapping[str, Any], cache_size: int = 10, cache_t: float = 20.0,
                       cache_weight: float = 0.5) -> Tensor:
        """{name: [tensor, weight]} -> visual tokens (B, K, dim) in the bridge's dtype."""
        return run_bridge(self, self.encode(inputs, cache_size, cache_t, cache_weight))

    def attach_knn(self, path: str | os.PathLike | None) -> None:
        """Use the faiss index file at `path` as the kNN cache (None: no cache). On an error the
        cache in use stays as it was."""
        self.knn = None if path is None else KnnCache.from_file(path, self.image_bind.config.out_embed_dim)

    # -- adapters --------------------------------------------------------------------------------

    def prefix_table(self) -> Tensor:
        """prefix_query.weight seen as (query_layer, 1, dim): one row per adapted layer."""
        w = self.prefix_query.weight  # (L, D)
        if w.shape[0] != self.query_layer:
            raise ModelConfigError(f"prefix_query has {w.shape[0]} rows but query_layer={self.query_layer}")
        return w.view(self.query_layer, 1, w.shape[1])  # (L, 1, D)

    def adapters(self, visual: Tensor) -> Tensor:
        """The adapter tokens of every adapted layer, visual + its prefix row: (L, B, K, D)."""
        table = self.prefix_table()
        L, _, D = table.shape
        K = visual.shape[1]
        if K > 1:  # the prefix row is added to each of the K tokens (upstream's broadcast)
            table = table.expand(L, K, D).contiguous()
        return ops.adapter_add(table, visual.to(table.dtype))  # (L, B, K, D)

    def _adapted_attentions(self) -> list[nn.Module]:
        return [layer.attention for layer in self.llama.layers[self._n_plain():]]

    def adapter_kv(self, visual: Tensor) -> list[AdapterKV]:
        """Every adapted layer's adapter keys/values for these visual tokens: computed once per
        input, reused by every decoding step."""
        adapters = self.adapters(visual)  # (L, B, K, D)
        return [attn.adapter_kv(adapters[j]) for j, attn in enumerate(self._adapted_attentions())]

    # -- language model --------------------------------------------------------------------------

    def _layers(self, h: Tensor, start_pos: int, *, visual: Optional[Tensor] = None,
                adapter_kv: Optional[list[AdapterKV]] = None, adapters: Optional[Tensor] = None,
                kv_caches: Optional[list[KVCache]] = None) -> Tensor:
        """Every LLaMA layer; the adapted ones take `adapter_kv`, else `adapters` (L, B, K, D), else
        visual + prefix_query[j] recomputed in every layer (upstream's per-call path)."""
        if adapter_kv is None and adapters is None:
            rows = self.prefix_table()[:, 0]  # (L, D)
            adapter = lambda j: visual + rows[j]  # noqa: E731  (B, K, D)
        else:
            adapter = None if adapters is None else adapters.__getitem__
        return self.llama.forward_layers(h, start_pos, first_adapted=self._n_plain(), adapter=adapter,
                                         adapter_kv=adapter_kv, kv_caches=kv_caches)

    def forward(self, tokens: Tensor, labels: Tensor,
                inputs: Union[Tensor, Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
        """Training loss (next-token cross-entropy, label 0 ignored), returned twice as upstream.
        `inputs`: images (upstream's `imgs`, weight 1) or a dict {modality: [tensor, weight]}."""
        visual = self.forward_visual({"Image": [inputs, 1]} if isinstance(inputs, Tensor) else inputs)  # (B, K, D)
        h = self.llama.tok_embeddings(tokens)  # (B, T, D)
        h = self._layers(h, 0, adapters=self.adapters(visual))
        output = self.llama.output(self.llama.norm(h))  # (B, T, V)
        output, labels = output[:, :-1, :], labels[:, 1:]  # predict token t+1 from position t
        if labels.sum() == 0:
            loss = output.mean() * 0  # nothing to learn from, but keep the graph
        else:
            loss = self.criterion(output.reshape(-1, output.shape[-1]).float(), labels.flatten())
        return loss, loss

    @torch.inference_mode()
    def forward_inference(self, visual: Tensor, tokens: Tensor, start_pos: int, *,
                          adapter_kv: Optional[list[AdapterKV]] = None,
                          kv_caches: Optional[list[KVCache]] = None) -> Tensor:
        """tokens (B, T) at positions [start_pos, start_pos+T) -> logits of the last one (B, V), float.

        Keys/values go to `kv_caches` (the model's own by default), so calls continue one another
        as upstream's do. The adapters come from `adapter_kv` (`adapter_kv(visual)`, computed once),
        else are recomputed from `visual` (B, K, dim) in every layer, as upstream.
        """
        tokens = tokens.to(self.llama.tok_embeddings.weight.device)
        h = self.llama.tok_embeddings(tokens)  # (B, T, D)
        if kv_caches is None:
            kv_caches = self._decode.get(self.llama, h.shape[0], h.dtype, h.device)
        h = self._layers(h, start_pos, visual=visual, adapter_kv=adapter_kv, kv_caches=kv_caches)
        return self.llama.output(self.llama.norm(h[:, -1, :])).float()  # (B, V)

    # -- generation ------------------------------------------------------------------------------

    def _encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ModelInputError("string prompts need a tokenizer: ImageBindLLM(config, tokenizer)")
            return self.tokenizer.encode(prompt, bos=True, eos=False)
        ids = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
        return [int(t) for t in ids]

    @torch.inference_mode()
    def generate_tokens(self, inputs: Mapping[str, Any], prompts: Sequence[Prompt], max_gen_len: int = 256,
                        temperature: float = 0.1, top_p: float = 0.75, cache_size: int = 10,
                        cache_t: float = 20.0, cache_weight: float = 0.5, *, cache_adapter: bool = True,
                        generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
                        on_token: Optional[Any] = None) -> list[list[int]]:
        """The generated ids of each prompt (prompt removed, cut at EOS). See `generate`;
        `on_token(tokens (B,), generated (B,))` sees every position as it is decoded (`llama.decode`)."""
        prompts = [self._encode_prompt(p) for p in prompts]
        visual = self.forward_visual(inputs, cache_size, cache_t, cache_weight)  # (B, K, D)
        if visual.shape[0] != len(prompts):
            raise ModelInputError(f"the inputs hold {visual.shape[0]} items for {len(prompts)} prompts: one per prompt")
        if eos_id is None and self.tokenizer is not None:
            eos_id = self.tokenizer.eos_id
        dtype = self.llama.tok_embeddings.weight.dtype
        kv_caches = self._decode.get(self.llama, len(prompts), dtype, visual.device)
        adapter_kv = self.adapter_kv(visual) if cache_adapter else None

        def step(tokens: Tensor, start_pos: int) -> Tensor:
            return self.forward_inference(visual, tokens, start_pos, adapter_kv=adapter_kv, kv_caches=kv_caches)

        pad = self.tokenizer.pad_id if self.tokenizer is not None else -1
        return decode(step, prompts, max_seq_len=self.config.max_seq_len, max_gen_len=max_gen_len,
                      temperature=temperature, top_p=top_p, device=visual.device, generator=generator,
                      eos_id=eos_id, pad_id=pad, on_token=on_token)

    @torch.inference_mode()
    def generate(self, inputs: Mapping[str, Any], prompts: Sequence[Prompt], max_gen_len: int = 256,
                 temperature: float = 0.1, top_p: float = 0.75, cache_size: int = 10, cache_t: float = 20.0,
                 cache_weight: float = 0.5, *, cache_adapter: bool = True,
                 generator: Optional[torch.Generator] = None) -> list[str]:
        """Inputs {modality: [tensor, weight]} with one item per prompt (strings, or token id lists
        that include BOS) -> decoded answers. Greedy when temperature == 0, else temperature +
        top-p sampling (`generator` makes it reproducible); stops when every row has produced EOS.
        `cache_size`, `cache_t`, `cache_weight` drive the kNN cache (`attach_knn`)."""
        if self.tokenizer is None:
            raise ModelInputError("generate decodes with a tokenizer: ImageBindLLM(config, tokenizer), "
                                  "or use generate_tokens")
        ids = self.generate_tokens(inputs, prompts, max_gen_len, temperature, top_p, cache_size, cache_t,
                                   cache_weight, cache_adapter=cache_adapter, generator=generator)
        return [self.tokenizer.decode(t) for t in ids]

    # -- training --------------------------------------------------------------------------------

    def trainable_parameters(self, phase: str = "finetune") -> dict[str, nn.Parameter]:
        """Upstream's trainable set of a phase. `finetune`: the LLaMA's norms, biases and LoRA;
        `pretrain`: the LLaMA's gates, the bridge (`image_bind_*`, not the `image_bind.` encoder)
        and `prefix_query`."""
        if phase not in PHASES:
            raise ModelConfigError(f"unknown phase {phase!r}; upstream's phases: {', '.join(PHASES)}")
        bridge = tuple(f"{name}." for name in bridge_names())
        chosen = {}
        for name, p in self.named_parameters():
            if phase == "finetune":
                keep = name.startswith("llama.") and any(w in name for w in ("norm", "bias", "lora"))
            else:
                keep = (name.startswith("llama.") and "gate" in name) or name.startswith(bridge) \
                    or name.startswith("prefix_query.")
            if keep:
                chosen[name] = p
        return chosen

    def set_trainable(self, phase: str = "finetune") -> dict[str, nn.Parameter]:
        """Freeze everything but the phase's trainable set (returned)."""
        chosen = self.trainable_parameters(phase)
        for name, p in self.named_parameters():
            p.requires_grad_(name in chosen)
        return chosen


def _pair(name: str, value: Any) -> tuple[Any, Any]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ModelInputError(f"{name}: expected [tensor, weight] (or a tensor, weight 1), got {type(value).__name__}"
                              + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else ""))
    return value[0], value[1]


def _weight(name: str, weight: Any) -> float:
    if isinstance(weight, Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ModelInputError(f"{name}: the weight must be a finite number, got {weight!r}")
    return float(weight)


__all__ = ["ImageBindLLM", "ImageBindLLMConfig", "ALIASES"]
