"""Helpers shared by the Triton kernels: layout, configs and launches, precision, and ``@triton.jit`` pieces.

Conventions of every kernel in this package:

* **Rows.** Feature maps are *rows buffers*: ``[N, H, W, ld]`` contiguous tensors (channels last) whose row
  stride ``ld`` is a multiple of 16 elements (:func:`rows_buffer`); a layer's channels are a column range
  ``[c0, c0 + c)`` of it. Kernels take the buffer's own (aligned) pointer, the column offset and ``ld // 16``
  (``*_ld16`` arguments): multiplying by 16 in the kernel tells the compiler that every row is 16-element
  aligned, so loads vectorize, without a JIT specialization per value. Pixel ``p = (n*H + h)*W + w`` starts
  at element ``p * ld``. Only the block entry (:mod:`.stats`) reads an arbitrary strided input.
* **Bounded compile set.** Every argument that is not a pointer or a ``tl.constexpr`` (sizes, offsets,
  strides, floats) is ``do_not_specialize`` (:func:`jit`), so a kernel compiles once per (pointer dtypes,
  constexprs) whatever the shapes; tile sizes come from shape heuristics (``heuristic`` in each module, Liger
  Kernel's ``calculate_settings`` idea), one config per shape bucket, no autotuning at run time.
* **Configs.** Each launcher takes ``config=None`` (its heuristic) or any member of its module's ``CONFIGS``,
  the whole space its heuristic can return; the tests run every one of them.
* **Statistics partials** are written for every tile of the config that ran, and the finalize kernels read
  exactly those rows (the launchers return how many): no sequence of configs can leave stale rows behind.
* Pixel indices are int32 (checked: ``P < 2^31``), element offsets int64; accumulation and statistics fp32.
* ``tl.dot`` on fp32 runs in tf32 where ``torch.backends.cudnn.allow_tf32`` allows it (these are
  convolutions, and the cuDNN convolutions of ``naive`` follow that flag), else in exact fp32 (``"ieee"``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: whether ``@triton.jit`` made interpreted kernels: Triton reads ``TRITON_INTERPRET`` when a kernel is defined,
#: so what counts is its value when this package was imported, not now
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: row strides of rows buffers are multiples of this many elements (16-byte-aligned rows for every dtype)
ROW_ALIGN = 16
#: SM count assumed where there is no GPU (interpreter, dry runs): small, so tests see several split programs
DEFAULT_SMS = 4
#: the largest finite float32: ``|v| <= FLT_MAX`` is false exactly for infinities and NaN (:func:`finite`)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


def interpreting() -> bool:
    """True when this package's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return INTERPRET


def _squeeze_interpreter_scalars() -> None:
    """Triton < 3.7's interpreter turns a scalar argument (a 1-element array) into a loop bound with ``int(array)``,
    which NumPy >= 2.4 refuses: every ``range(0, M, BLOCK)`` over a size argument fails. Triton 3.7+ squeezes the
    array first; this makes the older interpreter's ``tl.tensor.__index__`` do the same (only the interpreter's
    patch of ``tl.tensor``, restored with it after each launch)."""
    from triton.runtime import interpreter
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes", False):
        return

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes = True
    interpreter._patch_lang_tensor = patched


if INTERPRET and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
    _squeeze_interpreter_scalars()


# ------------------------------------------------------------------------------------------------ precision
_DRY: dict = {"on": False, "record": None}


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` on ``dtype`` operands: ``"tf32"`` for fp32 where cuDNN's TF32 flag allows
    it (a GPU run; the interpreter always computes in fp32), else ``"ieee"``."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and (not interpreting() or _DRY["on"]):
        return "tf32"
    return "ieee"


def precision_record() -> dict:
    """What precision the fp32 dots of these kernels run in, for benchmark results: the flags they follow and
    the resulting ``tl.dot`` precision."""
    return {"triton": triton.__version__, "interpreter": interpreting(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "fp32_dot": dot_precision(torch.float32), "bf16_dot": "bf16 (fp32 accumulation)"}


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached per device); :data:`DEFAULT_SMS` without a GPU."""
    if device.type != "cuda" or interpreting() or _DRY["on"]:
        return DEFAULT_SMS
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def pow2(x: int, lo: int = 16, hi: int = 64) -> int:
    """``next_power_of_2(x)`` clamped to ``[lo, hi]``: a block size covering ``x`` in one tile where it can."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


# ------------------------------------------------------------------------------------------------ layout
def padded(c: int) -> int:
    """Channels rounded up to :data:`ROW_ALIGN`: the row stride of a rows buffer of ``c`` channels."""
    return triton.cdiv(max(int(c), 1), ROW_ALIGN) * ROW_ALIGN


def rows_buffer(n: int, h: int, w: int, c: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized rows buffer ``[N, H, W, padded(c)]`` (see the module docstring)."""
    return torch.empty((n, h, w, padded(c)), dtype=dtype, device=device)


def nchw(buf: torch.Tensor, c0: int = 0, c: int | None = None) -> torch.Tensor:
    """Channels ``[c0, c0 + c)`` of a rows buffer as an ``[N, c, H, W]`` view (what modules see)."""
    c = buf.shape[3] - c0 if c is None else c
    return buf.permute(0, 3, 1, 2)[:, c0:c0 + c]


def as_rows(x: torch.Tensor) -> torch.Tensor | None:
    """The rows buffer ``[N, H, W, ld]`` that ``x`` ``[N, C, H, W]`` is the channel prefix of (a view, no copy),
    or None when ``x`` is laid out otherwise (then :func:`to_rows` copies)."""
    if x.dim() != 4:
        return None
    n, c, h, w = x.shape
    ld = x.stride(3)
    if (x.stride(1) != 1 and c > 1) or ld % ROW_ALIGN or ld < c or x.stride(2) != w * ld \
            or (n > 1 and x.stride(0) != h * w * ld):
        return None
    # a prefix starts a row (a column slice further in does not); not checkable while tracing (storage_offset),
    # where the tensors are the block's and transition's own prefixes
    if not torch.compiler.is_compiling() and x.storage_offset() % ld:
        return None
    return x.as_strided((n, h, w, ld), (h * w * ld, w * ld, ld, 1))


def to_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` as a rows buffer: the view :func:`as_rows` finds, or a padded channels-last copy (one launch)."""
    dtype = x.dtype if dtype is None else dtype
    buf = as_rows(x) if x.dtype == dtype else None
    if buf is None:
        n, c, h, w = x.shape
        buf = rows_buffer(n, h, w, c, dtype, x.device)
        nchw(buf, 0, c).copy_(x)
    return buf


def ld16(buf: torch.Tensor) -> int:
    """A rows buffer's row stride in units of :data:`ROW_ALIGN` (the ``*_ld16`` kernel arguments)."""
    ld = buf.stride(-2) if buf.dim() == 4 else buf.stride(0)
    assert ld % ROW_ALIGN == 0 and buf.stride(-1) == 1, (buf.shape, buf.stride())
    return ld // ROW_ALIGN


def check_pixels(npix: int) -> None:
    """The kernels index pixels in int32 (element offsets are int64)."""
    if npix >= 2 ** 31:
        raise ValueError(f"N*H*W = {npix} pixels: the Triton kernels index pixels with int32 (< 2^31)")


# -------------------------------------------------------------------------------------- BN arguments
@dataclass
class BN:
    """A BatchNorm as the kernels apply it: ``relu(gamma * (x - mean) * rsqrt(var + eps) + beta)``, ``mean``/``var``
    the batch statistics or the running ones (fp32 vectors), ``gamma``/``beta`` None without affine."""

    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    eps: float

    def args(self) -> tuple:
        """``mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps`` (a stand-in pointer where there is no affine)."""
        return (self.mean, self.var, self.mean if self.gamma is None else self.gamma,
                self.mean if self.beta is None else self.beta, float(self.eps))

    @property
    def affine(self) -> bool:
        return self.gamma is not None


# -------------------------------------------------------------------------------------- configs and launches
def configs(keys: tuple[str, ...], rows) -> list[triton.Config]:
    """One ``triton.Config`` per row ``(*block sizes in the order of keys, num_warps, num_stages)``."""
    return [triton.Config(dict(zip(keys, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


def pick(space: list[triton.Config], num_warps: int | None = None, num_stages: int | None = None,
         **blocks) -> triton.Config:
    """The member of ``space`` with these block sizes (and warps and stages, if given): a heuristic's answer
    (KeyError if it is not in the space)."""
    for cfg in space:
        if all(cfg.kwargs.get(k) == v for k, v in blocks.items()) and num_warps in (None, cfg.num_warps) \
                and num_stages in (None, cfg.num_stages):
            return cfg
    raise KeyError(f"no config {blocks} (warps {num_warps}, stages {num_stages}) in the space")


def fma_dots(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` on ``dtype`` runs as FMA (exact fp32, no TF32): such dots hold a K slice of both
    operands per thread, so the heuristics give them smaller K tiles, more warps or one stage (software
    pipelining prefetches into registers and buys nothing for FMA; it spills)."""
    return dtype == torch.float32 and dot_precision(dtype) == "ieee"


def jit(fn):
    """``triton.jit`` with every argument that is neither a pointer (``*_ptr``) nor a ``tl.constexpr``
    ``do_not_specialize``: sizes and offsets never multiply the compile set (module docstring)."""
    params = inspect.signature(fn).parameters
    names = [n for n, p in params.items() if not n.endswith("_ptr") and p.annotation is not tl.constexpr
             and "constexpr" not in str(p.annotation)]
    return triton.jit(do_not_specialize=names)(fn)


_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.uint8: "u8", torch.float64: "fp64", torch.bool: "i1"}


@dataclass(frozen=True)
class Spec:
    """One specialization as the JIT keys it: kernel, argument types (pointers with their 16-byte alignment),
    constexprs (the config's block sizes and the kernel's flags), warps and stages."""

    kernel: str
    signature: tuple      # ((name, type, aligned), ...) of the non-constexpr arguments
    constexprs: tuple     # ((name, value), ...)
    num_warps: int
    num_stages: int


def _arg_type(v) -> tuple[str, bool]:
    if isinstance(v, torch.Tensor):
        addr = v.storage_offset() * v.element_size() if v.device.type == "meta" else v.data_ptr()
        return "*" + _TYPES[v.dtype], addr % 16 == 0
    if isinstance(v, bool):
        raise TypeError("pass runtime flags as ints or constexprs, not bool")
    if isinstance(v, int):
        return ("i32" if -2 ** 31 <= v < 2 ** 31 else "i64"), False
    if isinstance(v, float):
        return "fp32", False
    raise TypeError(f"unsupported kernel argument {type(v).__name__}")


def _kernel_fn(kernel):
    return getattr(kernel, "fn", kernel)


def spec_of(kernel, args: tuple, meta: dict, config: triton.Config) -> Spec:
    names = [n for n in inspect.signature(_kernel_fn(kernel)).parameters]
    runtime = [n for n in names if n not in meta]
    assert len(runtime) == len(args), (_kernel_fn(kernel).__name__, runtime, len(args))
    sig = tuple((n, *_arg_type(v)) for n, v in zip(runtime, args))
    const = tuple((n, meta[n].value if hasattr(meta[n], "value") else meta[n]) for n in names if n in meta)
    return Spec(_kernel_fn(kernel).__name__, sig, const, config.num_warps, config.num_stages)


@contextlib.contextmanager
def dry_run(record: list | None = None):
    """Within this context launches are recorded (as :class:`Spec`) into ``record`` and not executed: what
    :mod:`effdense.tools.aot` traces a training step with, on any machine (fp32 dots then follow the GPU's TF32
    rule)."""
    saved = dict(_DRY)
    _DRY.update(on=True, record=record)
    try:
        yield record
    finally:
        _DRY.update(saved)


def dry_running() -> bool:
    return _DRY["on"]


def launch(kernel, grid: tuple, args: tuple, config: triton.Config, **flags) -> None:
    """``kernel[grid](*args, **config.kwargs, **flags)`` with the config's warps and stages (or, in a
    :func:`dry_run`, only recorded)."""
    meta = {**config.kwargs, **flags}
    if _DRY["on"]:
        if _DRY["record"] is not None:
            _DRY["record"].append(spec_of(kernel, args, meta, config))
        return
    kernel[grid](*args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


# ------------------------------------------------------------------------------------- @triton.jit helpers
@triton.jit
def bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs, mask, AFFINE: tl.constexpr):
    """Per-channel ``(mean, scale, beta, invstd)`` (fp32) of the BN ``(x - mean) * scale + beta``
    (:func:`bn_affine`): ``invstd = rsqrt(var + eps)``, ``scale = gamma * invstd``, ``beta`` 0 without affine;
    zero outside ``mask``. Computed where a tile needs them, so no per-layer vector is ever launched for."""
    mu = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rs = tl.where(mask, tl.math.rsqrt(tl.load(var_ptr + offs, mask=mask, other=1.0).to(tl.float32) + eps), 0.0)
    if AFFINE:
        scale = tl.load(gamma_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rs
        beta = tl.load(beta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        scale = rs
        beta = tl.zeros_like(rs)
    return mu, scale, beta, rs


@triton.jit
def relu(v):
    """``max(v, 0)`` with NaN propagated (``torch.relu``'s NaN semantics): ``tl.maximum`` drops a NaN operand
    unless told otherwise (``fmax`` in the interpreter, ``max.f32`` in PTX); this is ``max.NaN.f32``. Every ReLU
    of the kernels is this one, so a NaN or Inf input reaches the outputs exactly where it reaches them in
    PyTorch, and never only the statistics."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def bn_affine(x, mu, scale, beta):
    """``(x - mu) * scale + beta`` of a ``[rows, channels]`` tile in fp32: the BN (the ReLU's input). Centred first:
    ``x - mu`` is exact near the mean, so a channel with a mean of 1e4 and a std of 1 loses nothing, where the
    folded ``x * scale + (beta - mu * scale)`` cancels two terms of 1e4 (an fp32 rounding of 1e-3 std, enough to
    flip the ReLU of the pixels near 0)."""
    return (x.to(tl.float32) - mu[None, :]) * scale[None, :] + beta[None, :]


@triton.jit
def bn_relu_tile(x, mu, scale, beta, mask):
    """``relu((x - mu) * scale + beta)`` of a ``[rows, channels]`` tile in fp32; zero where ``mask`` is off, so
    padding, pad columns and out-of-range rows are zeros of the *activation* (after BN-ReLU), as the
    convolution sees them (``where``, not a multiply: the pad columns of a rows buffer are uninitialized)."""
    return tl.where(mask, relu(bn_affine(x, mu, scale, beta)), 0.0)


@triton.jit
def relu_grad(gy, x, mu, scale, beta, mask):
    """The ReLU backward of ``relu(bn_affine(x))``: ``gy`` where the pre-activation is ``> 0`` or NaN (as
    ``threshold_backward``, which zeroes where ``pre <= 0``), zero there and outside ``mask``. The same
    :func:`bn_affine` as the forward's, so forward and backward agree on every pixel's side of 0."""
    return tl.where(mask & ~(bn_affine(x, mu, scale, beta) <= 0.0), gy, 0.0)


@triton.jit
def bn_grad_sums(g, x, mu, rs, mask):
    """Per channel of a tile, the BN backward's partial sums ``(sum g, sum g * xhat)`` with the centred
    ``xhat = (x - mu) * rs`` (:func:`xhat_tile`), over the tile's rows where ``mask`` is on. A pixel whose
    ``g`` is zero still adds ``0 * xhat`` (NaN where ``xhat`` is not finite, as in PyTorch's sums)."""
    return tl.sum(g, axis=0), tl.sum(tl.where(mask, g * xhat_tile(x, mu, rs), 0.0), axis=0)


@triton.jit
def xhat_tile(x, mu, rs):
    """``(x - mu) * rs`` of a ``[rows, channels]`` tile in fp32: the normalized input (``x - mu`` is exact where
    ``x`` is near ``mu``, so a large mean costs no precision)."""
    return (x.to(tl.float32) - mu[None, :]) * rs[None, :]


@triton.jit
def grad_rows_times_weight(g_row, p_mask, w_ptr, swo, swi, offs_n, n_mask, Cout, cdt: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """The dgrad GEMM of a 1x1 convolution, ``gy[rows, :Cout] @ W[:Cout, offs_n]``, as a ``[BLOCK_P, BLOCK_N]``
    fp32 tile: ``g_row`` points at each row of gy (masked by ``p_mask``), W is read in its own ``[Cout, Cin]``
    layout (strides ``swo``, ``swi``), both in the compute dtype ``cdt`` on the dot."""
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Cout, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < Cout
        gy = tl.load(g_row[:, None] + offs_k[None, :], mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_k[:, None] * swo + offs_n[None, :] * swi, mask=k_mask[:, None] & n_mask[None, :],
                     other=0.0)
        acc = tl.dot(gy.to(cdt), wt.to(cdt), acc, input_precision=PRECISION)
    return acc


@triton.jit
def dropout_scale(seed, offs_p, offs_c, C, drop_p, drop_scale):
    """The dropout factor (0 or ``1/(1-p)``) of elements ``[offs_p, offs_c]`` of a ``[P, C]`` map.

    The Philox stream is indexed by the element's logical index ``p*C + c`` (int64), so the same mask comes
    back in the forward epilogue and in every backward prologue, whatever the tiling.
    """
    idx = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    keep = tl.rand(seed, idx) >= drop_p
    return tl.where(keep, drop_scale, 0.0)


@triton.jit
def finite(v):
    """``v`` is neither infinite nor NaN."""
    return tl.abs(v) <= FLT_MAX


@triton.jit
def at_least_one(n):
    """``max(n, 1)``: a count to divide sums by (an empty group's sums are 0). NaN-propagating like :func:`relu`,
    so that no kernel's PTX has a NaN-dropping float max at all (:mod:`effdense.tools.aot` counts them)."""
    return tl.maximum(n, 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def tile_moments(v, w, mask):
    """Per column of a ``[rows, C]`` tile of groups (fp32: group means ``v``, counts ``w`` ``[rows]``, zero
    for rows not taken; ``mask`` marks the entries taken): the total count ``n`` (a scalar), the mean as a rounded
    fp32 ``mean`` plus what its rounding lost, ``lo``, and ``M2 = sum_i w_i (v_i - mean)^2``. A tile of pixels is
    groups of one (``w`` 0/1).

    Two passes with a corrected mean: ``m0 = sum w v / n``, then ``mean = m0 + sum w (v - m0) / n`` (``v - m0`` is
    exact near the mean, so the mean is as accurate as its last rounding whatever the mean/std ratio, and exact
    for a constant column), then ``M2`` from ``v - mean`` (0 for a constant column). ``lo`` (Fast2Sum: the
    correction is small against ``m0``) keeps a tile mean of 1e4 exact to ~1e-8 for the merge, which weighs the
    tiles' means against each other. A non-finite ``m0`` is kept as it is (``lo`` 0): a column with +Inf has mean
    +Inf (and M2 NaN), with both infinities NaN, as PyTorch's sums give."""
    n = tl.sum(w, axis=0)
    inv = 1.0 / at_least_one(n)
    m0 = tl.sum(tl.where(mask, w[:, None] * v, 0.0), axis=0) * inv
    c = tl.sum(tl.where(mask, w[:, None] * (v - m0[None, :]), 0.0), axis=0) * inv
    ok = finite(m0)
    mean = tl.where(ok, m0 + c, m0)
    d = tl.where(mask, v - mean[None, :], 0.0)
    return n, mean, tl.where(ok, c - (mean - m0), 0.0), tl.sum(w[:, None] * d * d, axis=0)


@triton.jit
def merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of the moments ``(n, mean, M2)`` of two groups: ``n = n_a + n_b``,
    ``mean = mean_a + (mean_b - mean_a) n_b / n``, ``M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / n``. Where
    a mean is not finite the merged mean is ``mean_a + mean_b`` (the plain sum's Inf or NaN, see
    :func:`tile_moments`)."""
    n = n_a + n_b
    w_b = n_b / at_least_one(n)
    delta = mean_b - mean_a
    mean = tl.where(finite(mean_a) & finite(mean_b), mean_a + delta * w_b, mean_a + mean_b)
    return n, mean, m2_a + m2_b + delta * delta * (n_a * w_b)


@triton.jit
def store_tile_stats(y, row_mask, mask, offs_c, c_mask, tile, stats_ptr, plane, ldp, first):
    """Write the Welford partials of one tile ``y`` ``[rows, C]`` (fp32; :func:`tile_moments` of its pixels) into
    row ``tile`` of the ``[4, T, ldp]`` partials (:func:`effdense.kernels.stats.partials`: plane 0 the mean, 1 its
    rounding residual, 2 M2, 3 column 0 the row count, which only the ``first`` channel block writes); merged by
    :func:`effdense.kernels.stats.bn_finalize`."""
    cnt, mean, lo, m2 = tile_moments(y, row_mask.to(tl.float32), mask)
    row = tile.to(tl.int64) * ldp
    tl.store(stats_ptr + row + offs_c, mean, mask=c_mask)
    tl.store(stats_ptr + plane + row + offs_c, lo, mask=c_mask)
    tl.store(stats_ptr + 2 * plane + row + offs_c, m2, mask=c_mask)
    if first:
        tl.store(stats_ptr + 3 * plane + row, cnt)


@triton.jit
def halo_tile(pid, H, W, BH: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr):
    """Pixels of the ``BH x BW`` output tile ``pid`` (tiles in ``(n, tile row, tile col)`` order) and of its
    one-pixel halo ``(BH+2) x (BW+2)`` stored row-major in ``HALO >= (BH+2)(BW+2)`` slots:
    ``(q_pix, q_valid, o_pix, o_valid)``, ``*_valid`` false outside the image (zero padding) or the tile."""
    tiles_w = tl.cdiv(W, BW)
    tiles_hw = tl.cdiv(H, BH) * tiles_w
    n = pid // tiles_hw
    r = pid - n * tiles_hw
    th = r // tiles_w
    h0 = th * BH
    w0 = (r - th * tiles_w) * BW
    q = tl.arange(0, HALO)
    hq = h0 - 1 + q // (BW + 2)
    wq = w0 - 1 + q % (BW + 2)
    q_valid = (q < (BH + 2) * (BW + 2)) & (hq >= 0) & (hq < H) & (wq >= 0) & (wq < W)
    o = tl.arange(0, BH * BW)
    ho = h0 + o // BW
    wo = w0 + o % BW
    o_valid = (ho < H) & (wo < W)
    return (n * H + hq) * W + wq, q_valid, (n * H + ho) * W + wo, o_valid


@triton.jit
def halo_center(salt, BH: tl.constexpr, BW: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BH*BW, BLOCK_K]`` halo slots of the output pixels themselves; tap ``(dh, dw)`` is this plus the
    constant ``dh * (BW + 2) + dw`` (:func:`tap`). ``salt`` is a zero the compiler cannot prove (e.g.
    ``k0 < 0``): it keeps the 9 tap indices from being hoisted out of the loop and held live together,
    which costs 8 registers each per thread."""
    o = tl.arange(0, BH * BW)
    idx = (o // BW + 1) * (BW + 2) + (o % BW + 1) + salt
    return tl.broadcast_to(idx[:, None], (BH * BW, BLOCK_K))


@triton.jit
def tap(halo, center, dh, dw, BW: tl.constexpr):
    """The GEMM operand of tap ``(dh, dw)`` (each in -1..1) formed from the staged halo tile: ``tl.gather``
    re-indexes the tile in registers/shared memory (warp shuffles or a shared-memory gather), no global load."""
    return tl.gather(halo, center + (dh * (BW + 2) + dw), axis=0)


def halo_tiles(n: int, h: int, w: int, bh: int, bw: int) -> int:
    """Number of ``bh x bw`` output tiles of :func:`halo_tile` over ``[N, H, W]``."""
    return n * triton.cdiv(h, bh) * triton.cdiv(w, bw)


def halo_slots(bh: int, bw: int) -> int:
    """``HALO``: the power of two holding the ``(bh+2) x (bw+2)`` halo."""
    return triton.next_power_of_2((bh + 2) * (bw + 2))
