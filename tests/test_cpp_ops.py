"""The ``torch.ops.effdense`` operators of effdense._C (csrc/) against the PyTorch reference math of
effdense.backends.bn: float64 on CPU (exact up to rounding), gradcheck, ``torch.library.opcheck``, and the
C++ argument checks. The same tests run on a CUDA GPU in float32/float16/bfloat16 where one is present."""
from __future__ import annotations

import os

import pytest
import torch

from effdense import _ext
from effdense.backends import bn

if not _ext.available():
    if os.environ.get("EFFDENSE_REQUIRE_EXT"):
        raise RuntimeError(f"EFFDENSE_REQUIRE_EXT is set but {_ext.reason()}")
    pytest.skip(_ext.reason(), allow_module_level=True)

import effdense.backends.cpp_backend  # noqa: E402,F401 - registers the fake/autograd implementations

ops = torch.ops.effdense
HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_kernels()
CUDA_REASON = ("needs a CUDA GPU" if not torch.cuda.is_available() else
               "effdense._C was built without CUDA kernels")
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)

# (device, dtype, rtol) of the parameterized tests; CUDA cases skip with a reason without a GPU
CASES = [pytest.param("cpu", torch.float64, 1e-12, id="cpu-f64"),
         pytest.param("cpu", torch.float32, 1e-5, id="cpu-f32"),
         pytest.param("cpu", torch.bfloat16, 2e-2, id="cpu-bf16")] + [
    pytest.param("cuda", dt, tol, id=f"cuda-{name}", marks=cuda_only)
    for dt, tol, name in ((torch.float64, 1e-12, "f64"), (torch.float32, 1e-5, "f32"),
                          (torch.float16, 5e-3, "f16"), (torch.bfloat16, 2e-2, "bf16"))]

LAYOUTS = ["contiguous", "channels_last", "prefix_nchw", "prefix_cl", "permuted"]


def make_x(layout: str, shape=(3, 8, 5, 6), device="cpu", dtype=torch.float64, seed=0) -> torch.Tensor:
    """A feature tensor of ``shape`` in ``layout``; the ``prefix_*`` ones are channel prefixes of a wider
    buffer (as the block reads them), ``permuted`` has no standard layout."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    base = (torch.randn(n, c + 5, h, w, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    if layout == "contiguous":
        return base[:, :c].contiguous()
    if layout == "channels_last":
        return base[:, :c].contiguous(memory_format=torch.channels_last)
    if layout == "prefix_nchw":
        return base[:, :c]
    if layout == "prefix_cl":
        return base.contiguous(memory_format=torch.channels_last)[:, :c]
    return base[:, :c].permute(2, 1, 0, 3).contiguous().permute(2, 1, 0, 3)


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def vecs(c, device, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = bn.acc_dtype(dtype)
    scale = (torch.randn(c, generator=g, dtype=torch.float64)).to(a).to(device)
    shift = (torch.randn(c, generator=g, dtype=torch.float64)).to(a).to(device)
    return scale, shift


# ------------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_channel_stats(layout, device, dtype, tol):
    x = make_x(layout, device=device, dtype=dtype)
    mean, var = ops.channel_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == bn.acc_dtype(dtype)
    assert rel(mean, ref_mean) < tol * 10 and rel(var, ref_var) < tol * 10


def test_channel_stats_is_stable_with_a_large_offset():
    x = make_x("channels_last", shape=(4, 16, 8, 8), dtype=torch.float32) + 1e4
    mean, var = ops.channel_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert rel(var, ref_var) < 1e-4 and rel(mean, ref_mean) < 1e-6


def test_channel_stats_empty_batch_is_nan():
    mean, var = ops.channel_stats(torch.zeros(0, 4, 3, 3, dtype=torch.float64))
    assert mean.shape == (4,) and torch.isnan(mean).all() and torch.isnan(var).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_relu(layout, device, dtype, tol):
    x = make_x(layout, device=device, dtype=dtype)
    scale, shift = vecs(x.shape[1], device, dtype)
    y = ops.bn_relu(x, scale, shift)
    ref = bn.bn_relu(x, scale, shift, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel(y, ref) < tol
    out = torch.empty_like(x, dtype=bn.acc_dtype(dtype))          # into a wider-precision buffer
    ops.bn_relu_into(x, scale, shift, out)
    assert rel(out, bn.bn_relu(x, scale, shift)) < tol
    z = x.clone()
    ops.bn_relu_into(z, scale, shift, z)                           # in place
    assert torch.equal(z, y)


def test_bn_relu_propagates_nan():
    x = torch.tensor([float("nan"), -1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 3).expand(2, 1, 1, 3) + 0
    y = ops.bn_relu(x, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert torch.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 0 and y[0, 0, 0, 2] == 2


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_relu_backward(batch_stats, layout, device, dtype, tol):
    x = make_x(layout, device=device, dtype=dtype)
    gy = make_x(layout, device=device, dtype=dtype, seed=3)
    gamma, beta = vecs(x.shape[1], device, dtype)
    a = bn.acc_dtype(dtype)
    var, mean = torch.var_mean(x.to(a), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    scale, shift = gamma * invstd, beta - mean * gamma * invstd
    ref_dx, ref_dg, ref_db = bn.bn_relu_backward(x, gy, scale, shift, mean, invstd, batch_stats)
    dx, dg, db = ops.bn_relu_backward(x, gy, scale, shift, mean, invstd, batch_stats)
    assert dx.dtype == dtype and dg.dtype == db.dtype == a
    assert rel(dx, ref_dx) < tol * 10 and rel(dg, ref_dg) < tol * 10 and rel(db, ref_db) < tol * 10
    acc = torch.randn(x.shape, dtype=a, device=device)             # accumulate into a float gradient buffer
    expect = acc + ref_dx
    dg2, db2 = ops.bn_relu_backward_into(x, gy, scale, shift, mean, invstd, batch_stats, acc, True)
    assert rel(acc, expect) < tol * 10 and torch.equal(dg2, dg) and torch.equal(db2, db)


@pytest.mark.parametrize("layout", ["channels_last", "prefix_cl", "contiguous"])
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_relu_conv1x1(layout, device, dtype, tol):
    x = make_x(layout, shape=(2, 32, 5, 7), device=device, dtype=dtype)
    scale, shift = vecs(x.shape[1], device, dtype)
    w = (torch.randn(24, 32, 1, 1, dtype=torch.float64) * 0.2).to(dtype).to(device)
    y = ops.bn_relu_conv1x1(x, scale, shift, w)
    ref = torch.nn.functional.conv2d(bn.bn_relu(x.double(), scale.double(), shift.double()), w.double())
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel(y, ref) < max(tol * 10, 1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats(momentum):
    norms = [torch.nn.BatchNorm2d(c, momentum=momentum).double() for c in (3, 5)]
    refs = [torch.nn.BatchNorm2d(c, momentum=momentum).double() for c in (3, 5)]
    mean, var = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    for _ in range(2):
        ops.update_running_stats([m.running_mean for m in norms], [m.running_var for m in norms],
                                 [m.num_batches_tracked for m in norms], mean, var, [0, 1],
                                 [-1.0 if momentum is None else momentum] * 2, 7)
        for m in refs:
            bn.update_running_stats(m, mean[:m.num_features], var[:m.num_features], 7)
    for m, r in zip(norms, refs):
        assert torch.allclose(m.running_mean, r.running_mean, rtol=1e-14)
        assert torch.allclose(m.running_var, r.running_var, rtol=1e-14)
        assert m.num_batches_tracked.item() == r.num_batches_tracked.item() == 2
    # per-layer rows of a [L, B] matrix (the bottleneck statistics)
    m2 = torch.rand(3, 4, dtype=torch.float64)
    norm = torch.nn.BatchNorm2d(4).double()
    ops.update_running_stats([norm.running_mean], [norm.running_var], [norm.num_batches_tracked], m2, m2, [2],
                             [0.5], 1)
    assert torch.allclose(norm.running_mean, 0.5 * m2[2]) and torch.allclose(norm.running_var, 0.5 + 0.5 * m2[2])


# ----------------------------------------------------------------------------------------- gradcheck

def test_gradcheck_bn_relu_and_stats_and_conv1x1():
    x = make_x("prefix_cl", shape=(2, 3, 2, 3)).requires_grad_()
    scale, shift = vecs(3, "cpu", torch.float64)
    scale.requires_grad_()
    shift.requires_grad_()
    assert torch.autograd.gradcheck(ops.bn_relu, (x, scale, shift))
    assert torch.autograd.gradcheck(lambda t: ops.channel_stats(t), (x,))
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.bn_relu_conv1x1, (x, scale, shift, w))


# ------------------------------------------------------------------------------------------- opcheck

def _block_args(device="cpu", dtype=torch.float64, bottleneck=True, drop=0.0, eval_layer=False, cl=False):
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    n, c0, k, B, L = 2, 3, 2, 4, 2
    x = rnd(n, c0, 3, 3)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    cs = [c0 + i * k for i in range(L)]
    a = bn.acc_dtype(dtype)
    w1 = [rnd(B if bottleneck else k, c, 1 if bottleneck else 3, 1 if bottleneck else 3) * 0.5 for c in cs]
    w2 = [rnd(k, B, 3, 3) * 0.3 for _ in cs] if bottleneck else []
    g1 = [rnd(c).to(a) for c in cs]
    b1 = [rnd(c).to(a) for c in cs]
    g2 = [rnd(B).to(a) for _ in w2]
    b2 = [rnd(B).to(a) for _ in w2]
    rm1 = [rnd(c).to(a) if eval_layer and i == 0 else None for i, c in enumerate(cs)]
    rv1 = [rnd(c).to(a).abs() + 0.5 if eval_layer and i == 0 else None for i, c in enumerate(cs)]
    rm2 = [None for _ in w2]
    rv2 = [None for _ in w2]
    return [x, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, [1e-5] * L, [1e-5] * len(w2), [drop] * L]


def _op_samples():
    x = make_x("prefix_cl", shape=(2, 4, 3, 3))
    s, t = vecs(4, "cpu", torch.float64)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    inv = torch.rsqrt(var + 1e-5)
    gy = make_x("channels_last", shape=(2, 4, 3, 3), seed=4)
    w = torch.randn(5, 4, 1, 1, dtype=torch.float64)
    n1, n2 = torch.nn.BatchNorm2d(2).double(), torch.nn.BatchNorm2d(4).double()
    return [
        ("channel_stats", (x,)),
        ("channel_stats", (make_x("contiguous"),)),
        ("bn_relu", (x, s, t)),
        ("bn_relu_into", (x, s, t, torch.empty(x.shape, dtype=torch.float64))),
        ("bn_relu_backward", (x, gy, s, t, mean, inv, True)),
        ("bn_relu_backward_into", (x, gy, s, t, mean, inv, False, torch.zeros(x.shape, dtype=torch.float64), True)),
        ("bn_relu_conv1x1", (x, s, t, w)),
        ("update_running_stats", ([n1.running_mean, n2.running_mean], [n1.running_var, n2.running_var],
                                  [n1.num_batches_tracked, n2.num_batches_tracked], mean, var, [0, 1], [0.1, -1.0],
                                  18)),
        ("dense_block_forward", tuple(_block_args())),
        ("dense_block_forward", tuple(_block_args(bottleneck=False, eval_layer=True, cl=True))),
    ]


@pytest.mark.parametrize("name,args", _op_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_block_backward_and_autograd(cl):
    args = _block_args(eval_layer=True, cl=cl)
    for v in (args[0], *args[1], *args[2], *args[3], *args[4], *args[5], *args[6]):
        v.requires_grad_()
    torch.library.opcheck(ops.dense_block_forward.default, tuple(args))
    with torch.no_grad():
        feat, mean, var, mean2, var2, mask = ops.dense_block_forward(*args)
    bwd = (torch.randn_like(feat), feat, mean, var, mean2, var2, mask, *[[t.detach() for t in v] for v in args[1:7]],
           *args[7:])
    torch.library.opcheck(ops.dense_block_backward.default, bwd)


def test_gradcheck_block_op():
    args = _block_args(eval_layer=True)
    x, w1, w2, g1, b1, g2, b2, *rest = args
    flat = [x, *w1, *w2, *g1, *b1, *g2, *b2]
    for t in flat:
        t.requires_grad_()
    L = len(w1)

    def f(*ts):
        it = iter(ts)
        x_ = next(it)
        groups = [[next(it) for _ in range(L)] for _ in range(6)]
        return ops.dense_block_forward(x_, *groups, *rest)[0]

    assert torch.autograd.gradcheck(f, tuple(flat), fast_mode=True)


# ---------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_name_the_expectation():
    x = make_x("contiguous")
    s, t = vecs(8, "cpu", torch.float64)
    with pytest.raises(RuntimeError, match=r"expected x to be a 4-D tensor \[N, C, H, W\], got a 2-D tensor"):
        ops.channel_stats(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match=r"expected x with dtype float32, float64, float16 or bfloat16, got Long"):
        ops.channel_stats(torch.zeros(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(RuntimeError,
                       match=r"expected scale of shape \[8\] .* with dtype Double on cpu, got shape \[7\]"):
        ops.bn_relu(x, s[:7], t)
    with pytest.raises(RuntimeError, match=r"expected shift of shape \[8\] .* with dtype Double .* got shape \[8\] "
                                           r"with dtype Float"):
        ops.bn_relu(x, s, t.float())
    with pytest.raises(RuntimeError, match=r"expected out of shape \[3, 8, 5, 6\]"):
        ops.bn_relu_into(x, s, t, torch.empty(3, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"expected grad_y with dtype Double \(that of x\), got Float"):
        ops.bn_relu_backward(x, x.float(), s, t, s, s, True)
    with pytest.raises(RuntimeError, match=r"expected weight of shape \[B, 8, 1, 1\]"):
        ops.bn_relu_conv1x1(x, s, t, torch.zeros(4, 8, 3, 3, dtype=torch.float64))
    args = _block_args()
    args[1] = [args[1][0], args[1][1][:, :1]]
    with pytest.raises(RuntimeError, match=r"expected w1\[1\] of shape \[4, 5, 1, 1\] with dtype Double"):
        ops.dense_block_forward(*args)
    args = _block_args()
    args[3] = args[3][:1]
    with pytest.raises(RuntimeError, match=r"expected gamma1, beta1, .* of length 2"):
        ops.dense_block_forward(*args)
    args = _block_args()
    args[0] = args[0][:1, :, :1, :1]
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel when training"):
        ops.dense_block_forward(*args)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"on cpu"):
            ops.bn_relu(x, s.cuda(), t)


@cuda_only
def test_cuda_bad_device_mix():
    x = make_x("contiguous", device="cuda", dtype=torch.float32)
    s, t = vecs(8, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match=r"expected scale of shape \[8\] .* on cuda"):
        ops.bn_relu(x, s, t)
