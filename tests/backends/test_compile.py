"""``torch.compile`` with inductor (the default backend, what ``effdense-train --compile`` uses) on a whole CIFAR
DenseNet: one training step matches eager (output, input gradient, every parameter gradient, running statistics).

This caught an inductor miscompile (torch 2.13, CPU): with its layout optimization on (any graph holding a
convolution), ``var_mean`` over a channel slice of a buffer that a convolution output was copied into returns
wrong numbers, so the blocks take their statistics from the tensor written instead (``torch_backend.init_features``).
The kernel backends' ops are opaque to inductor; the ``aot_eager`` tracing tests live with each backend.
"""
from __future__ import annotations

import copy

import pytest
import torch

from effdense import backends
from effdense.models import densenet_cifar
from utils import rel_err

BACKENDS = ["torch", "cpp"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_training_step_matches_eager(backend):
    why = backends.unavailable_reason(backend, "cpu", torch.float32)
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    torch.manual_seed(0)
    model = densenet_cifar(depth=16, growth_rate=4, backend=backend).train()   # 2 layers per block
    x = torch.randn(16, 3, 32, 32)   # big enough for inductor to turn its layout optimization on
    runs = []
    for compiled in (False, True):
        m = copy.deepcopy(model)
        fn = torch.compile(m) if compiled else m
        xs = x.clone().requires_grad_(True)
        y = fn(xs)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        runs.append((m, y.detach(), xs.grad))
    (eager, y_e, gx_e), (comp, y_c, gx_c) = runs
    assert rel_err(y_c, y_e) < 1e-4
    assert rel_err(gx_c, gx_e) < 1e-4
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), comp.named_parameters()):
        assert rel_err(p_c.grad, p_e.grad) < 1e-3, f"gradient of {name}"
    for (name, b_e), (_, b_c) in zip(eager.named_buffers(), comp.named_buffers()):
        assert rel_err(b_c, b_e) < 1e-5, f"buffer {name}"
