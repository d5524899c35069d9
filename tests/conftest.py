"""Shared test setup. The test folders mirror the code (``models/``, ``backends/``, ``kernels/``, ``csrc/``, ``train/``,
``tools/``, ``benchmarks/``) and share ``tests/utils.py``, which this puts on ``sys.path``. Triton's interpreter must
be chosen before ``triton`` is first imported: without a GPU the tests run every Triton kernel through
``TRITON_INTERPRET=1``."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # `from utils import ...` in every folder
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 off (cuDNN and cuBLAS) in every test: the tests compare fp32 kernels against ``F.conv2d``/``naive``
    with fp32 tolerances, and on CUDA cuDNN would otherwise compute that reference in TF32 (its default), as
    would the Triton kernels' fp32 dots (they follow ``torch.backends.cudnn.allow_tf32``). No effect on CPU.
    A test about TF32 itself sets the flags it needs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
