"""``backend="triton"`` as a whole against ``"torch"`` (the specification) and ``"naive"``: outputs, input
gradients, every parameter gradient and the running statistics, train and eval, NCHW and channels-last.

Without a GPU the block runs in Triton's interpreter on CPU tensors (fp32; conftest.py sets
``TRITON_INTERPRET=1``). Dropout draws its own Philox mask, so with dropout the reference is the ``"torch"``
backend replaying the mask the Triton forward drew. The CUDA tests (skipped elsewhere) compare with
``"naive"`` in fp32 (tf32 off) and bf16 autocast.
"""
from __future__ import annotations

import copy

import pytest
import torch

import effdense
from effdense import backends
from effdense.backends import torch_backend
import utils
from utils import assert_runs_close, rel_err, run_steps

pytest.importorskip("triton")
from effdense.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                                reason=f"triton backend unavailable: {backends.unavailable_reason('triton', DEVICE)}")
RTOL_FP32 = 2e-5

# label: (block kwargs, input shape, options)
CONFIGS = {
    "bc-5x3-nchw": (dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3), (2, 5, 5, 3), {}),
    "bc-7x7-channels_last": (dict(num_layers=3, num_input_features=6, bn_size=3, growth_rate=5), (2, 6, 7, 7),
                             {"channels_last": True}),
    "bc-1x1-batch3": (dict(num_layers=2, num_input_features=4, bn_size=3, growth_rate=2), (3, 4, 1, 1), {}),
    "bc-noncontiguous-input": (dict(num_layers=2, num_input_features=5, bn_size=2, growth_rate=3), (2, 5, 4, 3),
                               {"noncontiguous": True}),
    "bc-momentum-none-no-input-grad": (dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3),
                                       (2, 4, 5, 3), {"momentum": None, "input_grad": False}),
    "bc-eval": (dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3), (2, 5, 5, 3), {"train": False}),
    "bc-eval-channels_last": (dict(num_layers=2, num_input_features=5, bn_size=2, growth_rate=3, drop_rate=0.3),
                              (2, 5, 3, 5), {"train": False, "channels_last": True}),
    "plain-5x3": (dict(num_layers=3, num_input_features=5, growth_rate=3, bottleneck=False), (2, 5, 5, 3), {}),
    "plain-eval-channels_last": (dict(num_layers=2, num_input_features=4, growth_rate=3, bottleneck=False),
                                 (2, 4, 3, 5), {"train": False, "channels_last": True}),
}


def assert_padded_channels_last(y):
    """The block output is the ``[:, :C]`` view of a channels-last buffer whose rows are padded to 16 elements."""
    from effdense.kernels import as_rows
    assert y.stride(1) == 1 and y.stride(3) % 16 == 0 and y.stride(3) >= y.shape[1], y.stride()
    assert as_rows(y) is not None


def make_block(kwargs, options):
    return utils.make_block(kwargs, options, torch.float32, DEVICE)


def make_input(shape, options):
    return utils.make_input(shape, options, torch.float32, DEVICE)


@pytest.mark.parametrize("label", list(CONFIGS))
def test_triton_matches_torch_and_naive(label):
    kwargs, shape, options = CONFIGS[label]
    block, x = make_block(kwargs, options), make_input(shape, options)
    kw = dict(train=options.get("train", True), input_grad=options.get("input_grad", True), steps=2)
    got = run_steps(block, "triton", x, **kw)
    for ref_backend in ("torch", "naive"):
        assert_runs_close(got, run_steps(block, ref_backend, x, **kw), RTOL_FP32)
    block.backend = "triton"
    with torch.no_grad():
        assert_padded_channels_last(block(x))


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
def test_channels_last_weights_match_torch(bottleneck):
    """``model.to(memory_format=torch.channels_last)`` (what ``--channels-last`` does) makes the 3x3 weights
    channels-last: the kernels read weights through their strides, and write contiguous weight gradients."""
    kwargs = dict(num_layers=2, num_input_features=5, bn_size=2, growth_rate=3, bottleneck=bottleneck)
    block = make_block(kwargs, {}).to(memory_format=torch.channels_last)
    assert not block.denselayer1.conv2.weight.is_contiguous() if bottleneck else \
        not block.denselayer1.conv1.weight.is_contiguous()
    x = make_input((2, 5, 5, 3), {"channels_last": True})
    assert_runs_close(run_steps(block, "triton", x, steps=2), run_steps(block, "torch", x, steps=2), RTOL_FP32)


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dropout_matches_torch_replaying_the_triton_mask(bottleneck, channels_last, monkeypatch):
    """One mask per layer serves forward and backward: the "torch" backend, made to use the mask read off the
    Triton output (zeros of the new channels), gives the same outputs and every gradient."""
    p = 0.4
    kwargs = dict(num_layers=3, num_input_features=4, bn_size=2, growth_rate=3, drop_rate=p, bottleneck=bottleneck)
    block, x = make_block(kwargs, {}), make_input((2, 4, 5, 3), {"channels_last": channels_last})
    got = run_steps(block, "triton", x, steps=1)
    y, k = got.outputs[0], kwargs["growth_rate"]
    masks = {c: (y[:, c:c + k] != 0).to(y.dtype) / (1 - p) for c in range(4, y.shape[1], k)}
    dropped = sum((m == 0).sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert 0.15 < dropped < 0.65

    def replay(like, drop_p, state=None):
        assert drop_p == p
        return masks[like.storage_offset() // like.stride(1)]

    monkeypatch.setattr(torch_backend, "_dropout_mask", replay)
    assert_runs_close(got, run_steps(block, "torch", x, steps=1), RTOL_FP32)


def test_dropout_is_seeded_by_torch_manual_seed():
    block = make_block(dict(num_layers=2, num_input_features=3, bn_size=2, growth_rate=3, drop_rate=0.5), {})
    block.backend = "triton"
    x = make_input((2, 3, 4, 4), {})
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(block(x).detach())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_no_grad_forward_and_running_stats_once_per_forward():
    block = make_block(dict(num_layers=3, num_input_features=4, bn_size=2, growth_rate=3), {})
    ref = make_block(dict(num_layers=3, num_input_features=4, bn_size=2, growth_rate=3), {})
    block.backend, ref.backend = "triton", "naive"
    x = make_input((2, 4, 5, 5), {})
    with torch.no_grad():
        for _ in range(2):
            y = block(x)
            y_ref = ref(x)
    assert y.grad_fn is None and rel_err(y, y_ref) < RTOL_FP32
    for (name, a), b in zip(block.state_dict().items(), ref.state_dict().values()):
        assert rel_err(a.double(), b.double()) < RTOL_FP32, name


def test_batch_size_one_fails_like_batchnorm_and_empty_batch_works():
    block = make_block(dict(num_layers=2, num_input_features=3, bn_size=2, growth_rate=2), {})
    block.backend = "triton"
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        block(torch.randn(1, 3, 1, 1, device=DEVICE))
    y = block(torch.randn(0, 3, 4, 4, device=DEVICE, requires_grad=True))
    assert y.shape == (0, 7, 4, 4)
    y.sum().backward()


# ----------------------------------------------------------------------------- NaN, Inf, empty and constant
def _float64(module):
    return copy.deepcopy(module).double()


def _poisoned(shape: tuple, value: float, channels_last: bool = False) -> torch.Tensor:
    """An input with ``value`` (NaN or Inf; -Inf too for Inf) at an interior pixel, a border pixel and a corner."""
    x = make_input(shape, {"channels_last": channels_last})
    n, c, h, w = shape
    x[0, 1 % c, h // 2, w - 1] = value
    x[n - 1, 2 % c, 0, 0] = -value
    x[n - 1, 0, h - 1, w // 2] = value
    return x


NONFINITE_CASES = {
    "bc": dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3),
    "bc-dropout": dict(num_layers=2, num_input_features=5, bn_size=2, growth_rate=3, drop_rate=0.3),
    "plain": dict(num_layers=3, num_input_features=5, growth_rate=3, bottleneck=False),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("label", list(NONFINITE_CASES))
def test_nan_and_inf_propagate_exactly_as_naive(label, train, value):
    """NaN or +-Inf in the block input: outputs, input gradients, every parameter gradient and the running
    statistics are NaN, +Inf and -Inf exactly where ``naive``'s (float64) are, over two steps: in training the
    poisoned channels' statistics, and so every new channel, go NaN (never only the running statistics); in eval
    the non-finite values stay where the convolutions carry them. A clean eval after a poisoned training step is
    NaN as naive's is."""
    block = make_block(NONFINITE_CASES[label], {})
    x = _poisoned((2, 5, 5, 7), value, channels_last=label == "plain")
    got = run_steps(block, "triton", x, steps=2, train=train)
    ref = run_steps(_float64(block), "naive", x.double(), steps=2, train=train)
    utils.assert_runs_same_nonfinite(got, ref)
    if train:
        assert got.outputs[0][:, 5:].isnan().all()
        clean = make_input((2, 5, 5, 7), {})
        evals = []
        for backend, run, dtype in (("triton", got, torch.float32), ("naive", ref, torch.float64)):
            m = make_block(NONFINITE_CASES[label], {}).to(dtype)
            m.load_state_dict(run.state)
            m.backend = backend
            with torch.no_grad():
                evals.append(m.eval()(clean.to(dtype)))
        utils.assert_same_nonfinite(*evals, "clean eval after a poisoned step")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_nan_and_inf_like_naive(train):
    """The whole model (blocks and transitions, a 7-pixel map that the second transition crops) with NaN and Inf
    inputs: the same non-finite masks as naive in float64."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10, growth_rate=4, num_classes=3)
    x = _poisoned((2, 3, 14, 14), float("nan"))
    x[1, 1, 3, 3] = float("inf")
    got = run_steps(model, "triton", x, steps=1, train=train)
    ref = run_steps(_float64(model), "naive", x.double(), steps=1, train=train)
    utils.assert_runs_same_nonfinite(got, ref)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("label", ["bc", "plain"])
def test_empty_batch_matches_naive(label, train):
    """N = 0: the same (empty) outputs and input gradients as naive, zero parameter gradients, running statistics
    untouched and ``num_batches_tracked`` counted as ``nn.BatchNorm2d`` counts it; the model (with its
    transitions) too."""
    block = make_block(NONFINITE_CASES[label], {})
    x = make_input((0, 5, 4, 6), {})
    got = run_steps(block, "triton", x, steps=2, train=train)
    assert_runs_close(got, run_steps(_float64(block), "naive", x.double(), steps=2, train=train), 0.0)
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10, growth_rate=4, num_classes=3, bottleneck=label == "bc")
    x = make_input((0, 3, 10, 10), {})
    got = run_steps(model, "triton", x, steps=1, train=train)
    assert_runs_close(got, run_steps(_float64(model), "naive", x.double(), steps=1, train=train), 0.0)


def _errors(run, ref) -> dict:
    """Errors of a run against a reference run: output, input gradient, each parameter gradient and running
    statistic, each relative to its reference, or to 1e-3 of the largest parameter gradient where its own is smaller
    (a gradient that is 0 in exact arithmetic, e.g. of a BN whose input has zero variance, is roundoff)."""
    floor = 1e-3 * max(g.double().norm().item() for g in ref.param_grads[0].values())

    def err(a, b):
        return (a.double() - b.double()).norm().item() / max(b.double().norm().item(), floor, 1e-30)

    errs = {"output": err(run.outputs[0], ref.outputs[0]), "input grad": err(run.input_grads[0], ref.input_grads[0])}
    errs.update({name: err(g, ref.param_grads[0][name]) for name, g in run.param_grads[0].items()})
    errs.update({name: err(v, ref.state[name]) for name, v in run.state.items() if "running" in name})
    return errs


def _no_worse_than_naive(block, x, factor: float, floor: float) -> None:
    """Triton fp32 and naive fp32 against naive float64 on the same values: every error of triton at most
    ``factor`` times naive's, plus ``floor``."""
    ref = run_steps(_float64(block), "naive", x.double(), steps=1)
    got = _errors(run_steps(block, "triton", x, steps=1), ref)
    naive = _errors(run_steps(block, "naive", x, steps=1), ref)
    for name, err in got.items():
        assert err <= factor * naive[name] + floor, f"{name}: triton {err:.3g}, naive fp32 {naive[name]:.3g}"


@pytest.mark.parametrize("label", ["bc", "plain"])
def test_constant_batch_matches_naive(label):
    """Every pixel of each input channel one value (zero variance): the statistics are exact (mean the value,
    variance 0, so ``x - mean`` is exactly 0 as in float64), and triton is as close to naive in float64 as naive's
    own fp32 run is; the transition and the model too."""
    block = make_block(NONFINITE_CASES[label], {})
    x = torch.linspace(-2.0, 3.0, 5).view(1, 5, 1, 1).expand(3, 5, 6, 7).contiguous()
    _no_worse_than_naive(block, x, 2.0, 2e-5)
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10, growth_rate=4, num_classes=3, bottleneck=label == "bc")
    _no_worse_than_naive(model, torch.full((3, 3, 10, 10), 0.7), 2.0, 2e-5)


@pytest.mark.parametrize("m, s", [(1e4, 1.0), (1.0, 1e4), (-1e4, 1e2)])
def test_large_mean_to_std_ratios_as_accurate_as_naive(m, s):
    """Input channels ``randn * s + m`` with mean/std up to 1e4, fp32: outputs, input and parameter gradients and
    running statistics of triton no further from naive in float64 than 2x naive's own fp32 error (plus fp32
    roundoff): the statistics are Welford/Chan with a corrected mean in every kernel that makes them, and the BN is
    applied centred, ``(x - mean) * scale + beta``."""
    block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
    for norm in block.modules():    # pre-activations away from the ReLU's kink: any fp32 rounding of the mean
        if isinstance(norm, torch.nn.BatchNorm2d):      # (1e-4 std here) flips the ReLU of pixels within it of 0,
            norm.bias.data.fill_(3.0)                   # in naive as in triton, and that is not what this measures
    x = (make_input((3, 4, 9, 11), {}) * s + m).float()
    _no_worse_than_naive(block, x, 2.0, 2e-5)


def test_unavailable_reasons():
    from effdense.backends import triton_backend
    assert triton_backend.unavailable(torch.device(DEVICE), torch.float32) is None
    assert "float64" in triton_backend.unavailable(torch.device(DEVICE), torch.float64)
    if DEVICE == "cpu":
        assert "bfloat16" in triton_backend.unavailable(torch.device("cpu"), torch.bfloat16)
    assert triton_backend.unavailable(torch.device("meta"), torch.float32)
    if interpreting():
        assert "TRITON_INTERPRET" in triton_backend.unavailable(torch.device("cuda"), torch.float32)
    else:
        assert "TRITON_INTERPRET=1" in triton_backend.unavailable(torch.device("cpu"), torch.float32)
    assert effdense.BACKENDS["triton"].memory_efficient


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
def test_fp16_autocast_error_matches_torch_backend(bottleneck):
    """The low-precision path (fp16 storage, fp32 statistics and accumulation; bf16 is broken in the
    interpreter): error against fp64 no worse than the "torch" backend's own fp16 error."""
    kwargs = dict(num_layers=3, num_input_features=4, bn_size=2, growth_rate=3, bottleneck=bottleneck)
    block, x = make_block(kwargs, {}), make_input((2, 4, 5, 3), {"channels_last": True})

    def run(backend, dtype, autocast):
        m = copy.deepcopy(block).to(dtype)
        m.backend = backend
        xs = x.to(dtype).requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
            y = m(xs)
        (y.to(dtype) * torch.linspace(-1, 1, y.numel(), dtype=dtype, device=DEVICE).view_as(y)).sum().backward()
        return [y.detach(), xs.grad] + [p.grad for p in m.parameters()]

    ref = run("torch", torch.float64, False)
    spec = run("torch", torch.float32, True)
    got = run("triton", torch.float32, True)
    assert got[0].dtype == torch.float16
    for i, (g, s, r) in enumerate(zip(got, spec, ref)):
        assert rel_err(g, r) <= 2 * rel_err(s, r) + 1e-4, (i, rel_err(g, r), rel_err(s, r))


# ---------------------------------------------------------------------------------------------- CUDA only
requires_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@requires_gpu
@pytest.mark.parametrize("label", list(CONFIGS))
def test_cuda_fp32_matches_naive(label, monkeypatch):
    """fp32 with tf32 off (both flags): near 1e-5 relative."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    kwargs, shape, options = CONFIGS[label]
    block, x = make_block(kwargs, options), make_input(shape, options)
    kw = dict(train=options.get("train", True), input_grad=options.get("input_grad", True), steps=3)
    assert_runs_close(run_steps(block, "triton", x, **kw), run_steps(block, "naive", x, **kw), 2e-5)


@requires_gpu
@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
def test_cuda_bf16_autocast_error_at_most_twice_pytorchs(bottleneck):
    """bf16 autocast: error against an fp64 reference no worse than 2x naive's own bf16 error."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=4, num_input_features=16, bn_size=4, growth_rate=12, bottleneck=bottleneck)
    block = make_block(kwargs, {})
    x = torch.randn(8, 16, 16, 16, device=DEVICE)

    def run(backend, dtype, autocast):
        m = make_block(kwargs, {}).to(dtype)
        m.load_state_dict(block.state_dict())
        m.backend = backend
        xs = x.to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = m(xs)
        w = torch.linspace(-1, 1, y.numel(), device=DEVICE, dtype=y.dtype).view_as(y)
        (y * w).sum().backward()
        return [y.detach(), xs.grad] + [p.grad for p in m.parameters()]

    ref = run("naive", torch.float64, False)
    naive = run("naive", torch.float32, True)
    got = run("triton", torch.float32, True)
    for i, (g, n, r) in enumerate(zip(got, naive, ref)):
        assert rel_err(g, r) <= 2 * rel_err(n, r) + 1e-3, (i, rel_err(g, r), rel_err(n, r))


def test_torch_compile_fullgraph_matches_eager():
    """Under torch.compile the backend calls the ``effdense::`` custom ops: one graph, no breaks, same numbers;
    dropout still draws a new mask per call."""
    kwargs = dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3, drop_rate=0.3)
    block = make_block(kwargs, {})
    block.backend = "triton"
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = make_input((2, 4, 5, 3), {"channels_last": True})
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    y1 = compiled(x1)
    torch.manual_seed(3)
    y2 = eager(x2)
    w = torch.randn_like(y2)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    assert rel_err(y1, y2) < RTOL_FP32 and rel_err(x1.grad, x2.grad) < RTOL_FP32
    for (name, a), b in zip(block.named_parameters(), eager.parameters()):
        assert rel_err(a.grad, b.grad) < RTOL_FP32, name
    for (name, a), b in zip(block.named_buffers(), eager.buffers()):
        assert rel_err(a.double(), b.double()) < RTOL_FP32, name
    torch.manual_seed(4)
    y3 = compiled(x1)
    assert not torch.equal(y3 != 0, y1 != 0)


def test_triton_differentiates_the_given_tensors_and_rejects_double_backward():
    """weight_norm parametrization and functional_call: gradients for the tensors actually used."""
    grads = {}
    for b in ("torch", "triton"):
        block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
        for layer in block.values():
            torch.nn.utils.parametrizations.weight_norm(layer.conv2)
        block.backend = b
        x = make_input((2, 4, 5, 5), {}).requires_grad_()
        block(x).square().sum().backward()
        grads[b] = {n: p.grad for n, p in block.named_parameters()}
    for name, g in grads["torch"].items():
        assert grads["triton"][name] is not None and rel_err(grads["triton"][name], g) < 2e-5, name
    block.backend = "triton"
    x = make_input((2, 4, 5, 5), {}).requires_grad_()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
