"""The two memory counters of effdense.tools.measure, checked against known allocations and against each other."""
from __future__ import annotations

import pytest
import torch

import effdense
from effdense.tools.measure import CPUAllocatorBytes, LiveBytes, training_step


@pytest.mark.parametrize("counter_cls", [LiveBytes, CPUAllocatorBytes])
def test_counters_count_allocations_and_frees(counter_cls):
    with counter_cls() as counter:
        a = torch.empty(1000, dtype=torch.float32)      # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)       # 4000 bytes
        del a
        c = b.view(-1)                                  # a view allocates nothing
        b.add_(1)                                       # in place allocates nothing
        d = torch.empty(250, dtype=torch.float32)       # 1000 bytes
    assert counter.peak == 8000 and counter.live == 5000
    del b, c, d


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_counters_agree_on_a_training_step(backend):
    """Both counters see the same step where no op hides big internal buffers (naive and torch backends)."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=22, growth_rate=8, backend=backend)
    step = training_step(model, torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)),
                         torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    step()
    with LiveBytes() as live:
        step()
    with CPUAllocatorBytes() as alloc:
        step()
    assert live.peak > 0 and alloc.peak == pytest.approx(live.peak, rel=0.05)
