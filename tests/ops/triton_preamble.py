"""What every Triton kernel test module imports first: it skips the module where Triton cannot
run (no ``triton``, or neither CUDA nor ``TRITON_INTERPRET=1``, which tests/conftest.py sets
without a GPU), and names where the kernels run and in which dtypes.

Under the interpreter the kernels run on CPU tensors in fp32 only (the interpreter is reliable
there); with CUDA they are compiled and the half-precision dtypes are tested too.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.float16, torch.bfloat16]
