"""PEFT prompt tuning and prefix tuning: the adapter's virtual tokens (`num_virtual_tokens`).

    prompt tuning:  prompt_encoder[a].embedding  (S * N, D)       S virtual-token blocks (2 for seq2seq:
                                                                  encoder's, then decoder's), prepended
    prefix tuning:  prompt_encoder[a].embedding  (N, L * 2 * D)   the keys and values of N prefix positions
                    (or (N, D) and an MLP, with prefix_projection)  in every layer

`num_virtual_tokens` is those rows, the embedding's `num_embeddings`, the adapter's
`peft_config[a].num_virtual_tokens` (what the forward and `save_pretrained` read) and the index
tensor `prompt_tokens[a]` = arange(S * N) the model looks the rows up with (rebuilt by
`apply_count`, since it is derived rather than counted). A model with several prompt adapters has
one site per adapter, `num_virtual_tokens.<adapter>`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from surgery.site import Counter, TokenSite, TokenTensor

from .common import build, seeded

BACKBONE = "hf_peft_prompt"
SITE = "num_virtual_tokens"
KINDS = ("PROMPT_TUNING", "PREFIX_TUNING")
MIN_NOTE = "an adapter with no virtual tokens is the base model; disable or delete the adapter instead"
MAX_NOTE = "the virtual tokens and the input share the base model's {n} positions"


def is_prompt_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel) and bool(adapters(model))


def adapters(model: nn.Module) -> dict[str, Any]:
    """The prompt- and prefix-tuning adapters of a PeftModel: {adapter name: its config}."""
    configs = getattr(model, "peft_config", {})
    return {name: c for name, c in configs.items() if getattr(c.peft_type, "value", None) in KINDS}


def site_names(model: nn.Module) -> dict[str, str]:
    """{site name: adapter}: `num_virtual_tokens` for a single adapter, else one per adapter."""
    names = list(adapters(model))
    return {SITE: names[0]} if len(names) == 1 else {f"{SITE}.{a}": a for a in names}


def _blocks(config: Any) -> int:
    """How many blocks of N rows the embedding holds: S for prompt tuning, 1 for prefix tuning."""
    return config.num_transformer_submodules if config.peft_type.value == "PROMPT_TUNING" else 1


def _max(model: nn.Module) -> tuple[int | None, str]:
    positions = getattr(model.get_base_model().config, "max_position_embeddings", None)
    return (positions - 1, MAX_NOTE.format(n=positions)) if isinstance(positions, int) else (None, "")


def sites(model: nn.Module) -> list[TokenSite]:
    found = []
    high, note = _max(model)
    for name, adapter in site_names(model).items():
        config = model.peft_config[adapter]
        embedding = model.prompt_encoder[adapter].embedding
        blocks = _blocks(config)
        count = embedding.num_embeddings // blocks
        rows = TokenTensor(embedding, "weight", axis=1, view=(blocks, count, embedding.embedding_dim))
        found.append(TokenSite(
            name=name,
            count=count,
            tensors=[rows],
            counters=[Counter(config, "num_virtual_tokens"),
                      Counter(embedding, "num_embeddings", lambda n, b=blocks: n * b)],
            min=1, max=high, default_init="normal", note="; ".join(filter(None, [MIN_NOTE, note])),
            description=f"adapter {adapter!r}'s {config.peft_type.value.lower().replace('_', ' ')} virtual tokens; "
                        f"peft_config[{adapter!r}].num_virtual_tokens",
            count_in_state_dict=_reader(embedding, blocks),
        ))
    return found


def _reader(embedding: nn.Embedding, blocks: int):
    """A checkpoint's count: its embedding rows over the blocks (the view hides them from the default reading)."""
    def count(state_dict: Mapping[str, torch.Tensor], paths: Mapping[int, str]) -> int | None:
        stored = state_dict.get(f"{paths.get(id(embedding), '')}.weight")
        if not isinstance(stored, torch.Tensor) or stored.dim() != 2 or stored.shape[0] % blocks:
            return None
        return stored.shape[0] // blocks
    return count


def apply_count(model: nn.Module, change: Any) -> bool:
    """The rows and counters as declared, then the derived index `prompt_tokens[adapter]` =
    arange(S * N), S = num_transformer_submodules (as peft builds it for prefix tuning too, which
    looks up its first N only)."""
    adapter = site_names(model)[change.site.name]
    change.apply_default()
    submodules = model.peft_config[adapter].num_transformer_submodules
    change.edit.set_attr(model.prompt_tokens, adapter, torch.arange(change.new * submodules).long())
    return True


# -- tiny models ------------------------------------------------------------------------------------

VOCAB = 50
OPT = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
           max_position_embeddings=64, word_embed_proj_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
T5 = dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
          decoder_start_token_id=0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_base(language: str = "opt") -> nn.Module:
    import transformers as hf

    if language == "opt":
        return build(hf.OPTForCausalLM, hf.OPTConfig(**OPT))
    return build(hf.T5ForConditionalGeneration, hf.T5Config(**T5))


def tiny(num_virtual_tokens: int = 4, kind: str = "prompt", language: str = "opt", **config: Any) -> nn.Module:
    """A tiny OPT (or T5) with a prompt- or prefix-tuning adapter (random weights)."""
    import peft

    task = "CAUSAL_LM" if language == "opt" else "SEQ_2_SEQ_LM"
    config_cls = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    adapter = config_cls(task_type=task, num_virtual_tokens=num_virtual_tokens, **config)
    return peft.get_peft_model(tiny_base(language), adapter).eval()


def inputs(model: nn.Module) -> tuple:
    ids = seeded(2, 6, high=VOCAB - 3) + 3
    return ids, torch.ones_like(ids)


def forward(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


MODELS = {
    "hf_peft_prompt_tiny": (lambda num_virtual_tokens=4: tiny(num_virtual_tokens, "prompt"), inputs, forward,
                            "tiny OPT with a PEFT prompt-tuning adapter, 4 virtual tokens"),
    "hf_peft_prefix_tiny": (lambda num_virtual_tokens=4: tiny(num_virtual_tokens, "prefix"), inputs, forward,
                            "tiny OPT with a PEFT prefix-tuning adapter, 4 virtual tokens"),
}
