"""The C++ steps of effdense._C (csrc/ops.h, reached through the test-only binding ``effdense._C._testing``) and
its ``torch.ops.effdense`` operators against the PyTorch reference math of effdense.backends.bn: float64 on CPU
(exact up to rounding), gradcheck and ``torch.library.opcheck`` of every registered operator, and the C++ argument
checks. The same tests run on a CUDA GPU in float32/float16/bfloat16 where one is present."""
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

ops = torch.ops.effdense       # the registered operators
steps = _ext.C._testing        # the block driver's steps (not operators; not an API)
REGISTERED = ("dense_block_forward", "dense_block_backward", "transition_forward", "transition_backward",
              "update_running_stats")
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


def bn_relu(x, scale, shift):
    """steps.bn_relu_into into a new tensor of x's dtype (and layout, where x is dense)."""
    out = torch.empty_like(x)
    steps.bn_relu_into(x, scale, shift, out)
    return out


def bn_relu_backward(x, gy, scale, shift, mean, invstd, batch_stats):
    """(grad_x, dgamma, dbeta) of steps.bn_relu_backward_into into a new grad_x of x's dtype."""
    gx = torch.empty_like(x)
    return (gx, *steps.bn_relu_backward_into(x, gy, scale, shift, mean, invstd, batch_stats, gx, False))


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
    mean, var = steps.channel_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == bn.acc_dtype(dtype)
    assert rel(mean, ref_mean) < tol * 10 and rel(var, ref_var) < tol * 10


def test_channel_stats_is_stable_with_a_large_offset():
    x = make_x("channels_last", shape=(4, 16, 8, 8), dtype=torch.float32) + 1e4
    mean, var = steps.channel_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert rel(var, ref_var) < 1e-4 and rel(mean, ref_mean) < 1e-6


def test_channel_stats_empty_batch_is_nan():
    mean, var = steps.channel_stats(torch.zeros(0, 4, 3, 3, dtype=torch.float64))
    assert mean.shape == (4,) and torch.isnan(mean).all() and torch.isnan(var).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_relu(layout, device, dtype, tol):
    x = make_x(layout, device=device, dtype=dtype)
    scale, shift = vecs(x.shape[1], device, dtype)
    y = bn_relu(x, scale, shift)
    ref = bn.bn_relu(x, scale, shift, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel(y, ref) < tol
    out = torch.empty_like(x, dtype=bn.acc_dtype(dtype))          # into a wider-precision buffer
    steps.bn_relu_into(x, scale, shift, out)
    assert rel(out, bn.bn_relu(x, scale, shift)) < tol
    z = x.clone()
    steps.bn_relu_into(z, scale, shift, z)                           # in place
    assert torch.equal(z, y)


def test_bn_relu_propagates_nan():
    x = torch.tensor([float("nan"), -1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 3).expand(2, 1, 1, 3) + 0
    y = bn_relu(x, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
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
    dx, dg, db = bn_relu_backward(x, gy, scale, shift, mean, invstd, batch_stats)
    assert dx.dtype == dtype and dg.dtype == db.dtype == a
    assert rel(dx, ref_dx) < tol * 10 and rel(dg, ref_dg) < tol * 10 and rel(db, ref_db) < tol * 10
    acc = torch.randn(x.shape, dtype=a, device=device)             # accumulate into a float gradient buffer
    expect = acc + ref_dx
    dg2, db2 = steps.bn_relu_backward_into(x, gy, scale, shift, mean, invstd, batch_stats, acc, True)
    assert rel(acc, expect) < tol * 10 and torch.equal(dg2, dg) and torch.equal(db2, db)


@pytest.mark.parametrize("layout", ["channels_last", "prefix_cl", "contiguous"])
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_relu_conv1x1(layout, device, dtype, tol):
    x = make_x(layout, shape=(2, 32, 5, 7), device=device, dtype=dtype)
    scale, shift = vecs(x.shape[1], device, dtype)
    w = (torch.randn(24, 32, 1, 1, dtype=torch.float64) * 0.2).to(dtype).to(device)
    y = steps.bn_relu_conv1x1(x, scale, shift, w)
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


# ------------------------------------------------------------------------------ the block driver's ops

# (N, C, H, W) of the block-driver op tests: one tile, and several tiles over several images (960 pixels:
# more than a tile's rows for these widths, tiles crossing image boundaries, one group per thread)
OP_SHAPES = {"one-tile": (2, 6, 3, 5), "tiles": (3, 40, 16, 20)}


def bn_vecs(c, device, dtype, seed=2, running=False):
    """(gamma, beta, mean, var) of a BN over c channels in the accumulation dtype (var > 0)."""
    g = torch.Generator().manual_seed(seed)
    a = bn.acc_dtype(dtype)
    r = lambda: torch.randn(c, generator=g, dtype=torch.float64)  # noqa: E731
    gamma, beta, mean, var = r() * 0.5 + 1, r() * 0.3, r() * 0.2, r().abs() + 0.5
    return tuple(t.to(a).to(device) for t in (gamma, beta, mean, var))


def ref_affine(gamma, beta, mean, var, eps=1e-5):
    """(scale, shift, mean, invstd) from effdense.backends.bn.scale_shift (the specification)."""
    norm = torch.nn.BatchNorm2d(gamma.numel(), eps=eps)
    return bn.scale_shift(norm, mean, var, gamma.dtype, (gamma, beta))


def cl_empty(shape, device, dtype):
    return torch.empty(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


def batch_stats_of(x):
    var, mean = torch.var_mean(x.to(bn.acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


@pytest.mark.parametrize("shape", list(OP_SHAPES))
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_scale_shift(shape, device, dtype, tol):
    gamma, beta, mean, var = bn_vecs(OP_SHAPES[shape][1], device, dtype)
    a = bn.acc_dtype(dtype)
    got = steps.bn_scale_shift(gamma, beta, mean, var, 1e-5, a)
    for g_, r_ in zip(got, (ref_affine(gamma, beta, mean, var)[i] for i in (0, 1, 3))):
        assert g_.dtype == a and rel(g_, r_) < 1e-6 if a == torch.float32 else rel(g_, r_) < 1e-14


@pytest.mark.parametrize("shape", list(OP_SHAPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_batch_norm_relu_into(shape, layout, device, dtype, tol):
    x = make_x(layout, shape=OP_SHAPES[shape], device=device, dtype=dtype)
    gamma, beta, mean, var = bn_vecs(x.shape[1], device, dtype)
    scale, shift, _, _ = ref_affine(gamma, beta, mean, var)
    ref = bn.bn_relu(x, scale, shift, dtype)
    for out in (cl_empty(x.shape, device, dtype), torch.empty_like(x, dtype=bn.acc_dtype(dtype))):
        steps.batch_norm_relu_into(x, gamma, beta, mean, var, 1e-5, out)
        assert rel(out, ref) < tol
    z = x.clone()
    steps.batch_norm_relu_into(z, gamma, beta, mean, var, 1e-5, z)                    # in place
    assert rel(z, ref) < tol


@pytest.mark.parametrize("shape", list(OP_SHAPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_relu_linear_into(shape, layout, device, dtype, tol):
    x = make_x(layout, shape=OP_SHAPES[shape], device=device, dtype=dtype)
    gamma, beta, mean, var = bn_vecs(x.shape[1], device, dtype)
    w = (torch.randn(7, x.shape[1], 1, 1, dtype=torch.float64) * 0.3).to(dtype).to(device)
    scale, shift, _, _ = ref_affine(gamma, beta, mean, var)
    ref = torch.nn.functional.conv2d(bn.bn_relu(x, scale, shift, dtype).double(), w.double())
    ref_mean, ref_var = batch_stats_of(ref)
    a = bn.acc_dtype(dtype)
    for z in (cl_empty(ref.shape, device, dtype), torch.empty(ref.shape, device=device, dtype=dtype)):
        m, v = torch.empty(7, dtype=a, device=device), torch.empty(7, dtype=a, device=device)
        steps.bn_relu_linear_into(x, gamma, beta, mean, var, 1e-5, w, z, m, v)       # z and its statistics
        assert rel(z, ref) < max(tol * 10, 1e-6 if dtype == torch.float32 else 0)
        assert rel(m, ref_mean) < tol * 10 and rel(v, ref_var) < tol * 10
    steps.bn_relu_linear_into(x, gamma, beta, mean, var, 1e-5, w, z, None, None)
    assert rel(z, ref) < max(tol * 10, 1e-6 if dtype == torch.float32 else 0)


def _bwd_case(shape, layout, device, dtype, batch_stats):
    x = make_x(layout, shape=OP_SHAPES[shape], device=device, dtype=dtype)
    gamma, beta, mean, var = bn_vecs(x.shape[1], device, dtype)
    if batch_stats:
        mean, var = batch_stats_of(x)
    return x, gamma, beta, mean, var, ref_affine(gamma, beta, mean, var)


def _deferred(gx, coef, x, mean):
    """The complete gradient of a deferred-correction call: gx + coef[0] + coef[1] * (x - mean)."""
    a = coef.dtype
    return gx.to(a) + coef[0].view(1, -1, 1, 1) + coef[1].view(1, -1, 1, 1) * (x.to(a) - mean.view(1, -1, 1, 1))


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("shape", list(OP_SHAPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_batch_norm_relu_backward_into(batch_stats, shape, layout, device, dtype, tol):
    x, gamma, beta, mean, var, (scale, shift, mu, invstd) = _bwd_case(shape, layout, device, dtype, batch_stats)
    gy = make_x(layout, shape=x.shape, device=device, dtype=dtype, seed=3)
    ref_dx, ref_dg, ref_db = bn.bn_relu_backward(x, gy, scale, shift, mu, invstd, batch_stats)
    a = bn.acc_dtype(dtype)
    acc = torch.randn(x.shape, dtype=a, device=device)                      # accumulate into a float buffer
    expect = acc + ref_dx
    dg, db = steps.batch_norm_relu_backward_into(x, gy, gamma, beta, mean, var, 1e-5, batch_stats, acc, True)
    assert rel(acc, expect) < tol * 10 and rel(dg, ref_dg) < tol * 10 and rel(db, ref_db) < tol * 10
    assert dg.dtype == gamma.dtype and db.dtype == beta.dtype
    g = gy.clone()                                                           # in place over grad_y
    steps.batch_norm_relu_backward_into(x, g, gamma, beta, mean, var, 1e-5, batch_stats, g, False)
    assert rel(g, ref_dx) < tol * 10
    coef = torch.zeros(2, x.shape[1], dtype=a, device=device)               # correction deferred into coef
    out = torch.zeros(x.shape, dtype=a, device=device)
    steps.batch_norm_relu_backward_into(x, gy, gamma, beta, mean, var, 1e-5, batch_stats, out, True, coef)
    assert rel(_deferred(out, coef, x, mu), ref_dx) < tol * 10
    assert batch_stats or not coef.any(), "running statistics have no correction to defer"


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("shape", list(OP_SHAPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_relu_linear_backward(batch_stats, shape, layout, device, dtype, tol):
    x, gamma, beta, mean, var, (scale, shift, mu, invstd) = _bwd_case(shape, layout, device, dtype, batch_stats)
    n, c, h, w_ = x.shape
    w = (torch.randn(7, c, 1, 1, dtype=torch.float64) * 0.3).to(dtype).to(device)
    gz = cl_empty((n, 7, h, w_), device, dtype).copy_(torch.randn(n, 7, h, w_, dtype=torch.float64))
    u = bn.bn_relu(x, scale, shift, dtype)
    ref_dw = torch.einsum("nbhw,nchw->bc", gz.double(), u.double()).view(7, c, 1, 1)
    gu = torch.nn.functional.conv_transpose2d(gz.double(), w.double()).to(dtype)
    ref_dx, ref_dg, ref_db = bn.bn_relu_backward(x, gu, scale, shift, mu, invstd, batch_stats)
    a = bn.acc_dtype(dtype)
    loose = max(tol * 10, 1e-6 if dtype == torch.float32 else 0)
    for grad_x in (torch.randn(x.shape, dtype=a, device=device),                            # x's layout
                   torch.randn(x.shape, dtype=a, device=device).contiguous(memory_format=torch.channels_last)):
        expect = grad_x + ref_dx
        dw, dg, db = steps.bn_relu_linear_backward(x, gz, w, gamma, beta, mean, var, 1e-5, batch_stats, grad_x, True)
        assert dw.dtype == w.dtype and dw.stride() == w.stride()
        assert rel(dw, ref_dw) < loose and rel(grad_x, expect) < loose
        assert rel(dg, ref_dg) < loose and rel(db, ref_db) < loose
        coef = torch.zeros(2, c, dtype=a, device=device)
        out = torch.zeros_like(grad_x)
        steps.bn_relu_linear_backward(x, gz, w, gamma, beta, mean, var, 1e-5, batch_stats, out, False, coef)
        assert rel(_deferred(out, coef, x, mu), ref_dx) < loose


# Tile GEMM shapes (csrc/cpu/gemm.h's register tiles: AVX2 6 rows by 16 floats / 8 doubles with row tails of
# 1-5; AVX-512 8 rows by panels of 1-3 vectors of 16 floats / 8 doubles, the last masked or not, a 3 + 1 vector
# remainder split 2 + 2 (49 and 57 columns of floats, 49 of doubles), row tails of 1-7):
# (pixels, in channels c, out channels B). Pixels 13 over 2 threads make tiles of 7 and 6 rows, 37 of 19 and 18
# (two 8-row blocks and tails of 3 and 2); the channel counts put each GEMM side below, at, between and past one,
# two and three vector widths of both dtypes (c and B are the column counts of the backward's and forward's
# products).
GEMM_SHAPES = {"one-row": (1, 1, 1), "row-tail": (13, 3, 5), "vec-f64": (7, 4, 8), "vec-f32": (11, 8, 16),
               "mask-f64": (9, 9, 9), "mask-f32": (12, 15, 17), "two-panels": (13, 17, 33), "wide": (6, 33, 48),
               "full-panels": (37, 48, 24), "panel-tails": (37, 49, 40), "wide-tails": (21, 70, 57)}


def _gemm_case(shape, dtype):
    p, c, b = GEMM_SHAPES[shape]
    x = make_x("channels_last", shape=(1, c, 1, p), dtype=dtype)
    gamma, beta, mean, var = bn_vecs(c, "cpu", dtype)
    w = (torch.randn(b, c, 1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.3).to(dtype)
    scale, shift, mu, invstd = ref_affine(gamma, beta, mean, var)
    return x, w, (gamma, beta, mean, var), bn.bn_relu(x, scale, shift, dtype).double(), (scale, shift, mu, invstd)


@pytest.mark.parametrize("shape", list(GEMM_SHAPES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)], ids=["f64", "f32"])
def test_tile_gemm_shapes(shape, dtype, tol):
    """Every register-tile case of the CPU tile GEMMs through the ops that use them: the forward
    (z = u W^T, rows x B over c) and, in channels-last backward, dW += gz^T u (B x c over rows) and
    gu = gz W (rows x c over B), each against float64 torch."""
    x, w, params, u, affine = _gemm_case(shape, dtype)
    n, c, h, w_ = x.shape
    b = w.shape[0]
    z = cl_empty((n, b, h, w_), "cpu", dtype)
    steps.bn_relu_linear_into(x, *params, 1e-5, w, z, None, None)
    assert rel(z, torch.nn.functional.conv2d(u, w.double())) < tol
    gz = cl_empty((n, b, h, w_), "cpu", dtype).copy_(make_x("channels_last", (n, b, h, w_), dtype=dtype, seed=4))
    gx = torch.zeros_like(x).contiguous(memory_format=torch.channels_last)
    dw, _, _ = steps.bn_relu_linear_backward(x, gz, w, *params, 1e-5, False, gx, True)
    assert rel(dw, torch.einsum("nbhw,nchw->bc", gz.double(), u).view(b, c, 1, 1)) < tol
    gu = torch.nn.functional.conv_transpose2d(gz.double(), w.double())
    ref_dx, _, _ = bn.bn_relu_backward(x.double(), gu, *(t.double() for t in affine), False)
    assert rel(gx, ref_dx) < tol


@pytest.mark.parametrize("route", ["blas", "avx2"])
def test_tile_gemm_shapes_through_each_route(route):
    """The same table, and the 3x3 convolution's, with EFFDENSE_CPU_GEMM=blas and =avx2 (read once per process: a
    subprocess), so the BLAS route (all a build without AVX2 has) and the AVX2 kernel (what an AVX-512 build
    bypasses) stay tested on machines that have them."""
    if os.environ.get("EFFDENSE_CPU_GEMM") == route:
        pytest.skip(f"the {route} run itself")
    r = _run_with_route(route, f"{__file__}::test_tile_gemm_shapes", f"{__file__}::test_bn_relu_conv3x3",
                        "-k", "not cuda")
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]


def _run_with_route(route, *pytest_args):
    import subprocess
    import sys
    env = dict(os.environ, EFFDENSE_CPU_GEMM=route)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def _gemm_digest():
    """A digest of the bytes of every tile GEMM table case's outputs (forward z, dW, grad_x; both dtypes)."""
    import hashlib
    h = hashlib.sha256()
    for shape in GEMM_SHAPES:
        for dtype in (torch.float64, torch.float32):
            x, w, params, _, _ = _gemm_case(shape, dtype)
            n, c, hh, ww = x.shape
            z = cl_empty((n, w.shape[0], hh, ww), "cpu", dtype)
            steps.bn_relu_linear_into(x, *params, 1e-5, w, z, None, None)
            gx = torch.zeros_like(x).contiguous(memory_format=torch.channels_last)
            dw, _, _ = steps.bn_relu_linear_backward(x, z, w, *params, 1e-5, False, gx, True)
            for t in (z, dw, gx):
                h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_tile_gemm_kernels_give_the_same_bits():
    """The AVX-512 and the AVX2 kernel run each output element as one FMA chain over k in order: the table's
    outputs are bitwise the same from either (EFFDENSE_CPU_GEMM=avx2 in a subprocess; in an AVX2 build both
    take the AVX2 kernel)."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_cpp_ops as t; print(t._gemm_digest())"
    digests = {}
    for route in ("", "avx2"):
        env = dict(os.environ, EFFDENSE_CPU_GEMM=route)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        digests[route] = r.stdout.split()[-1]
    assert digests[""] == digests["avx2"], digests


# Bottleneck 3x3 convolution shapes (csrc/cpu/conv3x3.cpp): (N, C, H, W, k). A tile is 16384 // (W * 9k) image
# rows, so "row-tiles" (4 rows) and "wide-k" (3 rows) end on a partial tile; "one-pixel" has no tap inside the
# image but the centre; N = 3 splits 2 + 1 over two threads (grad_w's partial sums merged). The shifted adds and
# im2col have compile-time copies for k = 12, 16, 24, 32, 40, 48 (with_k) and a run-time one for the rest (3, 5).
CONV3X3_SHAPES = {"one-pixel": (2, 5, 1, 1, 3), "small": (3, 7, 5, 4, 5), "row-tiles": (2, 20, 11, 33, 12),
                  "wide-k": (1, 9, 7, 16, 32), "bc-layer": (3, 48, 8, 8, 12), "k16": (2, 6, 5, 7, 16),
                  "k24": (1, 5, 4, 6, 24), "k40": (1, 4, 3, 5, 40), "k48": (2, 3, 4, 3, 48)}


@pytest.mark.parametrize("shape", list(CONV3X3_SHAPES))
@pytest.mark.parametrize("layout", ["channels_last", "prefix_cl", "prefix_nchw", "permuted"])
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bn_relu_conv3x3(shape, layout, device, dtype, tol):
    """y = conv3x3(relu(bn(x))) (with y's statistics) and its backward (grad_a, grad_w), against float64 torch,
    for outputs and weights of either layout: the CPU kernels, and on CUDA the cuDNN composite (TF32 off)."""
    n, c, h, w_, k = CONV3X3_SHAPES[shape]
    x = make_x(layout, shape=(n, c, h, w_), device=device, dtype=dtype)
    params = bn_vecs(c, device, dtype)
    scale, shift, _, _ = ref_affine(*params)
    a = bn.bn_relu(x, scale, shift, dtype).double().cpu()
    w = (torch.randn(k, c, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.2).to(dtype)
    gy = make_x("channels_last", shape=(n, k, h, w_), dtype=dtype, seed=4)
    ref = torch.nn.functional.conv2d(a, w.double(), padding=1)
    ref_ga, ref_gw, _ = torch.ops.aten.convolution_backward(gy.double(), a, w.double(), None, [1, 1], [1, 1],
                                                            [1, 1], False, [0, 0], 1, [True, True, False])
    w, gy, acc = w.to(device), gy.to(device), bn.acc_dtype(dtype)
    with torch.backends.cudnn.flags(allow_tf32=False):
        for wt, y, ga in ((w, cl_empty(ref.shape, device, dtype), cl_empty(x.shape, device, dtype)),
                          (w.contiguous(memory_format=torch.channels_last),
                           torch.empty(ref.shape, dtype=dtype, device=device),
                           torch.empty(x.shape, dtype=dtype, device=device))):
            steps.bn_relu_conv3x3_into(x, *params, 1e-5, wt, y)
            assert rel(y, ref) < tol
            m, v = torch.empty(k, dtype=acc, device=device), torch.empty(k, dtype=acc, device=device)
            steps.bn_relu_conv3x3_into(x, *params, 1e-5, wt, y, m, v)                # and y's statistics
            ref_mean, ref_var = batch_stats_of(y)
            assert rel(y, ref) < tol and rel(m, ref_mean) < tol and rel(v, ref_var) < tol
            gw = steps.bn_relu_conv3x3_backward(x, gy.contiguous() if y.is_contiguous() else gy, *params, 1e-5, wt, ga)
            assert gw.dtype == dtype and gw.stride() == wt.stride()
            assert rel(ga, ref_ga) < tol and rel(gw, ref_gw) < tol


@pytest.mark.parametrize("bs1,bs2", [(True, True), (False, True), (True, False)],
                         ids=["batch", "running1", "running2"])
@pytest.mark.parametrize("shape", list(OP_SHAPES))
@pytest.mark.parametrize("layout", ["prefix_nchw", "prefix_cl"])
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_bottleneck_backward_is_bn2_backward_then_linear_backward(bs1, bs2, shape, layout, device, dtype, tol):
    """The fused op equals its two steps: batch_norm_relu_backward_into on (z, grad_a), then
    bn_relu_linear_backward (each tested against the reference math above)."""
    x, gamma1, beta1, mean1, var1, _ = _bwd_case(shape, layout, device, dtype, bs1)
    n, c, h, w_ = x.shape
    w = (torch.randn(6, c, 1, 1, dtype=torch.float64) * 0.3).to(dtype).to(device)
    z = cl_empty((n, 6, h, w_), device, dtype)
    steps.bn_relu_linear_into(x, gamma1, beta1, mean1, var1, 1e-5, w, z, None, None)
    gamma2, beta2, mean2, var2 = bn_vecs(6, device, dtype, seed=4)
    if bs2:
        mean2, var2 = batch_stats_of(z)
    ga = cl_empty(z.shape, device, dtype).copy_(torch.randn(z.shape, dtype=torch.float64))
    a = bn.acc_dtype(dtype)
    gz = ga.clone()
    ref_dg2, ref_db2 = steps.batch_norm_relu_backward_into(z, ga, gamma2, beta2, mean2, var2, 1e-5, bs2, gz, False)
    g0 = torch.randn(x.shape, dtype=a, device=device)
    gx_ref, gx = g0.clone(), g0.clone()
    coef_ref, coef = torch.zeros(2, c, dtype=a, device=device), torch.zeros(2, c, dtype=a, device=device)
    ref_dw, ref_dg1, ref_db1 = steps.bn_relu_linear_backward(x, gz, w, gamma1, beta1, mean1, var1, 1e-5, bs1, gx_ref,
                                                           True, coef_ref)
    got = steps.bottleneck_backward(x, z, ga, w, gamma1, beta1, mean1, var1, 1e-5, bs1, gamma2, beta2, mean2, var2,
                                  1e-5, bs2, gx, coef)
    for g_, r_ in zip((*got, gx, coef), (ref_dw, ref_dg1, ref_db1, ref_dg2, ref_db2, gx_ref, coef_ref)):
        assert rel(g_, r_) < max(tol * 10, 1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("shape", list(OP_SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "prefix_nchw", "prefix_cl"])
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_store_channels(shape, layout, device, dtype, tol):
    y = make_x("channels_last", shape=OP_SHAPES[shape], device=device, dtype=dtype)    # a convolution output
    out = make_x(layout, shape=OP_SHAPES[shape], device=device, dtype=dtype, seed=7)    # a slice of F
    a = bn.acc_dtype(dtype)
    m, v = torch.empty(y.shape[1], dtype=a, device=device), torch.empty(y.shape[1], dtype=a, device=device)
    steps.store_channels(y, None, 0.0, out, None, m, v)
    rm, rv = batch_stats_of(y)
    assert torch.equal(out, y) and rel(m, rm) < tol * 10 and rel(v, rv) < tol * 10
    noise = torch.empty_like(out).bernoulli_(0.7)
    mask = torch.empty(y.shape, dtype=torch.bool, device=device)
    steps.store_channels(y, noise, 0.3, out, mask, m, v)
    ref = y * noise.div(0.7)                                                   # F.dropout's arithmetic
    assert rel(out, ref) < tol and torch.equal(mask, noise != 0)
    rm, rv = batch_stats_of(ref)
    assert rel(m, rm) < tol * 10 and rel(v, rv) < tol * 10


@pytest.mark.parametrize("shape", list(OP_SHAPES))
@pytest.mark.parametrize("layout", ["prefix_nchw", "prefix_cl", "contiguous"])
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_gather_grad(shape, layout, device, dtype, tol):
    a = bn.acc_dtype(dtype)
    g = make_x(layout, shape=OP_SHAPES[shape], device=device, dtype=a)      # a slice of the gradient buffer
    x = make_x(layout, shape=OP_SHAPES[shape], device=device, dtype=dtype, seed=5)
    mask = torch.rand(g.shape, device=device) > 0.4
    coef = torch.randn(2, g.shape[1], dtype=a, device=device)
    mean = torch.randn(g.shape[1], dtype=a, device=device)
    out = cl_empty(g.shape, device, dtype)
    steps.gather_grad(g, None, 0.0, out)
    assert rel(out, g.to(dtype)) < tol
    steps.gather_grad(g, mask, 0.4, out, x, coef, mean)
    ref = _deferred(g, coef, x, mean) * mask.to(dtype).div(0.6)
    assert rel(out, ref) < tol


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("running_dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
def test_update_running_stats_rows_of_any_dtype(momentum, running_dtype):
    """The [L, B] bottleneck statistics (rows), running statistics of another dtype than the batch ones."""
    norms = [torch.nn.BatchNorm2d(4, momentum=momentum).to(running_dtype) for _ in range(3)]
    refs = [torch.nn.BatchNorm2d(4, momentum=momentum).to(running_dtype) for _ in range(3)]
    mean, var = torch.rand(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.1
    for _ in range(2):
        ops.update_running_stats([m.running_mean for m in norms], [m.running_var for m in norms],
                                 [m.num_batches_tracked for m in norms], mean, var, [2, 0, 1],
                                 [-1.0 if momentum is None else momentum] * 3, 9)
        for m, row in zip(refs, (2, 0, 1)):
            bn.update_running_stats(m, mean[row].to(running_dtype), var[row].to(running_dtype), 9)
    tol = 1e-14 if running_dtype == torch.float64 else 2e-3
    for m, r in zip(norms, refs):
        assert rel(m.running_mean, r.running_mean) < tol and rel(m.running_var, r.running_var) < tol
        assert int(m.num_batches_tracked) == int(r.num_batches_tracked) == 2


# ------------------------------------------------------------------------------------------- opcheck

def _block_args(device="cpu", dtype=torch.float64, bottleneck=True, drop=0.0, eval_layer=False, cl=False,
                keep=False, reserve=False):
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
    return [x, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, [1e-5] * L, [1e-5] * len(w2), [drop] * L, keep, reserve]


def _op_samples():
    """Samples of every registered operator: block forward (NCHW, channels-last, kept bottlenecks, plain layers
    with a layer in eval mode), transitions (batch and running statistics), running statistics of two layers."""
    mean, var = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    n1, n2 = torch.nn.BatchNorm2d(2).double(), torch.nn.BatchNorm2d(4).double()
    gamma, beta, _, _ = bn_vecs(4, "cpu", torch.float64)
    w = torch.randn(5, 4, 1, 1, dtype=torch.float64)
    tx = make_x("contiguous", shape=(2, 4, 5, 6))
    ty = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    n3 = torch.nn.BatchNorm2d(4).double()
    return [
        ("update_running_stats", ([n1.running_mean, n2.running_mean], [n1.running_var, n2.running_var],
                                  [n1.num_batches_tracked, n2.num_batches_tracked], mean, var, [0, 1], [0.1, -1.0],
                                  18)),
        ("dense_block_forward", tuple(_block_args())),
        ("dense_block_forward", tuple(_block_args(cl=True, keep=True, reserve=True))),
        ("dense_block_forward", tuple(_block_args(bottleneck=False, eval_layer=True, cl=True))),
        ("transition_forward", (tx, gamma, beta, None, None, 1e-5, w)),
        ("transition_forward", (tx.contiguous(memory_format=torch.channels_last), gamma, beta, n3.running_mean,
                                n3.running_var, 1e-5, w)),
        ("transition_backward", (ty, tx, gamma, beta, mean, var, 1e-5, True, w)),
    ]


def test_only_the_ops_python_calls_are_registered():
    """Issue 26: five operators (schema, fake, autograd); the block driver's steps are C++ functions, reached by the
    tests through effdense._C._testing only."""
    for name in REGISTERED:
        assert hasattr(ops, name), name
    for name in ("channel_stats", "bn_relu", "bn_relu_into", "bn_relu_backward", "bn_relu_backward_into",
                 "bn_relu_conv1x1", "bn_scale_shift", "batch_norm_relu_into", "bn_relu_linear_into",
                 "bn_relu_conv3x3_into", "bn_relu_conv3x3_backward", "batch_norm_relu_backward_into",
                 "bn_relu_linear_backward", "bottleneck_backward", "store_channels", "gather_grad"):
        assert not hasattr(ops, name), f"effdense::{name} is still an operator"
    cpp_ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
               if n.startswith("effdense::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")
               and n.split("::")[1] in REGISTERED + ("channel_stats", "bn_relu_linear_into", "store_channels")}
    assert cpp_ops == set(REGISTERED), cpp_ops


@pytest.mark.parametrize("name,args", _op_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep_bottleneck"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_block_backward_and_autograd(cl, keep):
    args = _block_args(eval_layer=True, cl=cl, keep=keep, reserve=keep)
    for v in (args[0], *args[1], *args[2], *args[3], *args[4], *args[5], *args[6]):
        v.requires_grad_()
    torch.library.opcheck(ops.dense_block_forward.default, tuple(args))
    with torch.no_grad():
        feat, mean, var, mean2, var2, mask, kept, count = ops.dense_block_forward(*args)
    assert kept.shape == ((2, 2, 3, 3, 4) if keep else (0, 2, 3, 3, 4)) and count.shape == (0,)
    bwd = (torch.randn_like(feat), feat, mean, var, mean2, var2, mask, kept,
           *[[t.detach() for t in v] for v in args[1:7]], *args[7:-2])
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
        steps.channel_stats(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match=r"expected x with dtype float32, float64, float16 or bfloat16, got Long"):
        steps.channel_stats(torch.zeros(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(RuntimeError,
                       match=r"expected scale of shape \[8\] .* with dtype Double on cpu, got shape \[7\]"):
        bn_relu(x, s[:7], t)
    with pytest.raises(RuntimeError, match=r"expected shift of shape \[8\] .* with dtype Double .* got shape \[8\] "
                                           r"with dtype Float"):
        bn_relu(x, s, t.float())
    with pytest.raises(RuntimeError, match=r"expected out of shape \[3, 8, 5, 6\]"):
        steps.bn_relu_into(x, s, t, torch.empty(3, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"expected grad_y with dtype Double \(that of x\), got Float"):
        bn_relu_backward(x, x.float(), s, t, s, s, True)
    with pytest.raises(RuntimeError, match=r"expected weight of shape \[B, 8, 1, 1\]"):
        steps.bn_relu_conv1x1(x, s, t, torch.zeros(4, 8, 3, 3, dtype=torch.float64))
    gamma, beta, mean, var = bn_vecs(8, "cpu", torch.float64)
    with pytest.raises(RuntimeError, match=r"bn_relu_conv3x3_into: expected weight of shape \[k, 8, 3, 3\] with "
                                           r"dtype Double \(that of x\) on cpu, got \[4, 8, 1, 1\]"):
        steps.bn_relu_conv3x3_into(x, gamma, beta, mean, var, 1e-5, torch.zeros(4, 8, 1, 1, dtype=torch.float64),
                                 torch.empty(3, 4, 5, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"bn_relu_conv3x3_backward: expected grad_a of shape \[3, 8, 5, 6\]"):
        steps.bn_relu_conv3x3_backward(x, torch.zeros(3, 4, 5, 6, dtype=torch.float64), gamma, beta, mean, var, 1e-5,
                                     torch.zeros(4, 8, 3, 3, dtype=torch.float64), torch.empty(3, 8, 5, 5))
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
    args = _block_args()
    feat, mean, var, mean2, var2, mask, kept, _ = ops.dense_block_forward(*args[:-2], True, True)
    with pytest.raises(RuntimeError, match=r"expected bottleneck empty or the forward's kept bottlenecks, contiguous "
                                           r"\[2, 2, 3, 3, 4\] with dtype Double, got shape \[1, 2, 3, 3, 4\]"):
        ops.dense_block_backward(feat, feat, mean, var, mean2, var2, mask, kept[:1], *args[1:-2])
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"on cpu"):
            bn_relu(x, s.cuda(), t)


@cuda_only
def test_cuda_bad_device_mix():
    x = make_x("contiguous", device="cuda", dtype=torch.float32)
    s, t = vecs(8, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match=r"expected scale of shape \[8\] .* on cuda"):
        bn_relu(x, s, t)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", [(0, 0), (2, 3), (4, 5)], ids=["corner", "interior", "edge"])
def test_bn_relu_conv3x3_backward_nonfinite_as_aten(where, value):
    """A NaN or Inf of a = relu(bn(x)) reaches exactly the grad_w entries it reaches in ATen's convolution: not the
    taps of a border pixel that meet only padding (issue 25.5; the tile GEMM would add Inf * 0 there)."""
    x = make_x("channels_last", shape=(2, 5, 5, 6))
    x[1, 2, where[0], where[1]] = value
    params = bn_vecs(5, "cpu", torch.float64)
    scale, shift, _, _ = ref_affine(*params)
    a = bn.bn_relu(x, scale, shift, torch.float64)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    gy = make_x("channels_last", shape=(2, 4, 5, 6), seed=4)
    ref_ga, ref_gw, _ = torch.ops.aten.convolution_backward(gy, a, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                            1, [True, True, False])
    ga = cl_empty(x.shape, "cpu", torch.float64)
    gw = steps.bn_relu_conv3x3_backward(x, gy, *params, 1e-5, w, ga)
    for got, ref in ((gw, ref_gw), (ga, ref_ga)):
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = torch.isfinite(ref)
        assert rel(got[fin], ref[fin]) < 1e-12
