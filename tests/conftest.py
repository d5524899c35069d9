"""Shared test setup. Triton's interpreter must be chosen before ``triton`` is first imported: without a
GPU the tests run every Triton kernel through ``TRITON_INTERPRET=1``."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
