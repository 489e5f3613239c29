"""The backends every op test runs on: the fixtures `backend` (eager, cpp, cuda, triton) and `dtype`.

eager and cpp run on CPU tensors, cuda on CUDA tensors, triton on CUDA tensors when there is a GPU
and otherwise on CPU tensors under Triton's interpreter (float32 only). A backend or dtype that
cannot run here is skipped with the reason `surgery.ops.can_run` gives.

Triton's interpreter is chosen when the kernels are defined (surgery/ops/triton_ops.py, imported
on first use), not when triton is imported: TRITON_INTERPRET=1 is set here, when pytest loads
this file at collection, before any test runs (in a whole-suite run too). It changes nothing else.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from op_backends import DTYPE_IDS, DTYPES, Backend

from surgery import ops

TRITON_MODULE = "surgery.ops.triton_ops"

if not torch.cuda.is_available() and TRITON_MODULE not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _device(name: str) -> torch.device:
    if name in ("eager", "cpp"):
        return torch.device("cpu")
    if name == "triton" and (os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda:0")  # with its index, as the kernels' messages name it


@pytest.fixture(params=ops.BACKENDS)
def backend(request) -> Backend:
    name = request.param
    device = _device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ok, why = ops.can_run(name, device)
    if not ok:
        triton_ops = sys.modules.get(TRITON_MODULE)
        if name == "triton" and triton_ops is not None and triton_ops.triton is not None and device.type == "cpu":
            pytest.fail(f"the Triton kernels were defined before this conftest set TRITON_INTERPRET=1 (something "
                        f"imported {TRITON_MODULE} first), so they cannot run on CPU tensors: {why}")
        pytest.skip(why)
    return Backend(name, device)


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request, backend: Backend) -> torch.dtype:
    ok, why = ops.can_run(backend.name, backend.device, request.param)
    if not ok:
        pytest.skip(why)
    return request.param
