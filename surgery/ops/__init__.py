"""Fused ops of the adapter path, with a choice of backend: eager, cpp, cuda, triton.

    from surgery import ops
    ops.query_concat(queries, feats)                 # (Q, C), (B, N, C) -> (B, Q+N, C)
    ops.adapter_add(adapter, visual_query)           # (L, Q, D), (B, Q, D) -> (L, B, Q, D)
    ops.adapter_attention(xq, k_t, v, gate, new_gate)  # gated adapter branch at one layer
    ops.backends()                                   # what is built, what can run here, and why not

One module per op (`<op>_op.py`: reference, fake, autograd, the public function); shared
plumbing once each: input checks (`checks.py`, so every backend refuses bad input the same way),
the backend choice (`dispatch.py`: `backend=`, else SURGERY_KERNEL, else auto), the compiled
extension (`_extension.py`, `registration.py`) and the Triton kernels (`triton_ops.py`).
Semantics and shapes: docs/kernels.md.
"""

from __future__ import annotations

from . import reference
from .adapter_add_op import adapter_add
from .adapter_attention_op import adapter_attention
from .dispatch import BACKENDS, ENV, BackendStatus, backends, build_info, can_run, selected_backend
from .query_concat_op import query_concat

__all__ = ["BACKENDS", "ENV", "BackendStatus", "adapter_add", "adapter_attention", "backends", "build_info",
           "can_run", "query_concat", "reference", "selected_backend"]
