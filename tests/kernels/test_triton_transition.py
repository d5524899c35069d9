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


def test_transition_kernels_every_config():
    """The three transition kernels in every config of their spaces, in order and shuffled, on the same output,
    ``g`` and partials buffers (NaN-filled), against BN-ReLU-AvgPool-Conv1x1 differentiated by autograd: odd H
    and W (the floor crops a row and a column: dgrad writes their ``g`` as zero), a channels-last-strided
    weight."""
    import random

    from effdense import kernels as K
    from effdense.backends.bn import bn_relu, bn_relu_backward, scale_shift
    from effdense.kernels import transition as KT
    torch.manual_seed(9)
    n, h, w, cin, cout = 2, 7, 9, CIN, COUT
    nan = float("nan")
    xb = K.rows_buffer(n, h, w, cin, torch.float32, DEV).normal_()
    x = K.nchw(xb, 0, cin)
    mean, var = torch.randn(cin, device=DEV) * 0.3, torch.rand(cin, device=DEV) + 0.5
    gamma, beta = torch.randn(cin, device=DEV), torch.randn(cin, device=DEV)
    bn = K.BN(mean, var, gamma, beta, 1e-5)
    scale, shift, _, invstd = scale_shift(torch.nn.BatchNorm2d(cin), mean, var, torch.float32, (gamma, beta))
    weight = torch.randn(cout, cin + 2, 1, 1, device=DEV)[:, 1:1 + cin]       # strided: read through its strides
    u = bn_relu(x, scale, shift).requires_grad_(True)
    wr = weight.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(u, 2), wr)
    gyb = K.rows_buffer(n, h // 2, w // 2, cout, torch.float32, DEV).normal_()
    y_ref.backward(K.nchw(gyb, 0, cout))
    dx_ref, dg_ref, db_ref = bn_relu_backward(x, u.grad, scale, shift, mean, invstd, True)

    def orders(space):
        shuffled = list(space)
        random.Random(0).shuffle(shuffled)
        return list(space) + shuffled

    out = K.rows_buffer(n, h // 2, w // 2, cout, torch.float32, DEV).fill_(nan)
    for cfg in orders(KT.FWD_CONFIGS):
        KT.transition_fwd(xb, cin, bn, weight, out, config=cfg)
        _close(K.nchw(out, 0, cout), y_ref, f"output {cfg}")
    g = K.rows_buffer(n, h, w, cin, torch.float32, DEV).fill_(nan)
    part = K.partials(8, cin, DEV).fill_(nan)
    tot = torch.empty(2 * cin, device=DEV)
    for cfg in orders(KT.DGRAD_CONFIGS):
        t = KT.transition_dgrad(gyb, weight, xb, bn, g, part, config=cfg)
        dgamma, dbeta = torch.full_like(gamma, nan), torch.full_like(beta, nan)
        K.bn_bwd_finalize(part, t, cin, tot, dgamma, dbeta)
        _close(dgamma, dg_ref, f"gamma grad {cfg}")
        _close(dbeta, db_ref, f"beta grad {cfg}")
        dx = K.rows_buffer(n, h, w, cin, torch.float32, DEV).fill_(nan)
        K.bn_bwd_apply(g, xb, cin, bn, tot, True, dx)
        _close(K.nchw(dx, 0, cin), dx_ref, f"input grad {cfg}")
    ws = torch.full((9 * cout * cin,), nan, device=DEV)
    for i, cfg in enumerate(orders(KT.WGRAD_CONFIGS)):
        dwp, _ = KT.transition_wgrad(gyb, xb, cin, bn, cout, ws, config=cfg,
                                     splits=None if i < len(KT.WGRAD_CONFIGS) else 9)
        _close(dwp.sum(0).view(cout, cin, 1, 1), wr.grad, f"weight grad {cfg}")


@pytest.mark.parametrize("hw", [(7, 9), (6, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transition_nan_and_inf_propagate_as_in_pytorch(hw, train):
    """NaN, +Inf and -Inf in the input, inside and (odd sizes) in the row and column the pool crops: the output,
    the input gradient, the parameter gradients and the running statistics are NaN, +Inf and -Inf exactly where
    the ``naive`` module's (float64, pool before conv) are. A cropped pixel adds ``0 * xhat`` to ``dgamma``, NaN
    for a NaN input there, as PyTorch's BN backward does; the transition's kernels run in every config."""
    import itertools

    from effdense.kernels import transition as KT
    from utils import assert_same_nonfinite
    h, w = hw
    ref, mod = _modules(20 + h)
    ref.double().train(train)
    mod.train(train)
    x = torch.randn(2, CIN, h, w, device=DEV)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 1] = float("inf")
    x[1, 3, 4, 0] = -float("inf")
    x[0, 4, h - 1, w // 2] = float("nan")       # the cropped row when h is odd
    x[1, 5, 1, w - 1] = float("inf")            # the cropped column when w is odd
    xr = x.double().requires_grad_(True)
    y_ref = ref.conv(ref.pool(ref.relu(ref.norm(xr))))
    gy = torch.randn(y_ref.shape, device=DEV)
    y_ref.backward(gy.double())
    grads_ref = [xr.grad, ref.conv.weight.grad, ref.norm.weight.grad, ref.norm.bias.grad]
    space = list(itertools.zip_longest(KT.FWD_CONFIGS, KT.DGRAD_CONFIGS, KT.WGRAD_CONFIGS))
    heuristics = (KT.fwd_heuristic, KT.dgrad_heuristic, KT.wgrad_heuristic)
    for configs in space:       # every config of each kernel, through the module's autograd function
        picked = {f: (lambda *a, c=c, f=f: c or f(*a)) for f, c in zip(heuristics, configs)}
        m = copy.deepcopy(mod)
        xt = x.clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as mp:
            for f, new in picked.items():
                mp.setattr(KT, f.__name__, new)
            y = TB.transition_forward(xt, m.norm, m.conv)
            y.backward(gy)
        assert_same_nonfinite(y, y_ref, f"output {configs}")
        for what, got, exp in zip(("input grad", "conv weight grad", "gamma grad", "beta grad"),
                                  [xt.grad, m.conv.weight.grad, m.norm.weight.grad, m.norm.bias.grad], grads_ref):
            assert_same_nonfinite(got, exp, f"{what} {configs}")
        for name in ("running_mean", "running_var"):
            assert_same_nonfinite(getattr(m.norm, name), getattr(ref.norm, name), f"{name} {configs}")


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
    """The weight gradient split over several programs (sized from the SM count; a small fixed count in the
    interpreter): the split-P partial sums, and several pixel tiles of partial BN sums in dgrad."""
    from effdense.kernels import rows_buffer
    from effdense.kernels import transition as KT
    ref, mod = _modules(6, 3, 5)      # few channels: the interpreter's time goes by programs
    x = torch.randn(2, 3, 66, 65, device=DEV)
    assert KT.wgrad_plan(rows_buffer(2, 66, 65, 3, torch.float32, DEV), 3, 5)[1] > 1
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
    from effdense import kernels as K
    torch.manual_seed(7)
    x = K.rows_buffer(2, 5, 4, CIN, torch.float32, DEV).normal_()
    mean, var = torch.randn(CIN, device=DEV) * 0.1, torch.rand(CIN, device=DEV) + 0.5
    gamma, beta = torch.rand(CIN, device=DEV) + 0.5, torch.randn(CIN, device=DEV) * 0.3
    bn = (mean, var, gamma, beta, 1e-5)
    w = torch.randn(COUT, CIN, 1, 1, device=DEV)
    gy = K.rows_buffer(2, 2, 2, COUT, torch.float32, DEV).normal_()
    part = K.partials(4, CIN, DEV)
    for op, args in ((torch.ops.effdense.transition_fwd.default, (x, CIN, *bn, w, torch.empty_like(gy))),
                     (torch.ops.effdense.transition_dgrad.default,
                      (gy, w, x, *bn, K.rows_buffer(2, 5, 4, CIN, torch.float32, DEV), part)),
                     (torch.ops.effdense.transition_wgrad.default,
                      (gy, x, CIN, *bn, COUT, torch.empty(2 * COUT * CIN, device=DEV), 2))):
        torch.library.opcheck(op, args)
    ws = torch.empty(2 * COUT * CIN, device=DEV)
    got = K.ops.Dispatch.transition_wgrad(gy, x, CIN, K.BN(*bn), COUT, ws, 2)[0]
    assert torch.equal(got, K.transition_wgrad(gy, x, CIN, K.BN(*bn), COUT, splits=2)[0])


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
