"""query_concat: the learned queries broadcast over the batch, in front of the features.

    query_concat(queries (Q, C), feats (B, N, C)) -> (B, Q+N, C)
    upstream: visual_query.weight.unsqueeze(0).repeat(B, 1, 1), then cat with the features

The op once for every backend: its eager reference, the fake (meta) implementation and autograd
that its compiled op (torch.ops.surgery.query_concat, csrc/) and its Triton op
(torch.ops.surgery.query_concat_triton, triton_ops.py) are registered with, and the public
function (inputs checked once, then the chosen backend). The out= forms have a fake, no autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch

NAME = "query_concat"
_KERNEL = checks.kernel(NAME)  # fakes refuse bad input as the C++ kernels do: "surgery::query_concat: ..."


def reference(queries: Tensor, feats: Tensor) -> Tensor:
    B = feats.shape[0]
    return torch.cat([queries.unsqueeze(0).expand(B, -1, -1), feats], dim=1)  # (B, Q+N, C)


def fake(queries: Tensor, feats: Tensor) -> Tensor:
    return feats.new_empty(checks.query_concat_shape(_KERNEL, queries, feats))


def fake_out(queries: Tensor, feats: Tensor, out: Tensor) -> Tensor:
    checks.out_tensor(_KERNEL, out, checks.query_concat_shape(_KERNEL, queries, feats), feats)
    return out


def setup_context(ctx, inputs, output) -> None:
    ctx.num_queries = inputs[0].shape[0]


def backward(ctx, grad: Tensor):
    Q = ctx.num_queries  # grad: (B, Q+N, C)
    d_queries = grad[:, :Q].sum(0) if ctx.needs_input_grad[0] else None  # (Q, C)
    d_feats = grad[:, Q:] if ctx.needs_input_grad[1] else None  # (B, N, C)
    return d_queries, d_feats


def query_concat(queries: Tensor, feats: Tensor, *, out: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tensor:
    """Broadcast the learned queries over the batch and put them in front of the features."""
    checks.query_concat(queries, feats, out)
    return dispatch.run_with_out(NAME, reference, queries, feats, out, backend)
