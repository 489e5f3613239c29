"""The small tensor ops of the adapter path, in one place so a fused kernel can replace them.

Eager reference implementations. Each one is a pure function of its inputs (no module state),
takes the counts from the shapes of its arguments (never from the model), and returns a fresh
tensor, so swapping in a kernel with the same signature changes nothing else.
"""

from __future__ import annotations

from torch import Tensor
import torch


def adapter_add(adapter: Tensor, visual_query: Tensor) -> Tensor:
    """Every adapted layer's tokens for every image: adapter (L, Q, D) + visual_query (B, Q, D)
    -> (L, B, Q, D). Element for element what upstream computes one layer at a time as
    `adapter[i].repeat(B, 1, 1) + visual_query`."""
    if adapter.shape[1:] != visual_query.shape[1:]:
        raise ValueError(f"adapter (L, Q, D) = {tuple(adapter.shape)} does not match visual_query "
                         f"(B, Q, D) = {tuple(visual_query.shape)}: query_len out of step?")
    return adapter.unsqueeze(1) + visual_query.unsqueeze(0)  # (L, B, Q, D)


def query_concat(queries: Tensor, feats: Tensor) -> Tensor:
    """The learned queries in front of each image's features: queries (Q, C), feats (B, N, C)
    -> (B, Q + N, C). Upstream: `cat([queries.unsqueeze(0).repeat(B, 1, 1), feats], 1)`."""
    B = feats.shape[0]
    queries = queries.to(feats.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, Q, C)
    return torch.cat([queries, feats], dim=1)  # (B, Q + N, C)
