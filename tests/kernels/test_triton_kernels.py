"""Every Triton kernel of :mod:`effdense.kernels` in **every config of its config space** against the PyTorch
reference (:mod:`effdense.backends.bn`, :mod:`effdense.backends.torch_backend`), fp32, forward and backward,
statistics and dropout included.

A GPU runs whichever config the shape heuristics pick; the interpreter would otherwise only ever see the configs
its small test shapes pick. So each kernel runs all of its configs, in order and then shuffled, on the *same*
output and statistics buffers (filled with NaN first), and is checked after every launch: a partial-statistics
row that one config wrote and another did not overwrite, or a read past the rows a launch wrote, shows up as a
wrong (NaN) result. The shapes make the tile counts differ between configs (64/128-pixel tiles, 8x8/16x4 halo
tiles), odd H and W, channel counts that are not multiples of the block sizes, column ranges inside wider rows
buffers. Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py).
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effdense.backends.bn import bn_relu, bn_relu_backward, channel_stats, scale_shift, update_running_stats
from effdense.backends.torch_backend import _conv_backward
from utils import assert_same_nonfinite

K = pytest.importorskip("effdense.kernels")
from effdense.kernels import bn_bwd, common, dgrad, fwd, stats, transition, wgrad  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not K.interpreting() else "cpu"
#: fp32 tolerance (the interpreter's dots are exact fp32; on CUDA conftest.py switches TF32 off)
RTOL = 1e-5
NAN = float("nan")

# label: (N, H, W, cin, cout): layer shapes per kernel size; the tile counts differ between configs
SHAPES = {
    "1x1": (2, 7, 9, 37, 20),      # P = 126: two 64-pixel tiles or one 128-pixel tile
    "3x3": (2, 7, 9, 13, 12),      # 8x8 tiles: 4, 16x4 tiles: 6
}
KS = {"1x1": 1, "3x3": 3}
FWD_SPACE = {"1x1": fwd.CONFIGS_1X1, "3x3": fwd.CONFIGS_3X3}
DGRAD_SPACE = {"1x1": dgrad.CONFIGS_1X1, "3x3": dgrad.CONFIGS_3X3}
WGRAD_SPACE = {"1x1": wgrad.CONFIGS_1X1, "3x3": wgrad.CONFIGS_3X3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def every_config(space: list, seed: int = 0) -> list:
    """The whole space in order, then shuffled: every config after every other one, on the same buffers."""
    shuffled = list(space)
    random.Random(seed).shuffle(shuffled)
    return list(space) + shuffled


def _rows(n: int, h: int, w: int, c: int, fill: float | None = None) -> torch.Tensor:
    """A rows buffer of ``c`` channels (plus its padding), random or filled."""
    buf = K.rows_buffer(n, h, w, c, torch.float32, DEVICE)
    return buf.normal_() if fill is None else buf.fill_(fill)


def _bn(c: int) -> tuple[K.BN, torch.Tensor, torch.Tensor]:
    """A BN with random statistics and affine parameters, and its reference ``(scale, shift)``."""
    mean, var = torch.randn(c, device=DEVICE) * 0.3, torch.rand(c, device=DEVICE) + 0.5
    gamma, beta = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)
    bn = K.BN(mean, var, gamma, beta, 1e-5)
    scale, shift, _, _ = scale_shift(nn.BatchNorm2d(c, eps=1e-5), mean, var, torch.float32, (gamma, beta))
    return bn, scale, shift


def _weight(cout: int, cin: int, ks: int) -> torch.Tensor:
    """A conv weight in a layout other than contiguous (the kernels read it through its strides): channels-last
    for a 3x3 (what ``--channels-last`` training makes of it), a channel slice of a wider tensor for a 1x1."""
    if ks == 3:
        return torch.randn(cout, cin, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    return torch.randn(cout, cin + 3, 1, 1, device=DEVICE)[:, 2:2 + cin]


def _untouched(buf: torch.Tensor, c0: int, c: int) -> bool:
    """Columns outside ``[c0, c0 + c)`` of a NaN-filled buffer are still NaN."""
    keep = torch.ones(buf.shape[3], dtype=torch.bool)
    keep[c0:c0 + c] = False
    return bool(buf[..., keep].isnan().all())


def test_config_spaces_tile_the_test_shapes_differently():
    """The shapes above can catch stale partials: configs of one space write different numbers of rows (where
    the space has more than one tiling: the 1x1 dgrad's configs all use 64-pixel tiles)."""
    for label, (n, h, w, _, _) in SHAPES.items():
        for tiles, space in ((fwd.tiles, FWD_SPACE[label]), (dgrad.tiles, DGRAD_SPACE[label])):
            tilings = {(c.kwargs.get("BLOCK_P"), c.kwargs.get("BH")) for c in space}
            assert len({tiles(KS[label], n, h, w, c) for c in space}) == len(tilings), (label, tilings)
    assert len({(c.kwargs["BLOCK_P"]) for c in dgrad.CONFIGS_1X1}) == 1


@pytest.mark.parametrize("label", list(SHAPES))
def test_fwd_every_config_same_buffers(label):
    """Output (into a column range of a wider buffer) and its Welford partials, merged by the finalize."""
    n, h, w, cin, cout = SHAPES[label]
    ks = KS[label]
    torch.manual_seed(0)
    x = _rows(n, h, w, cin + 5)
    bn, scale, shift = _bn(cin)
    wt = _weight(cout, cin, ks) / (cin * ks * ks) ** 0.5
    c0 = 0 if ks == 1 else 3
    out = _rows(n, h, w, c0 + cout + 4, NAN)
    part = K.partials(64, cout, DEVICE).fill_(NAN)
    ref = F.conv2d(bn_relu(K.nchw(x, 0, cin), scale, shift), wt, padding=ks // 2)
    ref_mean, ref_var = channel_stats(ref)
    for cfg in every_config(FWD_SPACE[label]):
        t = K.bn_relu_conv_fwd(x, cin, bn, wt, out, c0, part, config=cfg)
        assert t == fwd.tiles(ks, n, h, w, cfg)
        assert rel(K.nchw(out, c0, cout), ref) < RTOL, cfg
        mean, var = torch.full((cout,), NAN, device=DEVICE), torch.full((cout,), NAN, device=DEVICE)
        K.bn_finalize(part, t, cout, mean, var)
        assert rel(mean, ref_mean) < RTOL and rel(var, ref_var) < RTOL, cfg
    assert _untouched(out, c0, cout)


@pytest.mark.parametrize("label", list(SHAPES))
def test_backward_every_config_same_buffers(label):
    """dgrad (ReLU backward + partial BN sums), the finalize, and the finish accumulated into a gradient
    buffer; every dgrad config on one ``g`` and one partials buffer, checked through the finish."""
    n, h, w, cin, cout = SHAPES[label]
    ks = KS[label]
    torch.manual_seed(1)
    x = _rows(n, h, w, cin + 3)
    bn, scale, shift = _bn(cin)
    wt = _weight(cout, cin, ks)
    gy_c0 = 0 if ks == 1 else 5          # the 3x3's gradient is a column range of G; the 1x1's is gZ
    gy = _rows(n, h, w, gy_c0 + cout + 2)
    ga, _ = _conv_backward(K.nchw(gy, gy_c0, cout), bn_relu(K.nchw(x, 0, cin), scale, shift), wt, False)
    dx_ref, dg_ref, db_ref = bn_relu_backward(K.nchw(x, 0, cin), ga, scale, shift, bn.mean,
                                              torch.rsqrt(bn.var + bn.eps), True)
    g = _rows(n, h, w, cin, NAN)
    part = K.partials(64, cin, DEVICE).fill_(NAN)
    tot = torch.full((2 * cin,), NAN, device=DEVICE)
    for cfg in every_config(DGRAD_SPACE[label]):
        t = K.conv_dgrad_bn_relu(gy, gy_c0, wt, x, bn, g, part, config=cfg)
        assert t == dgrad.tiles(ks, n, h, w, cfg)
        dgamma, dbeta = torch.full_like(bn.gamma, NAN), torch.full_like(bn.beta, NAN)
        K.bn_bwd_finalize(part, t, cin, tot, dgamma, dbeta)
        assert rel(dgamma, dg_ref) < RTOL and rel(dbeta, db_ref) < RTOL, cfg
        grad = _rows(n, h, w, cin + 4)
        before = grad.clone()
        K.bn_bwd_apply(g, x, cin, bn, tot, True, grad, accumulate=True)
        assert rel(K.nchw(grad, 0, cin) - K.nchw(before, 0, cin), dx_ref) < RTOL, cfg
        assert torch.equal(grad[..., cin:], before[..., cin:])


@pytest.mark.parametrize("label", list(SHAPES))
def test_wgrad_every_config_same_buffers(label):
    """Split-pixel partials of the weight gradient, with the SM-count split (a small fixed SM count in the
    interpreter) and with more splits than pixel tiles (empty splits write zeros), on one NaN-filled workspace;
    then their reduction by the finalize."""
    n, h, w, cin, cout = SHAPES[label]
    ks = KS[label]
    torch.manual_seed(2)
    x = _rows(n, h, w, cin + 3)
    bn, scale, shift = _bn(cin)
    gy_c0 = 0 if ks == 1 else 5
    gy = _rows(n, h, w, gy_c0 + cout + 2)
    _, dw_ref = _conv_backward(K.nchw(gy, gy_c0, cout), bn_relu(K.nchw(x, 0, cin), scale, shift),
                               torch.empty(cout, cin, ks, ks, device=DEVICE), True)
    many = 9       # more splits than any config has pixel tiles here: some splits are empty
    ws = torch.full((many * cout * cin * ks * ks,), NAN, device=DEVICE)
    space = WGRAD_SPACE[label]
    for i, cfg in enumerate(every_config(space)):
        splits = None if i < len(space) else many         # in order with the SM-count split, shuffled with many
        part, s = K.conv_wgrad(gy, gy_c0, x, cin, bn, ks, cout, ws, config=cfg, splits=splits)
        assert part.shape == (s, cout * cin * ks * ks)
        assert rel(part.sum(0).view_as(dw_ref), dw_ref) < RTOL, (cfg, splits)
    dw = torch.full(dw_ref.shape, NAN, device=DEVICE)       # contiguous, whatever the weight's layout
    tot = torch.empty(2 * cin, device=DEVICE)
    K.bn_bwd_finalize(K.partials(1, cin, DEVICE).zero_(), 1, cin, tot, None, None, part, dw)
    assert rel(dw, dw_ref) < RTOL


def test_bn_bwd_finalize_and_apply_every_config():
    """The finalize's two reductions (BN sums over tiles, weight-gradient splits) and the finish, training
    (batch statistics) and eval (running statistics), in place over ``g``."""
    torch.manual_seed(3)
    n, h, w, c, rows, splits, m = 2, 5, 3, 21, 70, 5, 600
    part = K.partials(80, c, DEVICE).normal_()
    dwp = torch.randn(splits, m, device=DEVICE)
    for cfg in every_config(bn_bwd.FINALIZE_CONFIGS):
        tot = torch.full((2 * c,), NAN, device=DEVICE)
        dgamma, dbeta, dw = (torch.full((k,), NAN, device=DEVICE) for k in (c, c, m))
        K.bn_bwd_finalize(part, rows, c, tot, dgamma, dbeta, dwp, dw, config=cfg)
        sums = part[:2, :rows, :c].sum(1)
        assert rel(tot[:c], sums[0]) < RTOL and rel(tot[c:], sums[1]) < RTOL, cfg
        assert torch.equal(dbeta, tot[:c]) and torch.equal(dgamma, tot[c:]), cfg
        assert rel(dw, dwp.sum(0)) < RTOL, cfg
    x = _rows(n, h, w, c)
    bn, scale, _ = _bn(c)
    col = lambda v: v.view(1, -1, 1, 1)     # noqa: E731
    xhat = (K.nchw(x, 0, c) - col(bn.mean)) * col(torch.rsqrt(bn.var + bn.eps))
    g_ref = torch.randn(n, c, h, w, device=DEVICE)
    dbeta, dgamma = g_ref.sum((0, 2, 3)), (g_ref * xhat).sum((0, 2, 3))
    tot = torch.cat([dbeta, dgamma])
    refs = {True: col(scale) * (g_ref - col(dbeta / (n * h * w)) - xhat * col(dgamma / (n * h * w))),   # batch
            False: col(scale) * g_ref}                                                              # running
    for cfg in every_config(bn_bwd.APPLY_CONFIGS):
        for batch_stats, ref in refs.items():
            g = _rows(n, h, w, c, NAN)
            K.nchw(g, 0, c).copy_(g_ref)
            K.bn_bwd_apply(g, x, c, bn, tot, batch_stats, config=cfg)     # in place
            assert rel(K.nchw(g, 0, c), ref) < RTOL, (cfg, batch_stats)


def test_block_entry_and_finalize_every_config():
    """The block entry from NCHW and strided inputs (copy into columns [0, C) + partials), and the finalize with
    the running-statistics update, against ``nn.BatchNorm2d``'s update (momentum and cumulative average)."""
    torch.manual_seed(4)
    n, h, w, c = 2, 9, 8, 19
    inputs = {"nchw": torch.randn(n, c, h, w, device=DEVICE),
              "strided": torch.randn(n, c + 3, h, 2 * w, device=DEVICE)[:, 2:2 + c, :, ::2]}
    part = K.partials(64, c, DEVICE).fill_(NAN)
    for name, x in inputs.items():
        ref_mean, ref_var = channel_stats(x)
        for cfg in every_config(stats.ENTRY_CONFIGS):
            f = _rows(n, h, w, c + 2, NAN)
            t = K.block_entry(x, f, part, config=cfg)
            assert torch.equal(K.nchw(f, 0, c), x) and _untouched(f, 0, c), (name, cfg)
            mean, var = torch.full((c,), NAN, device=DEVICE), torch.full((c,), NAN, device=DEVICE)
            K.bn_finalize(part, t, c, mean, var)
            assert rel(mean, ref_mean) < RTOL and rel(var, ref_var) < RTOL, (name, cfg)
    # the finalize in two parts (channels [0, 7) first, [7, 19) with the update over all 19), every config
    x = inputs["nchw"]
    for momentum in (0.1, None):
        for cfg in every_config(stats.FINALIZE_CONFIGS):
            norm, ref = nn.BatchNorm2d(c, momentum=momentum).to(DEVICE), nn.BatchNorm2d(c, momentum=momentum).to(DEVICE)
            mean, var = torch.full((c,), NAN, device=DEVICE), torch.full((c,), NAN, device=DEVICE)
            for step in range(2):
                xs = x + step
                K.bn_finalize(part, K.block_entry(xs[:, :7], None, part), 7, mean, var, 0, config=cfg)
                K.bn_finalize(part, K.block_entry(xs[:, 7:], None, part), c - 7, mean, var, 7, K.running_args(norm),
                              c, n * h * w, config=cfg)
                update_running_stats(ref, *channel_stats(xs), n * h * w)
            assert int(norm.num_batches_tracked) == int(ref.num_batches_tracked) == 2
            assert rel(norm.running_mean, ref.running_mean) < RTOL and rel(norm.running_var, ref.running_var) < RTOL


def _ref_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``y`` in float64 as ``F.batch_norm`` computes them on CPU (a sum,
    then the squared deviations): the mean of a channel with +Inf is +Inf, not NaN (``torch.var_mean``'s Welford
    update would give NaN)."""
    y = y.double()
    mean = y.mean((0, 2, 3))
    return mean, (y - mean.view(1, -1, 1, 1)).square().mean((0, 2, 3))


@pytest.mark.parametrize("m, s", [(1e4, 1.0), (-1e4, 1e4), (1.0, 1e4), (3e3, 0.25)])
def test_statistics_are_accurate_for_large_mean_to_std_ratios(m, s):
    """Welford tile partials (corrected two-pass) merged with Chan's formula as offsets from a tile mean: the
    mean rounded about once, the variance to fp32 precision, for mean/std ratios up to 1e4; several merge chunks
    (72 tiles: 2 or 3 chunks of ``BLOCK_T`` rows). Errors against float64 on the same fp32 values no worse than
    ``F.batch_norm``'s fp32 statistics (the ``naive`` backend's) by more than 2x plus one fp32 rounding of the
    values' size; a raw fp32 sum of squares is off by ~100% at the large ratios."""
    torch.manual_seed(5)
    x = (torch.randn(2, 5, 48, 48, device=DEVICE) * s + m).float()
    rm, rv = _ref_stats(x)
    run_mean, run_var = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    F.batch_norm(x, run_mean, run_var, training=True, momentum=1.0)     # naive's statistics, in fp32
    n = x.numel() // 5
    naive = ((run_mean.double() - rm).abs().max().item(), rel(run_var.double() * (n - 1) / n, rv))
    ulp = torch.finfo(torch.float32).eps * (abs(m) + s)      # one fp32 rounding of the values' size
    part = K.partials(80, 5, DEVICE)
    t = K.block_entry(x, None, part)
    assert t == 72
    for cfg in stats.FINALIZE_CONFIGS:
        mean, var = torch.empty(5, device=DEVICE), torch.empty(5, device=DEVICE)
        K.bn_finalize(part, t, 5, mean, var, config=cfg)
        assert (mean.double() - rm).abs().max().item() <= 2 * naive[0] + ulp, (cfg, naive)
        assert rel(var, rv) <= 2 * naive[1] + 1e-6, (cfg, naive)
    if m / s >= 1e3:
        raw = (x.double() ** 2).float().mean((0, 2, 3)) - x.float().mean((0, 2, 3)) ** 2
        assert rel(raw, rv) > 1e-2


def test_constant_channels_have_exact_statistics_every_config():
    """A channel whose pixels are all one value: mean exactly that value and variance exactly 0 from the entry's
    and the finalize's every config (the corrected two-pass removes the rounding of the tile sums), so BN's
    ``x - mean`` is exactly 0 as in float64, not an ulp times ``1/sqrt(eps)``."""
    n, h, w = 2, 9, 15          # 270 pixels: partial 64-pixel tiles, tile counts that do not divide
    values = torch.tensor([1.0, 0.1, -3.7e3, 1e4 + 0.5, 1 / 3, 0.0, 6.1e-5], device=DEVICE)
    x = values.view(1, -1, 1, 1).expand(n, -1, h, w).contiguous()
    part = K.partials(64, values.numel(), DEVICE)
    for cfg in every_config(stats.ENTRY_CONFIGS):
        t = K.block_entry(x, None, part, config=cfg)
        for fcfg in stats.FINALIZE_CONFIGS:
            mean, var = torch.full_like(values, NAN), torch.full_like(values, NAN)
            K.bn_finalize(part, t, values.numel(), mean, var, config=fcfg)
            assert torch.equal(mean, values) and torch.equal(var, torch.zeros_like(var)), (cfg, fcfg, mean, var)


# ---------------------------------------------------------------------------------------------- NaN and Inf
INF = float("inf")


def _poison(buf: torch.Tensor, c: int, channel: int = 0) -> torch.Tensor:
    """NaN, +Inf and -Inf written into channels ``[channel, channel + 3)`` (mod ``c``) of the rows buffer ``buf``:
    NaN at an image's last column (whose right neighbours are out-of-image rows of a partial halo tile), +Inf
    inside, -Inf at a corner."""
    n, h, w, _ = buf.shape
    buf[1, h // 2, w - 1, channel % c] = NAN
    buf[0, 2, 3, (channel + 1) % c] = INF
    buf[n - 1, h - 1, 0, (channel + 2) % c] = -INF
    return buf


def _ref_layer(x: torch.Tensor, cin: int, bn: K.BN, wt: torch.Tensor, gy: torch.Tensor, batch_stats: bool) -> dict:
    """The layer's forward and BN-ReLU-Conv backward in float64 PyTorch ops (``bn`` as given: running statistics
    or batch ones, for ``batch_stats``' finish)."""
    d = lambda t: t.double()      # noqa: E731
    xs = d(x)
    scale, shift, mu, invstd = scale_shift(nn.BatchNorm2d(cin, eps=bn.eps), d(bn.mean), d(bn.var), torch.float64,
                                           (d(bn.gamma), d(bn.beta)))
    a = bn_relu(xs, scale, shift)
    y = F.conv2d(a, d(wt), padding=wt.shape[-1] // 2)
    ga, dw = _conv_backward(d(gy), a, d(wt), True)
    pre = xs * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    dx, dgamma, dbeta = bn_relu_backward(xs, ga, scale, shift, mu, invstd, batch_stats)
    return dict(y=y, stats=_ref_stats(y), g=ga.masked_fill(pre <= 0, 0), dx=dx, dgamma=dgamma, dbeta=dbeta, dw=dw)


@pytest.mark.parametrize("batch_stats", [False, True], ids=["running", "batch"])
@pytest.mark.parametrize("label", list(SHAPES))
def test_nan_and_inf_propagate_as_in_pytorch_every_config(label, batch_stats):
    """NaN, +Inf and -Inf in the layer input (and a NaN in the incoming gradient) reach exactly the outputs, the
    statistics, ``g``, the BN sums, the input gradient and the weight gradient they reach in float64 PyTorch, in
    every config of the forward, dgrad and wgrad (the ReLUs are NaN-propagating; rows of out-of-image pixels are
    kept out of every sum). With running statistics the masks are local; with batch statistics of a poisoned
    input (NaN) every channel's normalization is NaN, as in PyTorch."""
    n, h, w, cin, cout = SHAPES[label]
    ks = KS[label]
    torch.manual_seed(11)
    x = _poison(_rows(n, h, w, cin), cin)
    bn, _, _ = _bn(cin)
    if batch_stats:
        bn.mean[1] = NAN
    wt = _weight(cout, cin, ks)
    gy = _rows(n, h, w, cout)
    gy[0, 1, 1, 2] = NAN
    ref = _ref_layer(K.nchw(x, 0, cin), cin, bn, wt, K.nchw(gy, 0, cout), batch_stats)
    out, g = _rows(n, h, w, cout, NAN), _rows(n, h, w, cin, NAN)
    part, tot = K.partials(64, max(cin, cout), DEVICE), torch.empty(2 * cin, device=DEVICE)
    for cfg in FWD_SPACE[label]:
        t = K.bn_relu_conv_fwd(x, cin, bn, wt, out, 0, part, config=cfg)
        assert_same_nonfinite(K.nchw(out, 0, cout), ref["y"], f"output {cfg}")
        mean, var = torch.empty(cout, device=DEVICE), torch.empty(cout, device=DEVICE)
        K.bn_finalize(part, t, cout, mean, var)
        assert_same_nonfinite(mean, ref["stats"][0], f"mean {cfg}")
        assert_same_nonfinite(var, ref["stats"][1], f"var {cfg}")
    for cfg in DGRAD_SPACE[label]:
        t = K.conv_dgrad_bn_relu(gy, 0, wt, x, bn, g, part, config=cfg)
        assert_same_nonfinite(K.nchw(g, 0, cin), ref["g"], f"g {cfg}")
        dgamma, dbeta = torch.empty_like(bn.gamma), torch.empty_like(bn.beta)
        K.bn_bwd_finalize(part, t, cin, tot, dgamma, dbeta)
        assert_same_nonfinite(dgamma, ref["dgamma"], f"dgamma {cfg}")
        assert_same_nonfinite(dbeta, ref["dbeta"], f"dbeta {cfg}")
        dx = _rows(n, h, w, cin, NAN)
        K.bn_bwd_apply(g, x, cin, bn, tot, batch_stats, dx)
        assert_same_nonfinite(K.nchw(dx, 0, cin), ref["dx"], f"dx {cfg}")
    ws = torch.empty(9 * cout * cin * ks * ks, device=DEVICE)
    for cfg in WGRAD_SPACE[label]:
        dw, _ = K.conv_wgrad(gy, 0, x, cin, bn, ks, cout, ws, config=cfg)
        assert_same_nonfinite(dw.sum(0).view_as(ref["dw"]), ref["dw"], f"dw {cfg}")


def test_nan_and_inf_statistics_of_the_block_entry_every_config():
    """The entry's partials and the finalize: a channel with +Inf has mean +Inf and variance NaN, with +Inf and
    -Inf or a NaN both NaN, as ``F.batch_norm`` computes them; the running statistics follow (``lerp``)."""
    n, h, w, c = 2, 9, 8, 7
    x = torch.randn(n, c, h, w, device=DEVICE)
    x[0, 1, 2, 3] = INF
    x[1, 2, 0, 0] = INF
    x[1, 2, 5, 5] = -INF
    x[0, 3, 8, 7] = NAN
    x[1, 4, 3, 3] = -INF
    ref = _ref_stats(x)
    part = K.partials(64, c, DEVICE)
    for cfg in every_config(stats.ENTRY_CONFIGS):
        t = K.block_entry(x, None, part, config=cfg)
        for fcfg in stats.FINALIZE_CONFIGS:
            norm = nn.BatchNorm2d(c).to(DEVICE)
            mean, var = torch.empty(c, device=DEVICE), torch.empty(c, device=DEVICE)
            K.bn_finalize(part, t, c, mean, var, 0, K.running_args(norm), c, n * h * w, config=fcfg)
            assert_same_nonfinite(mean, ref[0], f"mean {cfg} {fcfg}")
            assert_same_nonfinite(var, ref[1], f"var {cfg} {fcfg}")
            expect = nn.BatchNorm2d(c).to(DEVICE)
            F.batch_norm(x, expect.running_mean, expect.running_var, training=True, momentum=0.1)
            assert_same_nonfinite(norm.running_mean, expect.running_mean, f"running_mean {cfg} {fcfg}")
            assert_same_nonfinite(norm.running_var, expect.running_var, f"running_var {cfg} {fcfg}")


DROP_P = 0.3


def test_dropout_mask_statistics_and_regeneration():
    """The 3x3 forward's dropout (seed read from a device tensor): keep fraction, scale, statistics of the
    dropped output, determinism by seed; dgrad and wgrad given the seed equal them given gy times the mask."""
    torch.manual_seed(6)
    n, h, w, cin, cout = 2, 12, 11, 5, 14
    x = _rows(n, h, w, cin)
    bn, _, _ = _bn(cin)
    wt = torch.randn(cout, cin, 3, 3, device=DEVICE)
    seeds = torch.tensor([11, 123, 7], device=DEVICE)
    plain, dropped, again = (_rows(n, h, w, cout, NAN) for _ in range(3))
    part = K.partials(64, cout, DEVICE)
    K.bn_relu_conv_fwd(x, cin, bn, wt, plain)
    t = K.bn_relu_conv_fwd(x, cin, bn, wt, dropped, 0, part, DROP_P, seeds, 1)
    y, y0 = K.nchw(dropped, 0, cout), K.nchw(plain, 0, cout)
    keep = y != 0
    sigma = (DROP_P * (1 - DROP_P) / keep.numel()) ** 0.5
    assert abs(keep.double().mean().item() - (1 - DROP_P)) < 5 * sigma
    torch.testing.assert_close(y[keep], y0[keep] / (1 - DROP_P), rtol=1e-5, atol=1e-6)
    mean, var = torch.empty(cout, device=DEVICE), torch.empty(cout, device=DEVICE)
    K.bn_finalize(part, t, cout, mean, var)
    rm, rv = channel_stats(y)
    assert rel(mean, rm) < RTOL and rel(var, rv) < RTOL
    K.bn_relu_conv_fwd(x, cin, bn, wt, again, 0, None, DROP_P, seeds, 1)
    assert torch.equal(K.nchw(again, 0, cout), y)
    K.bn_relu_conv_fwd(x, cin, bn, wt, again, 0, None, DROP_P, seeds, 2)
    assert not torch.equal(K.nchw(again, 0, cout) != 0, keep)
    # backward: the mask regenerated from the seed
    mask = keep.float() / (1 - DROP_P)
    gy = _rows(n, h, w, cout)
    masked = K.to_rows(K.nchw(gy, 0, cout) * mask)
    dw = K.conv_wgrad(gy, 0, x, cin, bn, 3, cout, drop_p=DROP_P, seeds=seeds, seed_idx=1)[0].sum(0)
    dw_ref = K.conv_wgrad(masked, 0, x, cin, bn, 3, cout)[0].sum(0)
    assert rel(dw, dw_ref) < RTOL
    outs = []
    for args in ((gy, DROP_P, seeds, 1), (masked, 0.0, None, 0)):
        g, part = _rows(n, h, w, cin), K.partials(64, cin, DEVICE)
        t = K.conv_dgrad_bn_relu(args[0], 0, wt, x, bn, g, part, *args[1:])
        outs.append((K.nchw(g, 0, cin), part[:2, :t, :cin].sum(1)))
    assert rel(outs[0][0], outs[1][0]) < RTOL and rel(outs[0][1], outs[1][1]) < RTOL


def test_heuristics_pick_from_their_spaces():
    """Over DenseNet layer shapes (bf16, tf32 and exact fp32) every heuristic answers a member of its space (the
    transition's too)."""
    for dtype, tf32 in ((torch.bfloat16, True), (torch.float32, True), (torch.float32, False)):
        with common.dry_run(), _tf32(tf32):
            for n, hw in ((2, 5), (64, 32), (64, 8), (64, 56)):
                for cin, cout in ((24, 48), (216, 48), (48, 12), (516, 48), (48, 40), (13, 7)):
                    for ks in (1, 3):
                        assert fwd.heuristic(ks, n, hw, hw, cin, cout, dtype) in FWD_SPACE[f"{ks}x{ks}"]
                        assert dgrad.heuristic(ks, n, hw, hw, cout, cin, dtype) in DGRAD_SPACE[f"{ks}x{ks}"]
                        assert wgrad.heuristic(ks, hw, cout, cin, dtype) in WGRAD_SPACE[f"{ks}x{ks}"]
                    assert transition.fwd_heuristic(cin, cout) in transition.FWD_CONFIGS
                    assert transition.dgrad_heuristic(cout, cin, dtype) in transition.DGRAD_CONFIGS
                    assert transition.wgrad_heuristic(cout, cin) in transition.WGRAD_CONFIGS


class _tf32:
    """``torch.backends.cudnn.allow_tf32 = on`` within the context."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32 = self.saved


def test_fp32_dots_follow_cudnns_tf32_flag_and_the_record_says_so():
    """These kernels are convolutions: fp32 dots run in TF32 where cuDNN's flag allows it (as the convolutions
    of ``naive`` do), whatever cuBLAS's flag; the interpreter computes in fp32. ``precision_record`` tells."""
    for cudnn_flag in (True, False):
        with _tf32(cudnn_flag):
            torch.backends.cuda.matmul.allow_tf32 = not cudnn_flag
            on_gpu = K.dot_precision(torch.float32) if not K.interpreting() else None
            with common.dry_run():          # what a GPU would run
                assert K.dot_precision(torch.float32) == ("tf32" if cudnn_flag else "ieee")
                assert K.dot_precision(torch.bfloat16) == "ieee"
            record = K.precision_record()
            assert record["cudnn_allow_tf32"] is cudnn_flag and record["cuda_matmul_allow_tf32"] is not cudnn_flag
            assert record["fp32_dot"] == ("ieee" if K.interpreting() else on_gpu)
    torch.backends.cuda.matmul.allow_tf32 = False


def test_rows_layout_helpers():
    """Rows buffers: row stride padded to 16; ``as_rows`` finds the buffer behind a channel prefix (the block
    output), ``to_rows`` copies anything else into one."""
    buf = K.rows_buffer(2, 3, 5, 21, torch.float32, DEVICE)
    assert buf.shape == (2, 3, 5, 32) and K.padded(32) == 32 and K.padded(33) == 48
    view = K.nchw(buf, 0, 21)
    assert view.shape == (2, 21, 3, 5) and K.as_rows(view).data_ptr() == buf.data_ptr()
    assert K.as_rows(K.nchw(buf, 3, 10)) is None or K.as_rows(K.nchw(buf, 3, 10)).data_ptr() != buf.data_ptr()
    x = torch.randn(2, 21, 3, 5, device=DEVICE)
    assert K.as_rows(x) is None
    assert torch.equal(K.nchw(K.to_rows(x), 0, 21), x)
    with pytest.raises(ValueError, match="int32"):
        common.check_pixels(2 ** 31)
    common.check_pixels(2 ** 31 - 1)


# ------------------------------------------------------------------------------- torch.library custom ops
def test_custom_ops_opcheck():
    """Schema (mutated arguments declared), fake implementations and dispatch of every block ``effdense::`` op;
    the launcher-compatible ``Dispatch`` computes what the launchers compute."""
    from effdense.kernels.ops import Dispatch
    torch.manual_seed(7)
    n, h, w, cin, cout = 2, 5, 3, 5, 3
    x = _rows(n, h, w, cin)
    bn, _, _ = _bn(cin)
    args = (bn.mean, bn.var, bn.gamma, bn.beta, bn.eps)
    w3 = torch.randn(cout, cin, 3, 3, device=DEVICE)
    w1 = torch.randn(cout, cin, 1, 1, device=DEVICE)
    gy = _rows(n, h, w, cout + 4)
    seeds = torch.tensor([3], device=DEVICE)
    part = K.partials(8, cin, DEVICE)
    nb = nn.BatchNorm2d(cin).to(DEVICE)
    e = torch.ops.effdense
    cases = [
        (e.block_entry.default, (torch.randn(n, cin, h, w, device=DEVICE), _rows(n, h, w, cin), part)),
        (e.bn_finalize.default, (part, 1, cin, torch.empty(16, device=DEVICE), torch.empty(16, device=DEVICE), 0,
                                 nb.running_mean, nb.running_var, nb.num_batches_tracked, 0.1, cin, n * h * w)),
        (e.bn_relu_conv_fwd.default, (x, cin, *args, w3, _rows(n, h, w, cout + 2), 2, part, 0.25, seeds, 0)),
        (e.bn_relu_conv_fwd.default, (x, cin, *args, w1, _rows(n, h, w, cout), 0, None, 0.0, None, 0)),
        (e.conv_dgrad_bn_relu.default, (gy, 4, w3, x, *args, _rows(n, h, w, cin), part, 0.25, seeds, 0)),
        (e.conv_wgrad.default, (gy, 4, x, cin, *args, 3, cout, torch.empty(4 * cout * cin * 9, device=DEVICE),
                                0.25, seeds, 0, 4)),
        (e.bn_bwd_finalize.default, (part, 1, cin, torch.empty(2 * cin, device=DEVICE), torch.empty(cin, device=DEVICE),
                                     torch.empty(cin, device=DEVICE), torch.randn(2, 7, device=DEVICE),
                                     torch.empty(7, device=DEVICE))),
        (e.bn_bwd_apply.default, (_rows(n, h, w, cin), x, cin, *args, torch.randn(2 * cin, device=DEVICE), True,
                                  _rows(n, h, w, cin), True)),
    ]
    for op, a in cases:
        torch.library.opcheck(op, a)
    out_l, out_d = _rows(n, h, w, cout + 2, NAN), _rows(n, h, w, cout + 2, NAN)
    pl, pd = K.partials(8, cout, DEVICE).fill_(NAN), K.partials(8, cout, DEVICE).fill_(NAN)
    t_l = K.bn_relu_conv_fwd(x, cin, bn, w3, out_l, 2, pl, 0.25, seeds, 0)
    t_d = Dispatch.bn_relu_conv_fwd(x, cin, bn, w3, out_d, 2, pd, 0.25, seeds, 0)
    assert t_l == t_d and torch.equal(out_l.nan_to_num(), out_d.nan_to_num())
    assert torch.equal(pl[:, :t_l, :cout].nan_to_num(), pd[:, :t_d, :cout].nan_to_num())
