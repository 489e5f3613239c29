"""ImageBind-LLM configurations: the released 7B architecture and small ones for tests and benchmarks.

    ImageBindLLMConfig.named("7b")                                   # upstream's LLaMA_adapter
    ImageBindLLMConfig.named("tiny", num_cls_tokens={"vision": 4}, head_mode="all")

What upstream hard-codes becomes fields: the LLaMA, the phase (`finetune`: biases and LoRA), the
bridge's form (`legacy_bridge`), `query_layer`, and the ImageBind encoder's config.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import ModelConfigError
from surgery_plugins.imagebind.config import ImageBindConfig
from surgery_plugins.llama_adapter.llama import ModelArgs
from surgery_plugins.llama_adapter.tokenizer import SHIPPED_VOCAB

PHASES = ("finetune", "pretrain")
INITS = ("upstream", "random")


@dataclass
class ImageBindLLMConfig:
    # LLaMA: Meta's params.json (7B) and what upstream's LLaMA_adapter sets
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    vocab_size: int = 32000  # upstream: tokenizer.n_words
    multiple_of: int = 256
    norm_eps: float = 1e-6
    max_batch_size: int = 1  # recorded for compatibility; generation is not limited by it
    max_seq_len: int = 512
    lora_rank: int = 16
    # "finetune": the LLaMA has bias and LoRA parameters (upstream: w_bias = w_lora = phase == "finetune");
    # the trainable set of a phase is chosen separately (`ImageBindLLM.set_trainable`)
    phase: str = "finetune"
    legacy_bridge: bool = False  # the bridge's norms are LayerNorm (eps 1e-5) and its Linears have biases
    query_layer: int = 32  # the last query_layer layers get adapters (one prefix row each)
    # the encoder: a named ImageBind config of the imagebind plugin, with per-modality CLS-token
    # counts and head modes ("all" feeds k visual tokens to the LLaMA), or an ImageBindConfig
    # itself. A built model's config holds its encoder's own config object here (the encoder's
    # sites keep its counts and modes in step) and the three fields below are then empty.
    imagebind: str | ImageBindConfig = "huge_w3d"
    num_cls_tokens: dict[str, int] = field(default_factory=dict)
    head_mode: str | dict[str, str] | None = None
    modalities: tuple[str, ...] | None = None
    # "upstream": the zero gates, biases and LoRA l2 upstream starts from (a fresh adapter changes
    # nothing); "random": small random values there too, so every branch shows in the outputs (tests)
    init: str = "upstream"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ModelConfigError(f"phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        if self.init not in INITS:
            raise ModelConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.dim % self.n_heads:
            raise ModelConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if not 1 <= self.query_layer <= self.n_layers:
            raise ModelConfigError(f"query_layer must be within 1..n_layers={self.n_layers}, got {self.query_layer}")

    @property
    def bias_lora(self) -> bool:
        return self.phase == "finetune"

    def llama_args(self) -> ModelArgs:
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=self.vocab_size,
                         multiple_of=self.multiple_of, norm_eps=self.norm_eps, max_batch_size=self.max_batch_size,
                         max_seq_len=self.max_seq_len, w_bias=self.bias_lora, w_lora=self.bias_lora,
                         lora_rank=self.lora_rank, w_new_gate=False)

    def imagebind_config(self) -> ImageBindConfig:
        """The encoder's config: the named one with this config's counts, head modes and modality
        subset, or a copy of the one given."""
        if not isinstance(self.imagebind, ImageBindConfig):
            return ImageBindConfig.named(self.imagebind, num_cls_tokens=self.num_cls_tokens or None,
                                         head_mode=self.head_mode, modalities=self.modalities)
        if self.num_cls_tokens or self.head_mode is not None or self.modalities is not None:
            raise ModelConfigError("with an ImageBindConfig as `imagebind`, give its counts, head modes and "
                                   "modalities in it (num_cls_tokens, head_mode, modalities are for a named config)")
        return copy.deepcopy(self.imagebind)

    @classmethod
    def named(cls, size: str = "7b", **overrides: Any) -> "ImageBindLLMConfig":
        """A config from the table below, with any field overridden."""
        if size not in NAMED_CONFIGS:
            raise ModelConfigError(f"unknown ImageBind-LLM config {size!r}; known: {', '.join(NAMED_CONFIGS)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ModelConfigError(f"unknown ImageBind-LLM config fields: {', '.join(unknown)}")
        return cls(**{**NAMED_CONFIGS[size], **overrides})


NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # the released 7B.pth architecture: LLaMA-7B with biases and LoRA, RMSNorm bridge, adapters in all 32 layers
    "7b": dict(imagebind="huge_w3d"),  # imagebind_w3D.pth: ImageBind's six modalities and point clouds
    # every branch on and random, small enough for unit tests on a CPU (the tiny ImageBind with points: joint width 24)
    # (tiny and bench: the vocabulary of the package's tokenizer, which their registered models decode with)
    "tiny": dict(dim=64, n_layers=4, n_heads=4, vocab_size=SHIPPED_VOCAB, multiple_of=32, max_seq_len=64, lora_rank=4,
                 query_layer=4, imagebind="tiny_w3d", init="random"),
    # 7B's shape ratios at a size a CPU decodes in seconds (benchmarks); adapters in every layer as 7B
    "bench": dict(dim=1024, n_layers=16, n_heads=16, vocab_size=SHIPPED_VOCAB, max_seq_len=512, query_layer=16,
                  imagebind="small_w3d", init="random"),
}


__all__ = ["ImageBindLLMConfig", "NAMED_CONFIGS", "PHASES"]
