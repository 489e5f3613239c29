"""The fake (meta) implementations and autograd of the compiled ops torch.ops.surgery.*.

The schemas and CPU/CUDA kernels are C++ (csrc/ops.cpp); each op's fake and backward are its own
module's (query_concat_op.py, ...), shared with its Triton op. They are registered from here
because csrc/ops.cpp names this module (`set_python_module`): torch takes the fakes of a C++ op
only from that module, and names it when only `surgery._C` was imported. `_extension.py` imports
this module once the extension has loaded; without the extension it registers nothing.
"""

from __future__ import annotations

import threading

import torch

from . import _extension, adapter_add_op, adapter_attention_op, query_concat_op

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the fakes and autograd of torch.ops.surgery.* (once; the extension must be loaded).
    The `.out` overloads get a fake and no autograd (csrc/ops.cpp refuses them inputs that need grad)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        for op in (query_concat_op, adapter_add_op):
            torch.library.register_fake(f"surgery::{op.NAME}.out", op.fake_out)
        for op in (query_concat_op, adapter_add_op, adapter_attention_op):
            torch.library.register_fake(f"surgery::{op.NAME}", op.fake)
            torch.library.register_autograd(f"surgery::{op.NAME}", op.backward, setup_context=op.setup_context)
        _registered = True


if _extension.extension() is not None:
    register()
