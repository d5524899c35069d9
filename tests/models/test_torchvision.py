"""Against the real torchvision (and timm) DenseNets, where they install: the GPU machine's stack venv in CI
(torchvision has no build beside CI's CPU torch 2.13.0, so these skip in the main environment).

| label          | what                                                                                       |
|----------------|--------------------------------------------------------------------------------------------|
| keys           | densenet121/161/169/201: the same state_dict keys in the same order, the same shapes        |
| strict loads   | torchvision's state_dict loads strictly into effdense's and back                             |
| training step  | float64, train mode: output, input grad, every parameter grad, running statistics, for       |
|                | every backend that runs in float64 on CPU; densenet121 whole at 64x64, a reduced config of   |
|                | torchvision's own ``DenseNet`` class for the others and for the triton interpreter (fp32)    |
| timm           | timm's densenet121: keys (its names, torchvision's layout) and a float64 training step       |
"""
from __future__ import annotations

import pytest
import torch

import effdense
from effdense import backends

torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (the device-stack venv has it)")

ARCHS = ["densenet121", "densenet161", "densenet169", "densenet201"]
#: (growth_rate, block_config, num_init_features, bn_size): small enough for every backend, odd channel counts
REDUCED = (6, (2, 3, 2), 10, 3)


def _cpu_backends(dtype: torch.dtype) -> list[str]:
    return [b for b in backends.BACKENDS if backends.unavailable_reason(b, "cpu", dtype) is None]


def _shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_shapes_and_strict_loads_both_ways(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None)
    ours = getattr(effdense, arch)()
    assert _shapes(ours) == _shapes(tv)
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), tv.state_dict().values()))


def _training_step(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient, every parameter gradient and the running statistics after one training step."""
    model.train().zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum().backward()
    got = {"output": out.detach(), "input grad": x.grad}
    got |= {f"grad {n}": p.grad for n, p in model.named_parameters()}
    got |= {f"buffer {n}": b.clone() for n, b in model.named_buffers() if "running" in n}
    return got


def _assert_same(ours: dict, ref: dict, tol: float, label: str) -> None:
    assert list(ours) == list(ref), label
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=tol, atol=tol, msg=lambda m: f"{label}, {key}: {m}")


def _equivalent_step(make_tv, make_ours, x: torch.Tensor, names: list[str], tol: float) -> None:
    """One training step of the reference model and of ours with its weights, for each backend in ``names``."""
    torch.manual_seed(0)
    tv = make_tv().to(x.dtype)
    state = {k: v.clone() for k, v in tv.state_dict().items()}  # before the step moves the running statistics
    ref = _training_step(tv, x)
    assert names, "no backend runs here"
    for name in names:
        ours = make_ours(name).to(x.dtype)
        ours.load_state_dict(state, strict=True)
        _assert_same(_training_step(ours, x), ref, tol, f"backend {name}")


@pytest.mark.parametrize("name", _cpu_backends(torch.float64))
def test_densenet121_training_step_float64(name):
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _equivalent_step(lambda: torchvision.models.densenet121(weights=None),
                     lambda b: effdense.densenet121(backend=b), x, [name], 1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reduced_densenet_training_step_every_backend(dtype):
    k, blocks, init, bn_size = REDUCED
    x = torch.randn(3, 3, 29, 31, dtype=dtype, generator=torch.Generator().manual_seed(2))
    _equivalent_step(
        lambda: torchvision.models.DenseNet(growth_rate=k, block_config=blocks, num_init_features=init,
                                            bn_size=bn_size, num_classes=7),
        lambda b: effdense.EfficientDenseNet(growth_rate=k, block_config=blocks, num_init_features=init,
                                             bn_size=bn_size, num_classes=7, backend=b),
        x, _cpu_backends(dtype), 1e-8 if dtype == torch.float64 else 2e-4)


def test_timm_densenet121_keys_and_training_step():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    tm = timm.create_model("densenet121", pretrained=False)
    ours = effdense.densenet121()
    assert _shapes(tm) == _shapes(ours)  # timm keeps torchvision's names and layout
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _equivalent_step(lambda: timm.create_model("densenet121", pretrained=False),
                     lambda b: effdense.densenet121(backend=b), x, _cpu_backends(torch.float64), 1e-8)
