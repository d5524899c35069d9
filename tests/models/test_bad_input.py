"""Bad input gets a clear error naming what was expected; edge cases behave as nn.BatchNorm2d does."""
from __future__ import annotations

import pytest
import torch

import effdense
from effdense import EfficientDenseBlock

BACKENDS = ["naive", "checkpoint", "torch"]


@pytest.fixture(params=BACKENDS)
def block(request):
    torch.manual_seed(0)
    return EfficientDenseBlock(2, 4, bn_size=2, growth_rate=3, backend=request.param)


# label: (input, exception, message pattern)
BAD_INPUTS = {
    "3-D": (lambda: torch.randn(4, 5, 5), ValueError, r"4-D input \[N, 4, H, W\].*3-D input of shape \(4, 5, 5\)"),
    "5-D": (lambda: torch.randn(1, 4, 2, 5, 5), ValueError, r"4-D input.*5-D"),
    "channels": (lambda: torch.randn(2, 5, 5, 5), ValueError, r"expected 4 input channels.*got 5"),
    "int dtype": (lambda: torch.ones(2, 4, 5, 5, dtype=torch.int64), TypeError, r"floating-point.*torch.int64"),
    "other device": (lambda: torch.empty(2, 4, 5, 5, device="meta"), ValueError, r"expected the input on cpu.*meta"),
    "not a tensor": (lambda: [[1.0]], TypeError, r"expected a torch.Tensor"),
    "dtype mismatch": (lambda: torch.randn(2, 4, 5, 5, dtype=torch.float64), TypeError,
                       r"expected a torch.float32 input \(the block's parameter dtype\), got torch.float64"),
}


@pytest.mark.parametrize("label", list(BAD_INPUTS))
def test_bad_input_is_named(block, label):
    make, exc, pattern = BAD_INPUTS[label]
    with pytest.raises(exc, match=pattern):
        block(make())


def test_model_rejects_wrong_image_channels():
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 1"):
        effdense.densenet_cifar(depth=10, growth_rate=4)(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_model_checks_input_dtype_at_entry(dtype):
    """The stem convolution would raise PyTorch's own message; the model names its dtype first."""
    model = effdense.densenet_cifar(depth=10, growth_rate=4, backend="torch")
    with pytest.raises(TypeError) as err:
        model(torch.randn(2, 3, 8, 8, dtype=dtype))
    assert str(err.value) == (f"expected a torch.float32 input (the model's parameter dtype), got {dtype}; cast one of "
                              f"them (model.to({dtype}) or x.to(torch.float32)), or run under torch.autocast")


def test_model_under_autocast_takes_float32_input():
    model = effdense.densenet_cifar(depth=10, growth_rate=4, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_batch_of_one_pixel_fails_like_batchnorm(block):
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError) as ours:
        block(x)
    with pytest.raises(ValueError) as bn:
        torch.nn.BatchNorm2d(4)(x)
    assert str(ours.value) == str(bn.value)
    block.eval()
    assert block(x).shape == (1, 10, 1, 1)          # eval mode uses running statistics: fine


def test_batch_one_with_pixels_trains(block):
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    block(x).sum().backward()
    assert x.grad.shape == x.shape


def test_empty_batch(block):
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    y = block(x)
    assert y.shape == (0, 10, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(int(m.num_batches_tracked) == 1 for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(torch.all(m.running_mean == 0) for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_nan_in_nan_out():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x[1, 2, 3, 3] = float("nan")
    outs = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        b = EfficientDenseBlock(2, 4, bn_size=2, growth_rate=3, backend=backend).double()
        outs[backend] = b(x)
    assert torch.isnan(outs["naive"]).any()
    for backend in BACKENDS:
        assert torch.equal(torch.isnan(outs[backend]), torch.isnan(outs["naive"])), backend


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_layers=0, num_input_features=4), "num_layers must be a positive integer"),
    (dict(num_layers=2, num_input_features=4, drop_rate=1.0), r"drop_rate must be in \[0, 1\)"),
    (dict(num_layers=2, num_input_features=4, backend="cuda"), "unknown backend 'cuda'; expected one of"),
])
def test_bad_constructor_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        EfficientDenseBlock(**kwargs)
