"""Test helpers shared by the backend test files: run a module for a few optimizer steps and compare runs."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
#: parametrize over this to run a test on the CPU and, where there is one, on the GPU
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]



def randomize_bn(module: nn.Module, momentum: float | None = None) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (so eval mode is a real test); ``momentum`` set
    on every BN when given."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            if momentum is not None:
                m.momentum = momentum
    return module

def make_block(kwargs: dict, options: dict, dtype: torch.dtype = torch.float64, device="cpu") -> nn.Module:
    """An :class:`~effdense.EfficientDenseBlock` with non-trivial BN affine parameters and running statistics
    (so eval mode is a real test); ``options["momentum"]`` sets every BN's momentum."""
    from effdense import EfficientDenseBlock

    torch.manual_seed(0)
    block = EfficientDenseBlock(**kwargs).to(dtype)
    randomize_bn(block, options.get("momentum"))
    return block.to(device)


def make_input(shape: tuple, options: dict, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """A seeded input; ``options``: ``noncontiguous`` (a strided view), ``channels_last``."""
    torch.manual_seed(1)
    if options.get("noncontiguous"):
        n, c, h, w = shape
        x = torch.randn(n, c, h + 3, 2 * w, dtype=dtype, device=device)[:, :, 1:h + 1, ::2]
    else:
        x = torch.randn(shape, dtype=dtype, device=device)
    if options.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are all zero); NaN anywhere gives inf."""
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def assert_same_nonfinite(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """NaN, +Inf and -Inf exactly where ``ref`` has them (any dtypes, same shape)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        a, b = test(got.detach()), test(ref.detach())
        assert torch.equal(a, b), f"{what}: {name} at {int(a.sum())} places, expected {int(b.sum())} " \
                                  f"({int((a != b).sum())} differ)"


def assert_runs_same_nonfinite(got: "Run", ref: "Run") -> None:
    """:func:`assert_same_nonfinite` for every output, input gradient, parameter gradient and state entry."""
    for step, (a, b) in enumerate(zip(got.outputs, ref.outputs)):
        assert_same_nonfinite(a, b, f"step {step}: output")
    for step, (a, b) in enumerate(zip(got.input_grads, ref.input_grads)):
        if b is not None:
            assert_same_nonfinite(a, b, f"step {step}: input grad")
    for step, (ga, gb) in enumerate(zip(got.param_grads, ref.param_grads)):
        assert ga.keys() == gb.keys(), f"step {step}: grads of {sorted(ga.keys() ^ gb.keys())} differ in presence"
        for name in gb:
            assert_same_nonfinite(ga[name], gb[name], f"step {step}: grad of {name}")
    assert got.state.keys() == ref.state.keys()
    for name in ref.state:
        assert_same_nonfinite(got.state[name], ref.state[name], f"state {name}")


@dataclass
class Run:
    outputs: list = field(default_factory=list)
    input_grads: list = field(default_factory=list)
    param_grads: list = field(default_factory=list)   # per step: {name: grad}
    state: dict = field(default_factory=dict)          # final state_dict (parameters and running statistics)


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    if hasattr(module, "set_backend"):
        module.set_backend(backend)
    else:
        module.backend = backend
    return module


def run_steps(module: nn.Module, backend: str, x: torch.Tensor, steps: int = 3, *, train: bool = True,
              input_grad: bool = True, seed: int = 1234, lr: float = 0.05) -> Run:
    """Copy ``module``, switch it to ``backend`` and run ``steps`` SGD steps (momentum 0.9) on a fixed
    weighted-sum loss, re-seeding the RNG before each forward so dropout draws the same masks."""
    m = set_backend(copy.deepcopy(module), backend).train(train)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    run = Run()
    for step in range(steps):
        xs = x.detach().requires_grad_(input_grad)    # a fresh leaf with x's strides
        torch.manual_seed(seed + step)
        y = m(xs)
        weight = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
        opt.zero_grad(set_to_none=True)
        (y * weight).sum().backward()
        run.outputs.append(y.detach().clone())
        run.input_grads.append(xs.grad.clone() if input_grad else None)
        run.param_grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        opt.step()
    run.state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return run


def assert_runs_close(got: Run, ref: Run, rtol: float) -> None:
    """Every output, input gradient, parameter gradient and final state entry agrees to ``rtol`` relative."""
    for step, (a, b) in enumerate(zip(got.outputs, ref.outputs)):
        assert a.shape == b.shape, f"step {step}: output shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert rel_err(a, b) <= rtol, f"step {step}: output rel err {rel_err(a, b):.3g}"
    for step, (a, b) in enumerate(zip(got.input_grads, ref.input_grads)):
        if b is not None:
            assert rel_err(a, b) <= rtol, f"step {step}: input grad rel err {rel_err(a, b):.3g}"
    for step, (ga, gb) in enumerate(zip(got.param_grads, ref.param_grads)):
        assert ga.keys() == gb.keys(), f"step {step}: grads of {sorted(ga.keys() ^ gb.keys())} differ in presence"
        for name in gb:
            assert rel_err(ga[name], gb[name]) <= rtol, \
                f"step {step}: grad of {name} rel err {rel_err(ga[name], gb[name]):.3g}"
    assert got.state.keys() == ref.state.keys()
    for name in ref.state:
        a, b = got.state[name], ref.state[name]
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b), f"{name}: {int(a)} != {int(b)}"
        else:
            assert rel_err(a, b) <= rtol, f"state {name} rel err {rel_err(a, b):.3g}"


@pytest.fixture
def one_thread():
    """One intra-op thread: the numbers below were measured so, and busy CI cores do not stall spinning threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
