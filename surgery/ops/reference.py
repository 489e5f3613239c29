"""The eager reference of every fused op: upstream's semantics in plain torch.

These are what the C++, CUDA and Triton kernels are tested against, the fallback when no kernel
can run, and (being plain differentiable torch) what `torch.compile` sees for the "eager"
backend. Shapes:

    query_concat(queries (Q, C), feats (B, N, C))            -> (B, Q+N, C)
        upstream: visual_query.weight.unsqueeze(0).repeat(B, 1, 1), then cat with the features
    adapter_add(adapter (L, Q, D) or (L*Q, D), vq (B, Q, D))  -> (L, B, Q, D)
        upstream, per adapted layer i: adapter[i].repeat(B, 1, 1) + visual_query
    adapter_attention(xq (B, H, T, hd), k_t (B, H, hd, Q), v (B, H, Q, hd),
                      gate (1, H, 1, 1), new_gate (1, 1, 1, 1) or None)   -> (B, H, T, hd)
        upstream's gated adapter branch at one layer: new_gate * tanh(g) * softmax(xq k / sqrt(hd)) v,
        the softmax in float32 over the Q adapter tokens; `gate` is passed already squashed
        (tanh), in the activations' dtype, as the model caches it per image.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def query_concat(queries: Tensor, feats: Tensor) -> Tensor:
    B = feats.shape[0]
    return torch.cat([queries.unsqueeze(0).expand(B, -1, -1), feats], dim=1)  # (B, Q+N, C)


def adapter_table(adapter: Tensor, visual_query: Tensor) -> Tensor:
    """The adapter as (L, Q, D), whichever of (L, Q, D) or (L*Q, D) it came as."""
    Q, D = visual_query.shape[1], visual_query.shape[2]
    return adapter.reshape(-1, Q, D)  # (L, Q, D)


def adapter_add(adapter: Tensor, visual_query: Tensor) -> Tensor:
    table = adapter_table(adapter, visual_query)  # (L, Q, D)
    return table.unsqueeze(1) + visual_query.unsqueeze(0)  # (L, B, Q, D)


def adapter_attention(xq: Tensor, k_t: Tensor, v: Tensor, gate: Tensor, new_gate: Optional[Tensor]) -> Tensor:
    scores = torch.matmul(xq, k_t) / math.sqrt(xq.shape[-1])  # (B, H, T, Q)
    scores = gate * torch.softmax(scores.float(), dim=-1).type_as(xq)  # (B, H, T, Q)
    if new_gate is not None:
        scores = new_gate * scores
    return torch.matmul(scores, v)  # (B, H, T, hd)
