"""The eager reference of every fused op: upstream's semantics in plain torch.

Each is defined beside its op (query_concat_op.py, adapter_add_op.py, adapter_attention_op.py,
with the shapes and the upstream code it stands for) and gathered here under the op's name: what
the benchmarks check every backend against, the fallback when no kernel can run, and (being
plain differentiable torch) what `torch.compile` sees for the "eager" backend.
"""

from __future__ import annotations

from .adapter_add_op import reference as adapter_add
from .adapter_add_op import table as adapter_table
from .adapter_attention_op import reference as adapter_attention
from .query_concat_op import reference as query_concat

__all__ = ["adapter_add", "adapter_attention", "adapter_table", "query_concat"]
