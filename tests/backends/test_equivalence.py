"""Every backend against ``"naive"`` in float64: outputs, input gradients, every parameter gradient and the
running statistics, over several optimizer steps, on a table of labelled configurations."""
from __future__ import annotations

import pytest
import torch

import effdense
from effdense import backends
from utils import DEVICES, assert_runs_close, make_block, make_input, rel_err, run_steps

RTOL = {torch.float64: 1e-10}

#: backends that must match naive exactly (same dropout masks under the same seed)
EXACT_BACKENDS = ["checkpoint", "torch"]


# label: (block kwargs, input shape, options)
CONFIGS = {
    "bc-7x7": (dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3), (2, 5, 7, 7), {}),
    "bc-5x3-channels_last": (dict(num_layers=3, num_input_features=6, bn_size=2, growth_rate=4), (2, 6, 5, 3),
                             {"channels_last": True}),
    "bc-1x1-batch3": (dict(num_layers=2, num_input_features=4, bn_size=3, growth_rate=2), (3, 4, 1, 1), {}),
    "bc-batch2-odd-channels": (dict(num_layers=4, num_input_features=7, bn_size=1, growth_rate=5), (2, 7, 6, 5), {}),
    "bc-noncontiguous": (dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3), (2, 5, 5, 4),
                         {"noncontiguous": True}),
    "bc-input-no-grad": (dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), (2, 4, 5, 5),
                         {"input_grad": False}),
    "bc-dropout": (dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3, drop_rate=0.3),
                   (2, 5, 7, 7), {}),
    "bc-dropout-channels_last": (dict(num_layers=2, num_input_features=5, bn_size=2, growth_rate=3, drop_rate=0.5),
                                 (2, 5, 5, 3), {"channels_last": True}),
    "bc-momentum-none": (dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3), (2, 5, 4, 4),
                         {"momentum": None}),
    "bc-eval": (dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3), (2, 5, 7, 7), {"train": False}),
    "bc-eval-dropout": (dict(num_layers=2, num_input_features=5, bn_size=2, growth_rate=3, drop_rate=0.3),
                        (2, 5, 7, 7), {"train": False}),
    "plain-7x7": (dict(num_layers=3, num_input_features=5, growth_rate=3, bottleneck=False), (2, 5, 7, 7), {}),
    "plain-5x3-dropout": (dict(num_layers=3, num_input_features=4, growth_rate=4, bottleneck=False, drop_rate=0.2),
                          (2, 4, 5, 3), {}),
    "plain-eval-channels_last": (dict(num_layers=2, num_input_features=4, growth_rate=3, bottleneck=False),
                                 (2, 4, 3, 5), {"train": False, "channels_last": True}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("label", list(CONFIGS))
def test_block_matches_naive_float64(label, backend, device):
    kwargs, shape, options = CONFIGS[label]
    block, x = make_block(kwargs, options).to(device), make_input(shape, options).to(device)
    if options.get("noncontiguous"):
        assert not x.is_contiguous()
    train, input_grad = options.get("train", True), options.get("input_grad", True)
    ref = run_steps(block, "naive", x, train=train, input_grad=input_grad)
    got = run_steps(block, backend, x, train=train, input_grad=input_grad)
    assert_runs_close(got, ref, RTOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_model_matches_naive_float64(backend, bottleneck, device):
    """A whole CIFAR DenseNet (stem, three blocks, transitions, classifier) with dropout."""
    torch.manual_seed(0)
    depth = 10 if bottleneck else 7
    model = effdense.densenet_cifar(depth=depth, growth_rate=4, bottleneck=bottleneck, drop_rate=0.2,
                                    num_classes=5).double().to(device)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, device=device)
    assert_runs_close(run_steps(model, backend, x), run_steps(model, "naive", x), RTOL[torch.float64])


def test_dropout_backward_uses_the_forward_mask():
    """Loss weight only on the dropped positions of the new channels: no gradient may reach conv2; loss weight
    on the kept positions: some must. Both through the torch backend's regenerated mask."""
    block = make_block(dict(num_layers=1, num_input_features=3, bn_size=2, growth_rate=4, drop_rate=0.5), {})
    block.backend = "torch"
    x = make_input((2, 3, 6, 6), {})
    torch.manual_seed(7)
    dropped = block(x)[:, 3:].detach() == 0
    assert 0.2 < dropped.double().mean().item() < 0.8
    for weight_on_dropped in (True, False):
        torch.manual_seed(7)
        new = block(x)[:, 3:]
        assert torch.equal(new.detach() == 0, dropped), "the same seed must draw the same mask"
        r = torch.randn_like(new) * (dropped if weight_on_dropped else ~dropped)
        grad_w = torch.autograd.grad((new * r).sum(), block.denselayer1.conv2.weight)[0]
        assert (grad_w.abs().sum() == 0) == weight_on_dropped


def test_gradcheck_small_block():
    for train in (True, False):
        block = make_block(dict(num_layers=2, num_input_features=3, bn_size=2, growth_rate=2), {}).train(train)
        block.backend = "torch"
        names = [n for n, _ in block.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
        x = make_input((2, 3, 3, 4), {}).requires_grad_()

        def f(x, *ps):
            return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["naive", *EXACT_BACKENDS])
def test_no_grad_train_mode_updates_stats_and_keeps_nothing(backend):
    block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
    ref = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
    x = make_input((2, 4, 5, 5), {})
    block.backend, ref.backend = backend, "naive"
    with torch.no_grad():
        y = block(x)
    y_ref = ref(x)
    assert y.grad_fn is None and not y.requires_grad
    assert rel_err(y, y_ref) < 1e-12
    for (name, a), b in zip(block.state_dict().items(), ref.state_dict().values()):
        assert rel_err(a.double(), b.double()) < 1e-12, name


def test_running_stats_updated_once_per_forward():
    block = make_block(dict(num_layers=3, num_input_features=4, bn_size=2, growth_rate=3), {})
    for backend in ["naive", *EXACT_BACKENDS]:
        b = run_steps(block, backend, make_input((2, 4, 5, 5), {}), steps=2)
        counts = {k: int(v) for k, v in b.state.items() if k.endswith("num_batches_tracked")}
        assert set(counts.values()) == {2}, (backend, counts)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_autocast_bf16_cpu_close_to_fp32(backend):
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=16, growth_rate=6, num_classes=10)
    x = torch.randn(4, 3, 16, 16)
    model.set_backend("naive")
    ref = model(x)
    model.set_backend(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y.float().sum().backward()
    assert torch.isfinite(y).all()
    assert rel_err(y.float(), ref) < 5e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _grads(block, x):
    x = x.detach().requires_grad_()
    (block(x) * torch.linspace(-1, 1, block.num_output_features).view(1, -1, 1, 1)).square().sum().backward()
    return x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_parametrized_weights_get_gradients(backend):
    """weight_norm on every conv2: the backend must differentiate the tensors it is given, not the modules'."""
    grads = {}
    for b in ("naive", backend):
        block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
        for layer in block.values():
            torch.nn.utils.parametrizations.weight_norm(layer.conv2)
        block.backend = b
        grads[b] = _grads(block, make_input((2, 4, 5, 5), {}))
    assert rel_err(grads[backend][0], grads["naive"][0]) < 1e-10
    for name, g in grads["naive"][1].items():
        assert grads[backend][1][name] is not None, name
        assert rel_err(grads[backend][1][name], g) < 1e-10, name


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_functional_call_uses_the_given_parameters(backend, train):
    block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {}).train(train)
    other = {n: (t * 1.3 + 0.1) if t.is_floating_point() else t.clone() for n, t in block.state_dict().items()}
    other = {n: t.abs() + 0.5 if "running_var" in n else t for n, t in other.items()}
    x = make_input((2, 4, 5, 5), {})
    outs = {}
    for b in ("naive", backend):
        block.backend = b
        state = {n: t.clone().requires_grad_(t.is_floating_point() and "running" not in n) for n, t in other.items()}
        y = torch.func.functional_call(block, state, (x,))
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs[b] = (y, {n: t.grad for n, t in state.items() if t.requires_grad})
    assert rel_err(outs[backend][0], outs["naive"][0]) < 1e-10
    for name, g in outs["naive"][1].items():
        assert rel_err(outs[backend][1][name], g) < 1e-10, name


def test_torch_backend_rejects_double_backward_and_inplace_weight_changes():
    block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
    block.backend = "torch"
    x = make_input((2, 4, 5, 5), {}).requires_grad_()
    (g,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=False)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    y = block(x).square().sum()
    with torch.no_grad():
        block.denselayer1.conv2.weight.add_(1.0)      # an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("backend", [n for n, b in sorted(backends.BACKENDS.items()) if b.memory_efficient])
def test_memory_efficient_backends_reject_double_backward(backend):
    """A gradient penalty (create_graph=True) through a memory-efficient block raises instead of silently
    computing wrong second-order gradients (issue 12's repro: the cpp backend used to return zeros)."""
    dtype = next((dt for dt in (torch.float64, torch.float32)                # triton's interpreter: no float64
                  if backends.unavailable_reason(backend, "cpu", dt) is None), None)
    if dtype is None:
        pytest.skip(f"backend {backend!r} unavailable: {backends.unavailable_reason(backend, 'cpu', torch.float32)}")
    blk = effdense.EfficientDenseBlock(2, 4, 2, 3, 0.0).to(dtype)
    blk.backend = backend
    x = torch.randn(2, 4, 5, 5, dtype=dtype, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g = torch.autograd.grad(blk(x).pow(2).sum(), x, create_graph=True)[0]
        g.pow(2).sum().backward()
    (g,) = torch.autograd.grad(blk(x).pow(2).sum(), x)                  # first order still works
    assert g.shape == x.shape and torch.isfinite(g).all()


def test_one_pixel_batch_fails_when_only_norm2_trains():
    block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {}).eval()
    for layer in block.values():
        layer.norm2.train()
    for backend in ["naive", *EXACT_BACKENDS]:
        block.backend = backend
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            block(make_input((1, 4, 1, 1), {}))
