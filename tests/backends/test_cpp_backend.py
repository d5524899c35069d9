"""The ``"cpp"`` backend (the whole dense block in C++, effdense._C) against ``"naive"`` and ``"torch"``:
float64 outputs, input and parameter gradients and running statistics over several optimizer steps, dropout
with the same masks, eval mode, autocast, torch.compile, and the GPU (fp32/fp16/bf16) where one is present."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import effdense
from effdense import _build, _ext
from effdense.backends import BACKENDS, unavailable_reason
from test_equivalence import CONFIGS as EQUIV_CONFIGS
from utils import make_block as _make_block
from utils import make_input as _make_input
from utils import assert_runs_close, rel_err, run_steps

if not _ext.available():
    if os.environ.get("EFFDENSE_REQUIRE_EXT"):
        raise RuntimeError(f"EFFDENSE_REQUIRE_EXT is set but {_ext.reason()}")
    pytest.skip(_ext.reason(), allow_module_level=True)

HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_kernels()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU" if not torch.cuda.is_available()
                               else "effdense._C was built without CUDA kernels")
RTOL64 = 1e-10

# the float64 configurations every exact backend runs (tests/test_equivalence.py), plus per-layer BN modes
CONFIGS = {**EQUIV_CONFIGS,
           "bc-mixed-modes": (dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3), (2, 5, 6, 6),
                              {"eval_layer": True})}


def make_block(kwargs, options, dtype=torch.float64, device="cpu"):
    block = _make_block(kwargs, options, dtype).to(device)
    if options.get("eval_layer"):
        # the middle layer's BNs use running statistics while the others train (per-layer modes)
        block.train()
        block.denselayer2.eval()
    return block


def make_input(shape, options, dtype=torch.float64, device="cpu"):
    return _make_input(shape, options, dtype).to(device)


class _KeepModes(torch.nn.Module):
    """run_steps calls .train(train); this wrapper restores the per-layer eval mode of "mixed-modes"."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def train(self, mode=True):
        super().train(mode)
        self.block.denselayer2.eval()
        return self

    def set_backend(self, name):
        self.block.backend = name

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep_bottleneck"])
@pytest.mark.parametrize("label", list(CONFIGS))
def test_cpp_block_matches_naive_and_torch_float64(label, keep):
    kwargs, shape, options = CONFIGS[label]
    block, x = make_block(kwargs, options), make_input(shape, options)
    block.keep_bottleneck = keep
    module = _KeepModes(block) if options.get("eval_layer") else block
    train, input_grad = options.get("train", True), options.get("input_grad", True)
    got = run_steps(module, "cpp", x, train=train, input_grad=input_grad)
    assert_runs_close(got, run_steps(module, "naive", x, train=train, input_grad=input_grad), RTOL64)
    assert_runs_close(got, run_steps(module, "torch", x, train=train, input_grad=input_grad), RTOL64)
    assert got.outputs[0].stride() == run_steps(module, "torch", x, steps=1, train=train).outputs[0].stride()


def test_cpp_block_fused_conv1x1_path(monkeypatch):
    """EFFDENSE_FUSED_CONV1X1=1 routes conv1 through the bn_relu_conv1x1 step (on CPU: BN-ReLU + ATen conv)."""
    kwargs, shape, options = CONFIGS["bc-5x3-channels_last"]
    block, x = make_block(kwargs, options), make_input(shape, options)
    ref = run_steps(block, "torch", x, steps=2)
    monkeypatch.setenv("EFFDENSE_FUSED_CONV1X1", "1")
    assert_runs_close(run_steps(block, "cpp", x, steps=2), ref, RTOL64)


@pytest.mark.skipif(os.environ.get("EFFDENSE_CPU_CONV") == "onednn", reason="the oneDNN run itself")
def test_cpp_block_onednn_conv3x3_path():
    """EFFDENSE_CPU_CONV=onednn (read once per process: a subprocess) puts the CPU bottleneck 3x3 convolutions
    back on batch_norm_relu_into + ATen's (the path CUDA takes): the float64 matrix and the tiled runs hold."""
    env = dict(os.environ, EFFDENSE_CPU_CONV="onednn")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_cpp_block_matches_naive_and_torch_float64",
                        f"{__file__}::test_cpp_block_many_tiles_two_threads_float64",
                        f"{__file__}::test_cpp_block_conv3x3_ops_once_per_layer_and_direction"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert " passed" in r.stdout, r.stdout[-500:]


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
def test_cpp_model_matches_naive_float64(bottleneck):
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10 if bottleneck else 7, growth_rate=4, bottleneck=bottleneck,
                                    drop_rate=0.2, num_classes=5).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert_runs_close(run_steps(model, "cpp", x), run_steps(model, "naive", x), RTOL64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cpp_block_bn_without_affine_or_running_stats(train):
    block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
    for layer in block.values():
        layer.norm1 = torch.nn.BatchNorm2d(layer.norm1.num_features, affine=False).double()
        layer.norm2 = torch.nn.BatchNorm2d(layer.norm2.num_features, track_running_stats=False).double()
    x = make_input((2, 4, 5, 5), {})
    assert_runs_close(run_steps(block, "cpp", x, steps=2, train=train),
                      run_steps(block, "naive", x, steps=2, train=train), RTOL64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cpp_block_gradcheck(train):
    block = make_block(dict(num_layers=2, num_input_features=3, bn_size=2, growth_rate=2), {}).train(train)
    block.backend = "cpp"
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    x = make_input((2, 3, 3, 4), {}).requires_grad_()

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_cpp_no_grad_updates_stats_once():
    block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
    ref = copy.deepcopy(block)
    block.backend, ref.backend = "cpp", "naive"
    x = make_input((2, 4, 5, 5), {})
    with torch.no_grad():
        y = block(x)
        y_ref = ref(x)
    assert y.grad_fn is None and rel_err(y, y_ref) < 1e-12
    for (name, a), b in zip(block.state_dict().items(), ref.state_dict().values()):
        assert rel_err(a.double(), b.double()) < 1e-12, name


def test_cpp_batch_of_one_pixel_fails_like_batchnorm_and_empty_batch_works():
    block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})
    block.backend = "cpp"
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        block(torch.randn(1, 4, 1, 1, dtype=torch.float64))
    x = torch.randn(0, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    before = block.denselayer1.norm1.running_mean.clone()
    y = block(x)
    y.sum().backward()
    assert y.shape == (0, 10, 3, 3) and x.grad.shape == x.shape
    assert torch.equal(block.denselayer1.norm1.running_mean, before)
    assert int(block.denselayer1.norm1.num_batches_tracked) == 1
    block.eval()
    assert block(torch.randn(1, 4, 1, 1, dtype=torch.float64)).shape == (1, 10, 1, 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["f32", "bf16"])
def test_cpp_block_low_precision_close_to_torch(dtype, tol):
    kwargs, shape, options = CONFIGS["bc-5x3-channels_last"]
    block, x = make_block(kwargs, options, dtype=dtype), make_input(shape, options, dtype=dtype)
    got, ref = run_steps(block, "cpp", x, steps=1), run_steps(block, "torch", x, steps=1)
    assert rel_err(got.outputs[0], ref.outputs[0]) < tol
    assert rel_err(got.input_grads[0], ref.input_grads[0]) < tol * 5
    for name, g in ref.param_grads[0].items():
        assert rel_err(got.param_grads[0][name], g) < tol * 10, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_cpp_autocast_bf16_close_to_fp32(device):
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=16, growth_rate=6, num_classes=10).to(device)
    x = torch.randn(4, 3, 16, 16, device=device)
    model.set_backend("naive")
    ref = model(x)
    model.set_backend("cpp")
    with torch.autocast(device, dtype=torch.bfloat16):
        y = model(x)
        y.float().sum().backward()
    assert torch.isfinite(y).all() and rel_err(y.float(), ref) < 5e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cpp_block_under_torch_compile():
    """The fake and autograd registrations let torch.compile trace the block in one graph."""
    kwargs, shape, options = CONFIGS["bc-7x7"]
    block, x = make_block(kwargs, options), make_input(shape, options)
    block.backend = "cpp"
    ref_block = copy.deepcopy(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = compiled(xs), ref_block(xr)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert rel_err(y, y_ref) < 1e-12 and rel_err(xs.grad, xr.grad) < 1e-10
    for (name, a), b in zip(block.state_dict().items(), ref_block.state_dict().values()):
        assert rel_err(a.double(), b.double()) < 1e-12, name


def test_cpp_backend_registered_and_reasons():
    assert "cpp" in BACKENDS and BACKENDS["cpp"].memory_efficient
    assert unavailable_reason("cpp", "cpu", torch.float64) is None
    assert "not a floating-point dtype" in unavailable_reason("cpp", "cpu", torch.int64)
    assert "CPU and CUDA kernels only" in unavailable_reason("cpp", "meta", torch.float32)
    if not HAS_CUDA:
        assert unavailable_reason("cpp", "cuda", torch.float32) is not None


def test_cpp_sync_stats_on_cpu_only(monkeypatch):
    """--sync-bn: cpp has cross-process statistics on CPU, so "auto" keeps it there (tests/backends/test_sync_stats.py
    checks them); on CUDA it says it has none (its CUDA steps take no part in collectives)."""
    from effdense.backends import bn, resolve
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("EFFDENSE_BACKEND", raising=False)
    bn.enable_sync_stats()
    try:
        assert BACKENDS["cpp"].sync_stats and unavailable_reason("cpp", "cpu", torch.float32) is None
        assert resolve("auto", "cpu", torch.float32).name == "cpp"
        assert "(--sync-bn) run on CPU (gloo) only" in unavailable_reason("cpp", "cuda", torch.float32)
    finally:
        bn.disable_sync_stats()


def test_cpp_cuda_kernels_built_but_no_gpu_is_unavailable(monkeypatch):
    """Issue 12: an extension built with its CUDA kernels on a machine without a GPU must not claim CUDA."""
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch.cuda.is_available() is False" in unavailable_reason("cpp", "cuda", torch.float32)


# ------------------------------------------------------------------------------------------- tiles, threads

@pytest.mark.parametrize("options", [{}, {"channels_last": True}, {"noncontiguous": True}],
                         ids=["nchw", "channels_last", "noncontiguous"])
def test_cpp_block_many_tiles_two_threads_float64(options):
    """Images large enough for the CPU kernels' tiles to span several images and split into one group per
    thread (2 threads), against naive: the cpu/ kernels' tile paths the small configurations do not reach."""
    kwargs = dict(num_layers=3, num_input_features=6, bn_size=4, growth_rate=5, drop_rate=0.2)
    block, x = make_block(kwargs, options), make_input((3, 6, 17, 19), options)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = run_steps(block, "cpp", x, steps=2)
        ref = run_steps(block, "naive", x, steps=2)
    finally:
        torch.set_num_threads(threads)
    assert_runs_close(got, ref, RTOL64)


# ----------------------------------------------------------------------------------------------- transition

def _transition(cin, cout, train, affine=True):
    from effdense.models import Transition

    torch.manual_seed(3)
    t = Transition(cin, cout, backend="naive").double().train(train)
    if not affine:
        t.norm = torch.nn.BatchNorm2d(cin, affine=False).double().train(train)
    else:
        t.norm.weight.data.uniform_(0.5, 1.5)
        t.norm.bias.data.uniform_(-0.3, 0.3)
    t.norm.running_mean.uniform_(-0.2, 0.2)
    t.norm.running_var.uniform_(0.5, 2.0)
    return t


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,options", [((2, 6, 6, 8), {}), ((3, 5, 7, 5), {"channels_last": True}),
                                           ((2, 7, 5, 6), {"noncontiguous": True}), ((2, 40, 20, 18), {})],
                         ids=["nchw", "odd-channels_last", "odd-noncontiguous", "many-tiles"])
def test_cpp_transition_matches_pytorch_float64(shape, options, train):
    """effdense::transition_forward/backward against the module's PyTorch ops (pooling first), three steps
    (running statistics included), odd H/W (the row/column outside every window), any input layout."""
    from effdense.backends import cpp_backend

    ref_t = _transition(shape[1], 4, train)
    t = copy.deepcopy(ref_t)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (t, ref_t)]
    for step in range(3):
        x = make_input(shape, options) * (1 + step)
        xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        ya = cpp_backend.transition_forward(xa, t.norm, t.conv)
        yb = ref_t.conv(torch.nn.functional.avg_pool2d(torch.relu(ref_t.norm(xb)), 2))
        assert ya.stride() == yb.stride() and rel_err(ya, yb) < RTOL64
        weight = torch.linspace(-1, 1, yb.numel(), dtype=yb.dtype).view_as(yb)
        for o in opts:
            o.zero_grad()
        (ya * weight).sum().backward()
        (yb * weight).sum().backward()
        assert rel_err(xa.grad, xb.grad) < RTOL64
        for (name, p), q in zip(t.named_parameters(), ref_t.parameters()):
            assert rel_err(p.grad, q.grad) < RTOL64, name
        for o in opts:
            o.step()
    for (name, a), b in zip(t.state_dict().items(), ref_t.state_dict().values()):
        assert rel_err(a.double(), b.double()) < RTOL64, name


def test_cpp_transition_without_affine_and_fallbacks():
    from effdense.backends import cpp_backend

    t = _transition(4, 3, True, affine=False)
    x = make_input((2, 4, 4, 4), {}).requires_grad_()
    y = cpp_backend.transition_forward(x, t.norm, t.conv)
    ref = t.conv(torch.nn.functional.avg_pool2d(torch.relu(torch.nn.functional.batch_norm(
        x, None, None, training=True)), 2))
    assert rel_err(y, ref) < RTOL64
    y.sum().backward()
    assert x.grad is not None and t.conv.weight.grad is not None
    one_row = make_input((2, 4, 1, 4), {})                    # H below 2: PyTorch's ops, which refuse it
    with pytest.raises(RuntimeError, match="Output size is too small"):
        cpp_backend.transition_forward(one_row, t.norm, t.conv)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        xx = make_input((2, 4, 4, 4), {}).requires_grad_()
        torch.autograd.grad(cpp_backend.transition_forward(xx, t.norm, t.conv).square().sum(), xx, create_graph=True)


# ------------------------------------------------------------------------------------------------ workspace

def _allocations(fn) -> list[int]:
    """Sizes of the CPU allocator's allocations during fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU and e.nbytes() > 0]


def test_cpp_workspace_is_kept_across_steps_and_released_on_request():
    """The CPU block driver's transients come from one workspace held across layers, blocks and steps: after a
    warm-up step, a step allocates nothing as large as it; release_workspace frees it, and the next step
    allocates it once (which effdense.tools.measure.measure_step relies on to count it in a step's peak)."""
    from effdense.backends import cpp_backend
    from effdense.tools.measure import measure_step, training_step

    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=16, growth_rate=6, backend="cpp")
    step = training_step(model, torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)),
                         torch.optim.SGD(model.parameters(), lr=0.1))
    cpp_backend.release_workspace()        # an earlier test's larger model may have grown it
    step()
    held = cpp_backend.workspace_bytes()
    assert held > 0
    assert max(_allocations(step)) < held, "a warm step allocated a buffer as large as the workspace"
    assert cpp_backend.workspace_bytes() == held
    effdense.release_workspace()           # the public entry point
    assert cpp_backend.workspace_bytes() == 0
    assert held in _allocations(step) and cpp_backend.workspace_bytes() == held
    assert measure_step(step, "cpu").peak_bytes >= held


def test_cpp_workspace_reaches_its_step_size_in_the_first_forward():
    """A block forward with a backward to come reserves its backward's workspace, so after a release the first
    block call (the most pixels) takes the step's whole workspace once and nothing grows it later in the step
    (grown in stages, the smaller buffers were left as heap holes: issue 15's resident memory); a forward without
    a backward to come (no_grad, or nothing requiring grad) takes only the forward's."""
    from effdense.backends import cpp_backend

    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=16, growth_rate=6, backend="cpp")
    x, target = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), target).backward()
    held = cpp_backend.workspace_bytes()
    cpp_backend.release_workspace()
    with torch.no_grad():
        model(x)
    forward_only = cpp_backend.workspace_bytes()
    assert 0 < forward_only < held
    cpp_backend.release_workspace()
    loss = torch.nn.functional.cross_entropy(model(x), target)
    assert cpp_backend.workspace_bytes() == held, "the forward did not reserve the backward's workspace"
    sizes = _allocations(loss.backward)
    assert max(sizes) < held and cpp_backend.workspace_bytes() == held, "the backward grew the workspace"
    frozen = effdense.densenet_cifar(depth=16, growth_rate=6, backend="cpp").requires_grad_(False)
    cpp_backend.release_workspace()
    frozen(x)
    assert cpp_backend.workspace_bytes() < held, "a forward with nothing to differentiate reserved a backward"


# -------------------------------------------------------------------------------------------------- CUDA

@cuda_only
@pytest.mark.parametrize("fused", [False, True], ids=["cudnn", "fused1x1"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.float16, 1e-2),
                                       (torch.bfloat16, 5e-2)], ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("label", ["bc-5x3-channels_last", "bc-7x7", "bc-mixed-modes", "plain-5x3-dropout"])
def test_cuda_cpp_block_matches_torch(label, dtype, tol, fused, monkeypatch):
    if fused:
        monkeypatch.setenv("EFFDENSE_FUSED_CONV1X1", "1")
    kwargs, shape, options = CONFIGS[label]
    block = make_block(kwargs, options, dtype=dtype, device="cuda")
    block.keep_bottleneck = not fused   # both backward paths: kept and recomputed bottlenecks
    x = make_input(shape, options, dtype=dtype, device="cuda")
    module = _KeepModes(block) if options.get("eval_layer") else block
    got, ref = run_steps(module, "cpp", x, steps=2), run_steps(module, "torch", x, steps=2)
    if dtype == torch.float64:
        assert_runs_close(got, ref, tol)
        return
    assert rel_err(got.outputs[0], ref.outputs[0]) < tol
    assert rel_err(got.input_grads[0], ref.input_grads[0]) < tol * 5
    for name, g in ref.param_grads[0].items():
        assert rel_err(got.param_grads[0][name], g) < tol * 10, name


# ---------------------------------------------------------------------------------------- kept bottlenecks

def _one_step_ops(block, x):
    from effdense.tools.launches import count_launches
    return count_launches(lambda: block(x).square().sum().backward()).ops


def test_cpp_block_conv3x3_ops_once_per_layer_and_direction():
    """On CPU (AVX2 or AVX-512 build, EFFDENSE_CPU_CONV unset) a bottleneck layer's BN2-ReLU and 3x3 convolution are one
    bn_relu_conv3x3_into a step (storing into F) and one bn_relu_conv3x3_backward (no batch_norm_relu_into,
    no ATen convolution, no store_channels); otherwise those (run again under onednn)."""
    kwargs, shape, options = CONFIGS["bc-5x3-channels_last"]
    block, x = make_block(kwargs, options, dtype=torch.float32), make_input(shape, options, dtype=torch.float32)
    block.backend = "cpp"
    ops = _one_step_ops(block, x)
    L = kwargs["num_layers"]
    own = _ext.C.cpu_conv3x3()
    manifest = _build.read_manifest(_ext.C.__file__) or {}
    if "cpu_isa" in manifest:  # an AVX2 or AVX-512 build runs its own, unless told not to
        assert own == (manifest["cpu_isa"] in ("avx2", "avx512") and os.environ.get("EFFDENSE_CPU_CONV") != "onednn")
    fused = (ops.get("effdense::bn_relu_conv3x3_into", 0), ops.get("effdense::bn_relu_conv3x3_backward", 0))
    assert fused == ((L, L) if own else (0, 0)), ops
    assert ops.get("effdense::batch_norm_relu_into", 0) == (0 if own else 2 * L), ops
    # without dropout the forward op stores into F itself: store_channels only for the block input
    assert ops.get("effdense::store_channels", 0) == (1 if own else 1 + L), ops
    convs = sum(n for name, n in ops.items() if "convolution" in name)  # oneDNN's, under its ATen name
    assert (convs == 0) if own else (convs >= L), ops


def test_cpp_kept_bottlenecks_replace_the_backward_recompute_and_only_with_a_backward():
    """keep_bottleneck: each layer's BN-ReLU-GEMM runs once per step (forward) instead of twice, and under no_grad
    nothing is kept (the forward's peak is the recomputing one's)."""
    from effdense.tools.measure import CPUAllocatorBytes
    kwargs, shape, options = CONFIGS["bc-7x7"]
    x = make_input(shape, options)
    counts, peaks = {}, {}
    for keep in (False, True):
        block = make_block(kwargs, options, dtype=torch.float32).train()
        block.backend, block.keep_bottleneck = "cpp", keep
        counts[keep] = _one_step_ops(block, x.float()).get("effdense::bn_relu_linear_into", 0)
        with torch.no_grad(), CPUAllocatorBytes() as mem:
            block(x.float())
        peaks[keep] = mem.peak
    L = kwargs["num_layers"]
    assert counts == {False: 2 * L, True: L}, counts
    assert peaks[True] == peaks[False], peaks


def test_bottleneck_plan_keeps_where_the_peak_does_not_rise():
    """BC-100: blocks 2 and 3 keep theirs and the predicted peak with per-call workspaces (the CUDA driver's)
    stays that of recomputing everywhere; keeping block 1's too would raise it. With the CPU driver's workspace,
    held at block 1's backward size, block 2's kept bottlenecks raise the predicted allocator peak. An explicit
    True/False applies to every block."""
    from effdense.memory import bottleneck_plan, predicted_activation_bytes

    def fused(model, device="cuda"):
        return predicted_activation_bytes(model, 32, 32, torch.float32, "fused", device)

    auto = effdense.densenet_cifar(depth=100, growth_rate=12)
    none, every = (effdense.densenet_cifar(depth=100, growth_rate=12, keep_bottleneck=v) for v in (False, True))
    assert [b.keep_bottleneck for b in auto.blocks()] == bottleneck_plan(auto) == [False, True, True]
    assert [b.keep_bottleneck for b in none.blocks()] == [False] * 3
    assert [b.keep_bottleneck for b in every.blocks()] == [True] * 3
    assert fused(auto) == fused(none) < fused(every)
    assert fused(none, "cpu") < fused(auto, "cpu") < fused(every, "cpu")
    plain = effdense.densenet_cifar(depth=40, growth_rate=12, bottleneck=False)
    assert [b.keep_bottleneck for b in plain.blocks()] == [False] * 3, "no bottleneck, nothing to keep"
    with pytest.raises(ValueError, match="keep_bottleneck must be True, False or 'auto'"):
        effdense.densenet_cifar(depth=40, growth_rate=12, keep_bottleneck="yes")


# --------------------------------------------------------------------------- issue 25: silent errors, cpp vs naive

def _one_step(module, backend, x, train=True):
    """One forward/backward of a copy of ``module`` on ``backend`` with a fixed weighted-sum loss: output, input
    gradient, parameter gradients and buffers (running statistics)."""
    m = copy.deepcopy(module)
    m.set_backend(backend) if hasattr(m, "set_backend") else setattr(m, "backend", backend)
    m.train(train)
    xs = x.detach().clone().requires_grad_()
    y = m(xs)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    return y.detach(), xs.grad, grads, dict(m.named_buffers())


def _nonfinite_masks(t):
    return torch.isnan(t), torch.isinf(t)


def _assert_same_nonfinite(got, ref, what):
    for g, r, kind in zip(_nonfinite_masks(got), _nonfinite_masks(ref), ("NaN", "Inf")):
        assert torch.equal(g, r), f"{what}: {kind} at {int(g.sum())} places, naive at {int(r.sum())} " \
                                  f"({int((g != r).sum())} differ)"


def _assert_same_step(got, ref, rtol=RTOL64):
    """Equal non-finite masks everywhere and the finite values within rtol (relative to naive's finite values)."""
    for what, a, b in (("output", got[0], ref[0]), ("input gradient", got[1], ref[1]),
                       *((f"gradient of {n}", got[2][n], ref[2][n]) for n in ref[2]),
                       *((f"buffer {n}", got[3][n], ref[3][n]) for n in ref[3])):
        assert (a is None) == (b is None), what
        if b is None:
            continue
        if b.dtype == torch.int64:
            assert torch.equal(a, b), what
            continue
        _assert_same_nonfinite(a, b, what)
        fin = torch.isfinite(b)
        assert rel_err(a[fin], b[fin]) <= rtol, f"{what}: finite values rel err {rel_err(a[fin], b[fin]):.3g}"


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
def test_cpp_empty_training_batch_gives_naive_zero_gradients(bottleneck):
    """Issue 25.3: N = 0 in training: zero gradients (not NaN), running statistics unchanged, counted once; the
    whole model (blocks and transitions), as naive."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10 if bottleneck else 7, growth_rate=4, bottleneck=bottleneck,
                                    num_classes=5).double()
    x = torch.zeros(0, 3, 32, 32, dtype=torch.float64)
    got, ref = _one_step(model, "cpp", x), _one_step(model, "naive", x)
    _assert_same_step(got, ref)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got[2].values())
    for name, b in model.named_buffers():
        assert torch.equal(got[3][name], b + 1 if name.endswith("num_batches_tracked") else b), name


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cpp_constant_batch_matches_naive(train, bottleneck):
    """Issue 25.3: every pixel of the batch one value (zero variance) in float64, as naive."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10 if bottleneck else 7, growth_rate=4, bottleneck=bottleneck,
                                    num_classes=5).double()
    x = torch.full((2, 3, 8, 8), 0.7, dtype=torch.float64)
    _assert_same_step(_one_step(model, "cpp", x, train), _one_step(model, "naive", x, train), rtol=1e-8)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["bc", "plain", "model"])
def test_cpp_propagates_nan_and_inf_as_naive(kind, train, value):
    """Issue 25.5: a NaN or Inf in the input reaches exactly the outputs, input and parameter gradients and
    running statistics it reaches in naive (float64; their masks compared), in training and eval. ``model``: a
    whole DenseNet-BC (the transitions' kernels too)."""
    torch.manual_seed(0)
    if kind == "model":
        module = effdense.densenet_cifar(depth=10, growth_rate=4, num_classes=5).double()
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    else:
        module = make_block(dict(num_layers=3, num_input_features=8, bn_size=2, growth_rate=4,
                                 bottleneck=kind == "bc"), {})
        x = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    x[0, 2, 3, 3] = value
    _assert_same_step(_one_step(module, "cpp", x, train), _one_step(module, "naive", x, train))


@pytest.mark.parametrize("mean,std", [(100.0, 0.01), (1e4, 1.0)], ids=["100+-0.01", "1e4+-1"])
@pytest.mark.parametrize("layout", [{}, {"channels_last": True}], ids=["nchw", "channels_last"])
def test_cpp_batch_statistics_of_large_means_are_as_accurate_as_naive(layout, mean, std):
    """Issue 25.6: a float32 block on channels of mean/std 1e4 against naive in float64. The batch statistics every BN
    normalized with (its running statistics after one step of momentum 1), relative to the spread: cpp's worst error
    at most twice naive float32's (unshifted float sums of the values made it 9 to 15 times, x0's mean 6e-3 of its
    spread); against naive float64 on the centred input (the same function: BN removes the mean), the output's new
    channels at most twice, the input and parameter gradients at most three times naive's errors (6 to 10 times
    with the unshifted statistics; both formulations' gradients here are ill-conditioned, hence the margin)."""
    torch.manual_seed(0)
    block = make_block(dict(num_layers=3, num_input_features=8, bn_size=2, growth_rate=4), {})
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    x = make_input((8, 8, 16, 16), layout, dtype=torch.float32) * std + mean
    ref = _one_step(block, "naive", x.double())
    centred = _one_step(block, "naive", (x.double() - mean))
    errors = {}
    for backend in ("naive", "cpp"):
        y, gx, grads, buffers = _one_step(block.float(), backend, x)
        stats = max((buffers[n].double() - ref[3][n]).abs().max().item() / (std if "layer1.norm1" in n else 1.0)
                    for n in ref[3] if "running" in n)
        errors[backend] = [stats, rel_err(y[:, 8:], centred[0][:, 8:]), rel_err(gx, centred[1]),
                           max(rel_err(grads[n], centred[2][n]) for n in centred[2])]
    for what, got, base, factor in zip(("statistics", "output", "input gradient", "parameter gradients"),
                                       errors["cpp"], errors["naive"], (2, 2, 3, 3)):
        assert got <= factor * base + 1e-6, f"{what}: cpp {got:.3g}, naive float32 {base:.3g}"
