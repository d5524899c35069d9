"""Every Triton kernel of :mod:`effdense.kernels` against the PyTorch reference (:mod:`effdense.backends.bn`,
:mod:`effdense.backends.torch_backend`), fp32, forward and backward, statistics and dropout included.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py): tiny
labelled shapes with odd H and W, channel counts that are not multiples of the block sizes, batch 2, and
strided prefixes/slices of a larger buffer in NCHW and channels-last.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effdense.backends.bn import bn_relu, bn_relu_backward, channel_stats
from effdense.backends.torch_backend import _conv_backward

K = pytest.importorskip("effdense.kernels")
DEVICE = "cuda" if torch.cuda.is_available() and not K.interpreting() else "cpu"
RTOL = 1e-5

# label: (ks, cin, cout, (N, H, W), channels_last)
SHAPES = {
    "1x1-5x3-nchw": (1, 37, 20, (2, 5, 3), False),
    "1x1-7x7-cl": (1, 19, 33, (2, 7, 7), True),
    "3x3-5x3-nchw": (3, 21, 12, (2, 5, 3), False),
    "3x3-7x7-cl": (3, 13, 7, (2, 7, 7), True),
    "3x3-1x1-cl": (3, 5, 3, (2, 1, 1), True),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _prefix(n, c, h, w, channels_last, extra=5):
    """``[N, c, H, W]`` as the channel prefix of a wider buffer (a strided view, like ``F[:, :c]``)."""
    buf = torch.randn(n, c + extra, h, w, device=DEVICE)
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last)
    return buf[:, :c]


def _slice(n, c, h, w, channels_last, start=2):
    """``[N, c, H, W]`` as a channel slice in the middle of a wider buffer (like ``F[:, c:c+k]``)."""
    buf = torch.randn(n, c + start + 3, h, w, device=DEVICE)
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last)
    return buf[:, start:start + c]


def _bn(c):
    mean, invstd = torch.randn(c, device=DEVICE) * 0.3, torch.rand(c, device=DEVICE) + 0.5
    gamma, beta = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)
    scale = gamma * invstd
    return scale, beta - mean * scale, mean, invstd


@pytest.mark.parametrize("label", list(SHAPES))
def test_bn_relu_conv_fwd(label):
    ks, cin, cout, (n, h, w), cl = SHAPES[label]
    torch.manual_seed(0)
    x = _prefix(n, cin, h, w, cl)
    scale, shift, _, _ = _bn(cin)
    wt = torch.randn(cout, cin, ks, ks, device=DEVICE) / (cin * ks * ks) ** 0.5
    out = _slice(n, cout, h, w, cl)
    buf_before = out.clone()
    mean, var = K.bn_relu_conv_fwd(x, scale, shift, wt, out, stats=True)
    ref = F.conv2d(bn_relu(x, scale, shift), wt, padding=ks // 2)
    assert rel(out, ref) < RTOL
    rm, rv = channel_stats(ref)
    assert rel(mean, rm) < RTOL and rel(var, rv) < RTOL
    assert not torch.equal(out, buf_before)
    assert K.bn_relu_conv_fwd(x, scale, shift, wt, out) is None


def test_fwd_writes_only_its_slice():
    torch.manual_seed(0)
    buf = torch.randn(2, 12, 5, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    before = buf.clone()
    scale, shift, _, _ = _bn(4)
    K.bn_relu_conv_fwd(buf[:, :4], scale, shift, torch.randn(3, 4, 3, 3, device=DEVICE), buf[:, 4:7])
    assert torch.equal(buf[:, :4], before[:, :4]) and torch.equal(buf[:, 7:], before[:, 7:])


def test_statistics_are_stable_for_large_means():
    """Welford tile partials + Chan's merge: a raw sum of squares would lose the variance at mean 1e4."""
    torch.manual_seed(0)
    x = _prefix(2, 6, 9, 7, True)
    ones, zeros = torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE)
    # a 1x1 conv with one-hot weights copies relu(x + 1e4) = x + 1e4: statistics of a shifted input
    wt = torch.eye(6, device=DEVICE).view(6, 6, 1, 1)
    out = torch.empty(2, 6, 9, 7, device=DEVICE)
    mean, var = K.bn_relu_conv_fwd(x, ones, zeros + 1e4, wt, out, stats=True)
    rm, rv = channel_stats(out.double())     # exact statistics of the stored values
    assert rel(mean, rm) < 1e-6
    # fp32 resolves 1e4 + x to ~1e-3, so ~1e-4 relative is the floor; a raw fp32 sum of squares is off by ~100%
    assert rel(var, rv) < 1e-3
    raw = (out.double() ** 2).float().mean((0, 2, 3)) - out.float().mean((0, 2, 3)) ** 2
    assert rel(raw, rv) > 1e-2


def test_merge_stats_matches_var_mean():
    torch.manual_seed(0)
    x = torch.randn(100, 3, dtype=torch.float64) * 3 + 7
    sizes = [1, 30, 0, 69]
    parts = [t for t in torch.split(x, [s for s in sizes if s], 0)]
    cnt = torch.tensor([float(s) for s in sizes], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in
                         (parts[0], parts[1], torch.empty(0, 3), parts[2])])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in
                      (parts[0], parts[1], torch.empty(0, 3), parts[2])])
    mu, var = K.merge_stats(cnt, means, m2)
    rv, rm = torch.var_mean(x, 0, correction=0)
    assert torch.allclose(mu, rm) and torch.allclose(var, rv)


@pytest.mark.parametrize("label", list(SHAPES))
def test_backward_kernels(label):
    """wgrad, dgrad + BN-ReLU backward sums, and the in-place finish into a gradient buffer, in training
    (batch statistics) and eval (running statistics) mode."""
    ks, cin, cout, (n, h, w), cl = SHAPES[label]
    torch.manual_seed(1)
    x = _prefix(n, cin, h, w, cl)
    scale, shift, mean, invstd = _bn(cin)
    wt = torch.randn(cout, cin, ks, ks, device=DEVICE)
    gy = _slice(n, cout, h, w, not cl)       # the other layout: the kernels only see strides
    ga, dw_ref = _conv_backward(gy, bn_relu(x, scale, shift), wt, True)
    dw = K.conv_wgrad(gy, x, scale, shift, ks, torch.float32)
    assert dw.shape == wt.shape and rel(dw, dw_ref) < RTOL
    g, dgamma, dbeta = K.conv_dgrad_bn_relu(gy, wt, x, scale, shift, mean, invstd, torch.float32)
    for batch_stats in (True, False):
        dx, dg_ref, db_ref = bn_relu_backward(x, ga, scale, shift, mean, invstd, batch_stats)
        assert rel(dgamma, dg_ref) < RTOL and rel(dbeta, db_ref) < RTOL
        grad = _prefix(n, cin, h, w, cl)
        before = grad.clone()
        K.bn_bwd_apply(g, x, grad, scale, mean, invstd, dbeta, dgamma, batch_stats, accumulate=True)
        assert rel(grad - before, dx) < RTOL
    # overwrite, in place over g itself (how the backend turns g2 into gZ)
    out = g.view(n, h, w, cin).permute(0, 3, 1, 2)
    K.bn_bwd_apply(g, x, out, scale, mean, invstd, dbeta, dgamma, True, accumulate=False)
    assert rel(out, bn_relu_backward(x, ga, scale, shift, mean, invstd, True)[0]) < RTOL


def test_wgrad_split_reduction():
    """More pixels than one split program reduces: partials over several programs are summed."""
    from effdense.kernels import wgrad
    torch.manual_seed(2)
    n, cin, cout, h, w = 2, 3, 2, 40, 33      # P = 2640 > P_PER_PROGRAM
    assert n * h * w > wgrad.P_PER_PROGRAM
    x = _prefix(n, cin, h, w, True)
    scale, shift, _, _ = _bn(cin)
    gy = torch.randn(n, cout, h, w, device=DEVICE)
    _, dw_ref = _conv_backward(gy, bn_relu(x, scale, shift), torch.randn(cout, cin, 1, 1, device=DEVICE), True)
    assert rel(K.conv_wgrad(gy, x, scale, shift, 1, torch.float32), dw_ref) < RTOL


DROP_P = 0.3


def test_dropout_mask_statistics_and_scale():
    torch.manual_seed(3)
    n, cin, cout, h, w = 2, 4, 24, 16, 16     # 12288 outputs
    x = _prefix(n, cin, h, w, True)
    scale, shift, _, _ = _bn(cin)
    wt = torch.randn(cout, cin, 1, 1, device=DEVICE)
    plain = torch.empty(n, cout, h, w, device=DEVICE)
    dropped = torch.empty_like(plain)
    K.bn_relu_conv_fwd(x, scale, shift, wt, plain)
    mean, var = K.bn_relu_conv_fwd(x, scale, shift, wt, dropped, stats=True, drop_p=DROP_P, seed=123)
    keep = dropped != 0
    frac = keep.double().mean().item()
    sigma = (DROP_P * (1 - DROP_P) / keep.numel()) ** 0.5
    assert abs(frac - (1 - DROP_P)) < 5 * sigma, frac
    assert torch.allclose(dropped[keep], plain[keep] / (1 - DROP_P), rtol=1e-5, atol=1e-6)
    rm, rv = channel_stats(dropped)            # statistics are of the dropped-out output
    assert rel(mean, rm) < RTOL and rel(var, rv) < RTOL
    again = torch.empty_like(plain)
    K.bn_relu_conv_fwd(x, scale, shift, wt, again, drop_p=DROP_P, seed=123)
    assert torch.equal(again, dropped)                     # the seed determines the mask
    K.bn_relu_conv_fwd(x, scale, shift, wt, again, drop_p=DROP_P, seed=124)
    assert not torch.equal(again != 0, keep)


@pytest.mark.parametrize("ks", [1, 3])
def test_backward_regenerates_the_forward_mask(ks):
    """dgrad and wgrad given (gy, seed) equal the same kernels given gy times the mask the forward drew."""
    torch.manual_seed(4)
    n, cin, cout, h, w = 2, 5, 7, 5, 3
    x = _prefix(n, cin, h, w, False)
    scale, shift, mean, invstd = _bn(cin)
    wt = torch.randn(cout, cin, ks, ks, device=DEVICE)
    y = torch.empty(n, cout, h, w, device=DEVICE)
    K.bn_relu_conv_fwd(x, scale, shift, wt, y, drop_p=DROP_P, seed=77)
    mask = (y != 0).float() / (1 - DROP_P)
    gy = _slice(n, cout, h, w, True)
    dw = K.conv_wgrad(gy, x, scale, shift, ks, torch.float32, drop_p=DROP_P, seed=77)
    dw_ref = K.conv_wgrad(gy * mask, x, scale, shift, ks, torch.float32)
    assert rel(dw, dw_ref) < RTOL
    g, dgam, dbet = K.conv_dgrad_bn_relu(gy, wt, x, scale, shift, mean, invstd, torch.float32, DROP_P, 77)
    g_ref, dgam_ref, dbet_ref = K.conv_dgrad_bn_relu(gy * mask, wt, x, scale, shift, mean, invstd, torch.float32)
    assert rel(g, g_ref) < RTOL and rel(dgam, dgam_ref) < RTOL and rel(dbet, dbet_ref) < RTOL


def test_pixel_limit_is_checked():
    from effdense.kernels.common import check_pixels
    check_pixels(2 ** 31 - 1)
    with pytest.raises(ValueError, match="int32"):
        check_pixels(2 ** 31)


# ------------------------------------------------------------------------------- torch.library custom ops
def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations and AOT-dispatch of every ``effdense::`` op."""
    from effdense.kernels import ops
    torch.manual_seed(5)
    n, cin, cout, h, w = 2, 5, 3, 5, 3
    x = _prefix(n, cin, h, w, True)
    scale, shift, mean, invstd = _bn(cin)
    w3 = torch.randn(cout, cin, 3, 3, device=DEVICE)
    out = torch.empty(n, cout, h, w, device=DEVICE)
    gy = torch.randn(n, cout, h, w, device=DEVICE)
    g = torch.randn(n * h * w, cin, device=DEVICE)
    sums = torch.randn(cin, device=DEVICE), torch.randn(cin, device=DEVICE)
    cases = [
        (ops.bn_relu_conv_fwd_op, (x, scale, shift, w3, out, True, 0.0, 0)),
        (ops.bn_relu_conv_fwd_op, (x, scale, shift, w3, out, False, 0.25, 3)),
        (ops.conv_dgrad_bn_relu_op, (gy, w3, x, scale, shift, mean, invstd, "float32", 0.25, 3)),
        (ops.conv_wgrad_op, (gy, x, scale, shift, 3, "float32", 0.0, 0)),
        (ops.bn_bwd_apply_op, (g, x, _prefix(n, cin, h, w, False), scale, mean, invstd, *sums, True, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    # the op computes what the launcher computes
    ref = torch.empty_like(out)
    st = K.bn_relu_conv_fwd(x, scale, shift, w3, ref, stats=True)
    got = torch.ops.effdense.bn_relu_conv_fwd(x, scale, shift, w3, out, True, 0.0, 0)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(got, st))
