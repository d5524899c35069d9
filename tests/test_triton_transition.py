"""The transition (BN-ReLU-Conv1x1-AvgPool2x2) on the Triton kernels against ``effdense.models.Transition``.

Without a GPU the kernels run in Triton's interpreter (conftest.py sets ``TRITON_INTERPRET=1``), in fp32: odd
sizes (the floor-mode pool crops a row/column), NCHW and channels-last, train (batch statistics, running
statistics updated once) and eval, channel counts that are not multiples of the block sizes.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from effdense.backends import triton_backend as TB  # noqa: E402
from effdense.models import Transition  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(TB.unavailable(DEV, torch.float32) is not None,
                                reason=str(TB.unavailable(DEV, torch.float32)))

CIN, COUT = 19, 21    # not multiples of the block sizes (16 in the interpreter's default configs)


def _modules(seed: int, cin: int = CIN, cout: int = COUT) -> tuple[Transition, Transition]:
    torch.manual_seed(seed)
    ref = Transition(cin, cout).to(DEV)
    with torch.no_grad():
        ref.norm.weight.uniform_(0.5, 1.5)
        ref.norm.bias.uniform_(-0.5, 0.5)
        ref.norm.running_mean.uniform_(-0.3, 0.3)
        ref.norm.running_var.uniform_(0.5, 2.0)
    return ref, copy.deepcopy(ref)


def _reference(ref: Transition, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's BN-ReLU-Conv1x1-AvgPool2x2 through the module's own submodules (whatever backend it is wired
    to), in torchvision's order: conv before pool."""
    return ref.pool(ref.conv(ref.relu(ref.norm(x))))


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("hw", [(7, 7), (5, 3), (2, 2), (3, 3), (6, 4), (13, 11)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transition_matches_module(hw, layout, train):
    ref, mod = _modules(sum(hw) + 10 * train)
    ref.train(train)
    mod.train(train)
    x = torch.randn(2, CIN, *hw, device=DEV)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_(True)
    xt = x.clone().requires_grad_(True)
    y_ref = _reference(ref, xr)
    y = TB.transition_forward(xt, mod.norm, mod.conv)
    assert type(y.grad_fn).__name__.startswith("_TritonTransitionFunction")   # the kernels, not a fallback
    assert y.shape == y_ref.shape == (2, COUT, hw[0] // 2, hw[1] // 2)
    _close(y, y_ref, "output")
    gy = torch.randn_like(y_ref)
    y_ref.backward(gy)
    y.backward(gy)
    _close(xt.grad, xr.grad, "input grad")
    _close(mod.conv.weight.grad, ref.conv.weight.grad, "conv weight grad")
    _close(mod.norm.weight.grad, ref.norm.weight.grad, "gamma grad")
    _close(mod.norm.bias.grad, ref.norm.bias.grad, "beta grad")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _close(getattr(mod.norm, name), getattr(ref.norm, name), name)


def test_transition_strided_input_and_partial_grads():
    """A channel slice of a wider buffer (strided, no copy) as input; no grad on the input nor on gamma."""
    ref, mod = _modules(3)
    buf = torch.randn(2, CIN + 5, 5, 7, device=DEV)
    x = buf[:, 2:2 + CIN]
    mod.norm.weight.requires_grad_(False)
    ref.norm.weight.requires_grad_(False)
    y_ref = _reference(ref, x)
    y = TB.transition_forward(x, mod.norm, mod.conv)
    _close(y, y_ref, "output")
    y_ref.square().sum().backward()
    y.square().sum().backward()
    _close(mod.conv.weight.grad, ref.conv.weight.grad, "conv weight grad")
    _close(mod.norm.bias.grad, ref.norm.bias.grad, "beta grad")
    assert mod.norm.weight.grad is None


def test_transition_too_small_falls_back_like_pytorch():
    """H or W below 2: no pooled pixel; the PyTorch path decides (same result or same error)."""
    ref, mod = _modules(4)
    x = torch.randn(2, CIN, 1, 4, device=DEV)
    with pytest.raises(RuntimeError, match="too small"):
        _reference(ref, x)
    with pytest.raises(RuntimeError, match="too small"):
        TB.transition_forward(x, mod.norm, mod.conv)


@pytest.mark.skipif(DEV.type != "cpu", reason="the CPU interpreter's bf16 fallback")
def test_transition_cpu_bf16_autocast_falls_back():
    """bf16 autocast on CPU (no bf16 in the interpreter): the same math in PyTorch ops, in bf16."""
    ref, mod = _modules(5)
    x = torch.randn(2, CIN, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = _reference(ref, x)
        y = TB.transition_forward(x, mod.norm, mod.conv)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_transition_split_weight_gradient():
    """More pooled pixels than one wgrad program reduces (``P_PER_PROGRAM``): the split-P partial sums, and
    several pixel tiles of partial BN sums in dgrad."""
    from effdense.kernels import transition as KT
    ref, mod = _modules(6, 3, 5)      # few channels: the interpreter's time goes by programs
    x = torch.randn(2, 3, 66, 65, device=DEV)
    assert 2 * 33 * 32 > KT.P_PER_PROGRAM
    y_ref = _reference(ref, x)
    y = TB.transition_forward(x, mod.norm, mod.conv)
    _close(y, y_ref, "output")
    gy = torch.randn_like(y_ref)
    y_ref.backward(gy)
    y.backward(gy)
    _close(mod.conv.weight.grad, ref.conv.weight.grad, "conv weight grad")
    _close(mod.norm.weight.grad, ref.norm.weight.grad, "gamma grad")
    _close(mod.norm.bias.grad, ref.norm.bias.grad, "beta grad")


def test_transition_custom_ops_opcheck():
    """Schema, fake implementations and dispatch of the ``effdense::transition_*`` ops."""
    from effdense.kernels import transition as KT
    torch.manual_seed(7)
    x = torch.randn(2, CIN, 5, 4, device=DEV).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(CIN, device=DEV) + 0.5, torch.randn(CIN, device=DEV) * 0.3
    mean, invstd = torch.randn(CIN, device=DEV) * 0.1, torch.rand(CIN, device=DEV) + 0.5
    w = torch.randn(COUT, CIN, 1, 1, device=DEV)
    gy = torch.randn(2, COUT, 2, 2, device=DEV)
    for op, args in ((torch.ops.effdense.transition_fwd.default, (x, scale, shift, w, torch.empty_like(gy))),
                     (torch.ops.effdense.transition_dgrad.default,
                      (gy, w, x, scale, shift, mean, invstd, "float32")),
                     (torch.ops.effdense.transition_wgrad.default, (gy, x, scale, shift, "float32"))):
        torch.library.opcheck(op, args)
    assert torch.equal(KT.transition_wgrad_dispatch(gy, x, scale, shift, torch.float32),
                       KT.transition_wgrad(gy, x, scale, shift, torch.float32))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transition_compiles_fullgraph(train):
    """Under ``torch.compile`` the kernels are the ``effdense::transition_*`` custom ops: one graph."""
    ref, mod = _modules(8)
    ref.train(train)
    mod.train(train)
    compiled = torch.compile(lambda t: TB.transition_forward(t, mod.norm, mod.conv), backend="aot_eager",
                             fullgraph=True)
    x = torch.randn(2, CIN, 5, 7, device=DEV)
    xr, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref = _reference(ref, xr)
    y = compiled(xt)
    _close(y, y_ref, "output")
    y_ref.square().sum().backward()
    y.square().sum().backward()
    _close(xt.grad, xr.grad, "input grad")
    _close(mod.conv.weight.grad, ref.conv.weight.grad, "conv weight grad")
    _close(mod.norm.weight.grad, ref.norm.weight.grad, "gamma grad")
    _close(mod.norm.running_var, ref.norm.running_var, "running_var")


def test_model_transitions_run_on_the_triton_backend(monkeypatch):
    """EfficientDenseNet routes its transitions to the backend's fused transition, and matches naive."""
    import dataclasses

    import effdense
    from effdense import backends
    calls = []
    fused = backends.BACKENDS["triton"].transition
    assert fused is TB.transition_forward

    def counting(x, norm, conv):
        calls.append(tuple(x.shape))
        return fused(x, norm, conv)

    monkeypatch.setitem(backends.BACKENDS, "triton", dataclasses.replace(backends.BACKENDS["triton"],
                                                                         transition=counting))
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10, growth_rate=4, num_classes=3)
    x = torch.randn(2, 3, 12, 12)
    ref = model.set_backend("naive")(x)
    out = model.set_backend("triton")(x)
    assert calls == [(2, 12, 12, 12), (2, 10, 6, 6)]
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
