"""The benchmark suites. Each takes ``(device, quick, backends, overrides, rows)`` and returns ``(config, rows)``;
a row is one measurement (or the reason there is none: ``status`` other than ``"ok"``). ``overrides`` replaces
entries of the suite's configuration by name (``batch``, ``batches``, ``depths``, ``growth_rates``, ``dtypes``,
or any key with ``--set KEY=JSON``; for ``speed``, ``depths`` and ``growth_rates`` choose DenseNet-BC models
instead of the default list). ``rows`` is the list to append to: ``python -m benchmarks`` passes one that
writes the results file after every row, so a run cut off by a deadline keeps what it measured."""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

import effdense
from effdense.tools.launches import Launches, count_launches, label_blocks
from effdense.tools.measure import measure_step

from . import floors
from .loader import loader
from .common import (DTYPES, LAYOUTS, Step, backend_unavailable, build_model, compile_model, input_size, is_oom,
                     median_ms, sync)
from .rss import rss_fields

GiB = 2 ** 30


def _begin(rows: list | None, cfg: dict) -> list:
    """The list a suite appends its rows to: the caller's (which may record ``cfg`` right away), or a new one."""
    if rows is None:
        return []
    if hasattr(rows, "config"):
        rows.config = cfg
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _override(cfg: dict, overrides: dict | None) -> dict:
    unknown = set(overrides or {}) - set(cfg)
    return dict(cfg, **{k: v for k, v in (overrides or {}).items() if k not in unknown})


def _measure(name: str, depth: int | None, k: int, backend: str, batch: int, dtype: str, device: torch.device,
             time_it: bool, warmup: int = 2, reps: int = 10, budget: float | None = None,
             compile_backend: str = "inductor") -> dict:
    """One configuration: peak memory of a training step and, if ``time_it``, median phase times; ``budget``:
    the ``compile`` backend's activation memory budget (:func:`benchmarks.common.compile_model`)."""
    row = dict(model=name, depth=depth, growth_rate=k, backend=backend, batch=batch, dtype=dtype)
    if budget is not None:
        row["budget"] = budget
    why = backend_unavailable(backend, device, DTYPES[dtype])
    if why is not None:
        return dict(row, status=f"unavailable: {why}")
    size = input_size(name)
    try:
        torch.manual_seed(0)
        model = build_model(name, depth, k, backend, device, budget=budget, compile_backend=compile_backend)
        step = Step(model, batch, size, dtype, device)
        step.step()                                   # warm-up: compile, gradients, optimizer state
        peak = measure_step(step.step, device).peak_bytes
        row.update(status="ok", peak_bytes=peak, images=batch)
        base = model._orig_mod if hasattr(model, "_orig_mod") else model
        row["floor_bytes"] = floors.memory_floor_bytes(base, batch, size, DTYPES[dtype])
        if time_it:
            fwd = median_ms(step.forward, device, warmup, reps)
            bwd = median_ms(step.backward, device, warmup, reps, setup=step.forward)
            full = median_ms(step.step, device, warmup, reps)
            row.update(forward_ms=fwd, backward_ms=bwd, step_ms=full, images_per_s=batch / full * 1e3)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        row.update(status="oom")
    finally:
        _free(device)
    return row


def memory(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None,
           rows: list | None = None) -> tuple[dict, list[dict]]:
    """Peak memory of one training step vs depth, DenseNet-BC k=12 and k=24, 32x32, with the predicted floor;
    the ``compile`` backend once per activation memory budget in ``budgets`` (see :func:`speed`)."""
    if quick:
        cfg = dict(batch=2, growth_rates=[12], depths=[10, 16, 22], dtype="fp32")
    else:
        cfg = dict(batch=64, growth_rates=[12, 24], depths=[40, 100, 190, 250, 400, 700, 1000], dtype="fp32")
    cfg.update(budgets=[1.0], compile_backend="inductor")
    cfg = _override(cfg, overrides)
    _check_budgets(cfg)
    rows = _begin(rows, cfg)
    for k in cfg["growth_rates"]:
        for backend in backends:
            for budget in cfg["budgets"] if backend == "compile" else [None]:
                for depth in cfg["depths"]:
                    row = _measure("bc", depth, k, backend, cfg["batch"], cfg["dtype"], device, time_it=False,
                                   budget=budget, compile_backend=cfg["compile_backend"])
                    rows.append(row)
                    if row["status"] == "oom":
                        break                                  # deeper will not fit either
    return cfg, rows


def _check_budgets(cfg: dict) -> None:
    bad = [b for b in cfg["budgets"] if not isinstance(b, (int, float)) or not 0 <= b <= 1]
    if bad or not cfg["budgets"]:
        raise ValueError(f"budgets: expected a list of activation memory budgets in [0, 1], got {cfg['budgets']}")


def speed(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None,
          rows: list | None = None) -> tuple[dict, list[dict]]:
    """Step time (median over interleaved rounds, with its spread), forward and backward time, images/s and peak
    memory per model, batch, dtype and backend; on CUDA also each block backend's step captured as a CUDA graph
    (``variant="cuda-graph"``, :class:`effdense.cuda_graphs.GraphedStep`) and ``torch.compile`` of naive with
    ``mode="reduce-overhead"``. Every variant of one configuration is built first; then each of ``rounds``
    rounds times every variant once (``reps`` steps, one forward, one backward), in an order rotated per round,
    so that drifting machine load spreads over all of them. The first step (compilation, autotuning, Triton's
    JIT) is timed on its own (``first_step_s``). ``budgets``: the ``compile`` variant once per
    ``torch._functorch.config.activation_memory_budget`` (PyTorch's automatic recomputation, the peer of the
    memory-efficient backends; ``budget`` in its rows). The models run without dropout: below 1.0 the
    partitioner recomputes dropout with fresh randomness (pytorch#190717)."""
    if quick:
        cfg = dict(models=[("bc", 16, 12)], batches=[2], dtypes=["fp32"], warmup=1, rounds=3, reps=1)
    else:
        cfg = dict(models=[("bc", 100, 12), ("bc", 250, 24), ("densenet121", None, 32), ("densenet169", None, 32),
                           ("densenet201", None, 32), ("densenet264", None, 32)],
                   batches=[64, 256], dtypes=["fp32", "bf16"], warmup=3, rounds=7, reps=5)
    cfg["layouts"] = ["nchw"]                    # input and model memory format: "nchw" and/or "channels_last"
    cfg["compile_backend"] = "inductor"           # the ``compile`` rows' torch.compile backend
    cfg["rss"] = True                             # CPU: resident-memory rise of eager rows (benchmarks.rss)
    cfg["budgets"] = [1.0]                        # the ``compile`` rows' activation memory budgets
    cfg = _override(cfg, _bc_models(cfg, overrides))
    _check_budgets(cfg)
    unknown = sorted(set(cfg["layouts"]) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"speed: unknown layouts {unknown}; expected some of {sorted(LAYOUTS)}")
    cfg["graphs"] = device.type == "cuda"
    rows = _begin(rows, dict(cfg, models=[list(m) for m in cfg["models"]]))
    for name, depth, k in cfg["models"]:
        for batch in cfg["batches"]:
            for dtype in cfg["dtypes"]:
                for layout in cfg["layouts"]:
                    rows += _speed_config(name, depth, k, batch, dtype, layout, device, backends, cfg)
    cfg["models"] = [list(m) for m in cfg["models"]]
    return cfg, rows


def _bc_models(cfg: dict, overrides: dict | None) -> dict:
    """``overrides`` less ``depths`` and ``growth_rates``, which set ``cfg["models"]`` to DenseNet-BC models of
    these depths instead of the default list."""
    overrides = dict(overrides or {})
    if "depths" in overrides:
        cfg["models"] = [("bc", d, k) for k in overrides.pop("growth_rates", [12]) for d in overrides.pop("depths")]
    return overrides


def _rotations(items: list, rounds: int):
    """``items`` once per round, in an order rotated per round (drifting machine load spreads over all)."""
    for r in range(rounds if items else 0):
        yield from items[r % len(items):] + items[:r % len(items)]


def _variants(backends: list[str], device: torch.device, dtype: str,
              budgets: list[float]) -> list[tuple[str, str, float | None]]:
    """``(backend, variant, budget)`` to time: each block backend eagerly, ``compile`` at each budget; on CUDA
    each block backend's captured step and naive's reduce-overhead compile (fp16 needs a GradScaler, which
    cannot be captured)."""
    out = [(b, "compile", budget) for b in backends if b == "compile" for budget in budgets]
    out = [(b, "eager", None) for b in backends if b != "compile"] + out
    out.sort(key=lambda v: backends.index(v[0]))
    if device.type == "cuda" and dtype != "fp16":
        out += [(b, "cuda-graph", None) for b in backends if b != "compile"]
        if "compile" in backends:
            out.append(("compile", "compile-reduce-overhead", None))
    return out


class _Timed:
    """One variant of one configuration, built and warmed up: ``step()``, and for eager variants ``forward()``
    and ``backward(loss)`` too."""

    def __init__(self, name: str, depth: int | None, k: int, backend: str, variant: str, batch: int, dtype: str,
                 device: torch.device, warmup: int, compile_backend: str = "inductor", layout: str = "nchw",
                 budget: float | None = None):
        from effdense.cuda_graphs import GraphedStep, compiled_step, make_capturable
        size = input_size(name)
        torch.manual_seed(0)
        model = build_model(name, depth, k, "naive" if variant.startswith("compile") else backend, device)
        model = model.to(memory_format=LAYOUTS[layout])
        if variant == "compile":
            model = compile_model(model, compile_backend, budget)
        self.plain = Step(model, batch, size, dtype, device)
        self.plain.x = self.plain.x.contiguous(memory_format=LAYOUTS[layout])
        self.forward = self.backward = None
        amp = DTYPES[dtype] if dtype != "fp32" else None
        t0 = time.perf_counter()
        if variant == "cuda-graph":
            make_capturable(self.plain.opt, device)
            graphed = GraphedStep(model, self.plain.opt, torch.nn.functional.cross_entropy, self.plain.x,
                                  self.plain.y, autocast=amp)
            self.step = lambda: graphed(self.plain.x, self.plain.y)
        elif variant == "compile-reduce-overhead":
            run = compiled_step(model, self.plain.opt, torch.nn.functional.cross_entropy, autocast=amp)
            self.step = lambda: run(self.plain.x, self.plain.y)
        else:
            self.step = self.plain.step
            self.forward, self.backward = self.plain.forward, self.plain.backward
        self.step()
        sync(device)
        self.first_step_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            self.step()
        self.peak = measure_step(self.step, device).peak_bytes if variant in ("eager", "compile") else None
        base = model._orig_mod if hasattr(model, "_orig_mod") else model
        self.floor = floors.memory_floor_bytes(base, batch, size, DTYPES[dtype])


def _spread(values: list[float], prefix: str) -> dict:
    """Median, min, max and quartiles of per-round values, as ``{prefix}_ms`` etc."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {f"{prefix}_ms": statistics.median(values), f"{prefix}_ms_min": min(values),
            f"{prefix}_ms_max": max(values), f"{prefix}_ms_q1": q[0], f"{prefix}_ms_q3": q[2],
            f"{prefix}_ms_rounds": values}


def _speed_config(name: str, depth: int | None, k: int, batch: int, dtype: str, layout: str, device: torch.device,
                  backends: list[str], cfg: dict) -> list[dict]:
    rows, timed = [], []
    for backend, variant, budget in _variants(backends, device, dtype, cfg["budgets"]):
        row = dict(model=name, depth=depth, growth_rate=k, backend=backend, variant=variant, batch=batch,
                   dtype=dtype, layout=layout, **({} if budget is None else {"budget": budget}))
        why = backend_unavailable(backend, device, DTYPES[dtype])
        if why is not None:
            rows.append(dict(row, status=f"unavailable: {why}"))
            continue
        try:
            t = _Timed(name, depth, k, backend, variant, batch, dtype, device, cfg["warmup"], cfg["compile_backend"],
                       layout, budget)
        except (torch.OutOfMemoryError, RuntimeError, ValueError) as err:
            if is_oom(err):
                rows.append(dict(row, status="oom"))
            else:           # a variant that cannot run here (a capture that fails) must not stop the others
                rows.append(dict(row, status=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"))
            _free(device)
            continue
        timed.append((row, t, {"step": [], "forward": [], "backward": []}))
    for row, t, times in _rotations(timed, cfg["rounds"]):
        times["step"].append(median_ms(t.step, device, 0, cfg["reps"]))
        if t.forward is not None:
            times["forward"].append(median_ms(t.forward, device, 0, 1))
            times["backward"].append(median_ms(t.backward, device, 0, 1, setup=t.forward))
    for row, t, times in timed:
        out = dict(row, status="ok", images=batch, first_step_s=t.first_step_s, peak_bytes=t.peak,
                   floor_bytes=t.floor, **_spread(times["step"], "step"))
        if device.type == "cpu" and row["variant"] == "eager" and cfg["rss"]:
            out.update(rss_fields(name, depth, k, row["backend"], batch, dtype, layout))
        if times["forward"]:
            out.update(forward_ms=statistics.median(times["forward"]),
                       backward_ms=statistics.median(times["backward"]))
        out["images_per_s"] = batch / out["step_ms"] * 1e3
        rows.append(out)
    del timed
    _free(device)
    return rows


def inference(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None,
              rows: list | None = None) -> tuple[dict, list[dict]]:
    """Eval forward (``model.eval()`` under ``torch.inference_mode``) per model, batch and backend: latency (the
    median ms per batch over interleaved rounds, as in :func:`speed`, with its spread), images/s, and the peak
    memory a forward adds (:func:`effdense.tools.measure.measure_step`, as the speed and memory suites: the CPU
    allocator's peak, CUDA's ``max_memory_allocated``). ``compile`` is naive under torch.compile (``inductor``
    unless ``compile_backend``); every row's first call, the compile included, is timed on its own."""
    if quick:
        cfg = dict(models=[("bc", 10, 12)], batches=[2], warmup=1, rounds=2, reps=1)
    else:
        cfg = dict(models=[("bc", 100, 12)], batches=[1, 32, 256], warmup=3, rounds=7, reps=5)
    cfg.update(dtype="fp32", compile_backend="inductor")
    cfg = _override(cfg, _bc_models(cfg, overrides))
    cfg["models"] = [list(m) for m in cfg["models"]]
    rows = _begin(rows, cfg)
    for name, depth, k in cfg["models"]:
        for batch in cfg["batches"]:
            rows += _inference_config(name, depth, k, batch, device, backends, cfg)
    return cfg, rows


def _eval_forward(name: str, depth: int | None, k: int, backend: str, x: torch.Tensor, cfg: dict) -> Callable:
    """The eval forward of one backend's model on ``x``, as a closure (compiled on its first call)."""
    torch.manual_seed(0)
    model = build_model(name, depth, k, "naive" if backend == "compile" else backend, x.device).eval()
    if backend == "compile":
        model = compile_model(model, cfg["compile_backend"])
    amp = DTYPES[cfg["dtype"]] if cfg["dtype"] != "fp32" else None

    def forward() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            return model(x)
    return forward


def _inference_config(name: str, depth: int | None, k: int, batch: int, device: torch.device, backends: list[str],
                      cfg: dict) -> list[dict]:
    rows, timed = [], []
    size = input_size(name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    for backend in backends:
        row = dict(model=name, depth=depth, growth_rate=k, backend=backend, batch=batch, dtype=cfg["dtype"])
        why = backend_unavailable(backend, device, DTYPES[cfg["dtype"]])
        if why is not None:
            rows.append(dict(row, status=f"unavailable: {why}"))
            continue
        try:
            forward = _eval_forward(name, depth, k, backend, x, cfg)
            t0 = time.perf_counter()
            forward()
            sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            for _ in range(cfg["warmup"] - 1):
                forward()
            row["peak_bytes"] = measure_step(forward, device).peak_bytes
        except (torch.OutOfMemoryError, RuntimeError) as err:
            rows.append(dict(row, status="oom" if is_oom(err) else
                             f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"))
            _free(device)
            continue
        timed.append((row, forward, []))
    for row, forward, times in _rotations(timed, cfg["rounds"]):
        times.append(median_ms(forward, device, 0, cfg["reps"]))
    for row, forward, times in timed:
        out = dict(row, status="ok", images=batch, **_spread(times, "latency"))
        rows.append(dict(out, images_per_s=batch / out["latency_ms"] * 1e3))
    del timed
    _free(device)
    return rows


def _fits(name: str, depth: int | None, backend: str, batch: int, dtype: str, device: torch.device) -> bool:
    row = _measure(name, depth, 12, backend, batch, dtype, device, time_it=False)
    return row["status"] == "ok"


def _deepest(backend: str, batch: int, device: torch.device, limit: int, start: int) -> int:
    """Largest N (layers per block) such that DenseNet-BC(6N+4) k=12 trains: doubling from ``start`` (or
    halving, when that does not fit), then bisection."""
    fits = lambda n: _fits("bc", 6 * n + 4, backend, batch, "fp32", device)  # noqa: E731
    lo, hi = 0, max(1, start)
    while hi > 1 and not fits(hi):
        hi //= 2
    if hi == 1 and not fits(1):
        return 0
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return 6 * lo + 4 if lo else 0


def capacity(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None,
             rows: list | None = None) -> tuple[dict, list[dict]]:
    """Deepest DenseNet-BC k=12 each backend trains at batch 64 under emulated 4/8/12 GiB cards, and whether
    DenseNet-264 (224x224, batch 64, bf16) trains in 4 GiB. CUDA only (``set_per_process_memory_fraction``).
    Each probe builds and steps a model, so ``start_layers`` (layers per block tried first) saves probes."""
    cfg = _override(dict(caps_gib=[4, 8, 12], batch=64, max_layers_per_block=400, start_layers=16,
                         densenet264=True), overrides)
    rows = _begin(rows, cfg)
    if device.type != "cuda":
        rows.append(dict(status="skipped: needs CUDA (per-process memory caps)"))
        return cfg, rows
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        for cap in cfg["caps_gib"]:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total), device)
            for backend in backends:
                why = backend_unavailable(backend, device, torch.float32)
                if why is not None:
                    rows.append(dict(cap_gib=cap, backend=backend, status=f"unavailable: {why}"))
                    continue
                deepest = _deepest(backend, cfg["batch"], device, cfg["max_layers_per_block"], cfg["start_layers"])
                rows.append(dict(cap_gib=cap, backend=backend, model="bc", growth_rate=12, batch=cfg["batch"],
                                 deepest_depth=deepest, status="ok"))
            if cap == 4 and cfg["densenet264"]:
                for backend in backends:
                    if backend_unavailable(backend, device, torch.bfloat16) is None:
                        rows.append(dict(cap_gib=cap, backend=backend, model="densenet264", batch=cfg["batch"],
                                         dtype="bf16", trains=_fits("densenet264", None, backend, cfg["batch"],
                                                                    "bf16", device), status="ok"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return cfg, rows


def _ceilings(device: torch.device, cfg: dict) -> list[dict]:
    """Measured copy bandwidth (bytes read + written) and matmul rates of this device (fp32, and bf16 on CUDA), on
    random data: by default 1 GiB copies (many times any L2) and 8192^3 products, ``reps`` timed runs each."""
    a = torch.empty(cfg["copy_elems"], dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), device, 2, cfg["reps"])
    rows = [dict(kind="ceiling", name="copy", bytes=2 * a.numel() * 4, ms=ms, gbps=2 * a.numel() * 4 / ms / 1e6,
                 status="ok")]
    del a, b
    m = cfg["matmul_n"]
    for dtype in ["fp32"] + (["bf16"] if device.type == "cuda" else []):
        x = torch.randn(m, m, device=device, dtype=DTYPES[dtype])
        y = torch.randn(m, m, device=device, dtype=DTYPES[dtype])
        ms = median_ms(lambda: x @ y, device, 2, max(2, cfg["reps"] // 2))
        rows.append(dict(kind="ceiling", name=f"matmul-{dtype}", flops=2 * m ** 3, ms=ms, tflops=2 * m ** 3 / ms / 1e9,
                         status="ok"))
    return rows


def _triton_conv1x1(device: torch.device) -> str | None:
    from effdense import backends as B
    return B.unavailable_reason("triton", device, torch.float32) or (
        None if device.type == "cuda" else "the interpreter's speed says nothing")


def _cpp_conv1x1(device: torch.device) -> str | None:
    from effdense import backends as B
    return B.unavailable_reason("cpp", device, torch.float32)


def _triton_conv1x1_factory(x, scale, shift, w):
    """The block's bottleneck launch: ``relu(scale * x + shift)`` as the kernels' BN (mean 0, var 1, eps 0,
    gamma ``scale``, beta ``shift``), the output rows buffer and its BN statistics' partials in the epilogue."""
    from effdense import kernels as K
    from effdense.kernels import fwd
    n, c, h, wd = x.shape
    xb = K.to_rows(x)                                  # the padded channels-last layout the block keeps F in
    out = K.rows_buffer(n, h, wd, w.shape[0], x.dtype, x.device)
    part = K.partials(fwd.tiles(1, n, h, wd, fwd.heuristic(1, n, h, wd, c, w.shape[0], x.dtype)), w.shape[0],
                      x.device)
    bn = K.BN(torch.zeros_like(scale), torch.ones_like(scale), scale, shift, 0.0)
    return lambda: K.bn_relu_conv_fwd(xb, c, bn, w, out, 0, part)


def _ext_steps():
    """The cpp backend's C++ steps (csrc/ops.h) through effdense._C._testing: not operators, not an API."""
    from effdense import _ext
    return _ext.C._testing


def _cpp_conv1x1_factory(x, scale, shift, w):
    """The block driver's bottleneck op (csrc/block.cpp linear_forward): BN-ReLU-GEMM into a channels-last z with
    z's statistics, BN given as (gamma ``scale``, beta ``shift``, mean 0, var 1, eps 0)."""
    n, _, h, wd = x.shape
    z = torch.empty(n, w.shape[0], h, wd, device=x.device, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    zero, one = torch.zeros_like(scale), torch.ones_like(scale)
    mean, var = (torch.empty(w.shape[0], device=x.device, dtype=scale.dtype) for _ in range(2))
    steps = _ext_steps()
    return lambda: steps.bn_relu_linear_into(x, scale, shift, zero, one, 0.0, w, z, mean, var)


#: fused BN-ReLU-Conv1x1 implementations to compare against the unfused sequence: ``name -> (availability(device)
#: -> reason|None, factory(x_prefix, scale, shift, weight) -> callable)``. They call the backends' ``effdense::``
#: ops; one whose signature has changed gives a ``failed`` row, not a crash.
FUSED_CONV1X1: dict[str, tuple[Callable, Callable]] = {
    "triton-fused": (_triton_conv1x1, _triton_conv1x1_factory),
    "cpp-fused": (_cpp_conv1x1, _cpp_conv1x1_factory),
}


def _conv1x1_rows(cfg: dict, device: torch.device) -> list[dict]:
    """BN-ReLU-Conv1x1 on a channel prefix of a channels-last feature buffer (row stride padded to 16, as the
    kernels' buffers are): unfused PyTorch, the conv alone, and each fused kernel; bandwidth counts the prefix
    read and the output written once."""
    rows = []
    dt = DTYPES[cfg["dtype"]]
    n, hw = cfg["batch"], cfg["hw"]
    for c, b in cfg["shapes"]:
        ld = -(-(c + 64) // 16) * 16
        buf = torch.randn(n, ld, hw, hw, device=device, dtype=dt).contiguous(memory_format=torch.channels_last)
        x = buf[:, :c]
        scale, shift = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
        w = torch.randn(b, c, 1, 1, device=device, dtype=dt)
        flops, nbytes = 2 * n * hw * hw * c * b, (n * hw * hw * (c + b)) * x.element_size()

        def unfused():
            return torch.nn.functional.conv2d(torch.relu(x * scale.view(1, -1, 1, 1).to(dt)
                                                         + shift.view(1, -1, 1, 1).to(dt)), w)

        act = torch.relu(x * scale.view(1, -1, 1, 1).to(dt) + shift.view(1, -1, 1, 1).to(dt))
        impls = {"unfused-torch": unfused, "conv-only": lambda: torch.nn.functional.conv2d(act, w)}
        for name, (available, factory) in FUSED_CONV1X1.items():
            why = available(device)
            if why is None:
                impls[name] = factory(x, scale, shift, w)
            else:
                rows.append(dict(kind="conv1x1", impl=name, c_in=c, c_out=b, status=f"unavailable: {why}"))
        for name, fn in impls.items():
            row = dict(kind="conv1x1", impl=name, c_in=c, c_out=b, batch=n, hw=hw, dtype=cfg["dtype"])
            try:
                ms = median_ms(fn, device, 2, cfg["reps"])
            except (RuntimeError, TypeError) as err:
                rows.append(dict(row, status=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"))
                continue
            rows.append(dict(row, ms=ms, gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9, status="ok"))
    return rows


def _conv3x3_impls(z, gamma, beta, mean, var, w, gy) -> dict[str, tuple[Callable, Callable]]:
    """``impl -> (forward, backward)`` of a bottleneck's BN2-ReLU-Conv3x3 on z: PyTorch's (BN-ReLU, then ATen's
    convolution and its backward, as the naive model and the cpp backend's fallback run them) and, on CPU, the
    cpp backend's fused steps (csrc/cpu/conv3x3.cpp)."""
    from effdense import backends as B
    aten = torch.ops.aten
    scale = gamma * torch.rsqrt(var + 1e-5)
    shift = beta - mean * scale

    def act():
        return torch.relu(z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))

    impls = {"unfused-torch": (lambda: torch.nn.functional.conv2d(act(), w, padding=1),
                               lambda: aten.convolution_backward(gy, act(), w, None, [1, 1], [1, 1], [1, 1], False,
                                                                 [0, 0], 1, [True, True, False]))}
    why = B.unavailable_reason("cpp", z.device, z.dtype) or (None if z.device.type == "cpu" else "a CPU op")
    if why is None:
        ops, out, ga = _ext_steps(), torch.empty_like(gy), torch.empty_like(z)
        impls["cpp-fused"] = (lambda: ops.bn_relu_conv3x3_into(z, gamma, beta, mean, var, 1e-5, w, out),
                              lambda: ops.bn_relu_conv3x3_backward(z, gy, gamma, beta, mean, var, 1e-5, w, ga))
    return impls


def _conv3x3_rows(cfg: dict, device: torch.device) -> list[dict]:
    """BN2-ReLU-Conv3x3 of a bottleneck (channels-last [batch, c_in, hw, hw] -> k channels), forward and
    backward (grad input and grad weight), per implementation; TFLOP/s counts the convolution's FLOPs."""
    rows = []
    dt = DTYPES[cfg["dtype"]]
    n = cfg["batch"]
    for c, k, hw in cfg["conv3x3_shapes"]:
        cl = torch.channels_last
        z = torch.randn(n, c, hw, hw, device=device, dtype=dt).contiguous(memory_format=cl)
        gy = torch.randn(n, k, hw, hw, device=device, dtype=dt).contiguous(memory_format=cl)
        w = torch.randn(k, c, 3, 3, device=device, dtype=dt).contiguous(memory_format=cl)
        gamma, beta, mean = (torch.randn(c, device=device) for _ in range(3))
        var = torch.rand(c, device=device) + 0.5
        flops = 2 * n * hw * hw * c * k * 9
        for impl, fns in _conv3x3_impls(z, gamma, beta, mean, var, w, gy).items():
            for name, fn, mult in (("forward", fns[0], 1), ("backward", fns[1], 2)):
                row = dict(kind="conv3x3", name=name, impl=impl, c_in=c, c_out=k, batch=n, hw=hw, dtype=cfg["dtype"])
                ms = median_ms(fn, device, 2, cfg["reps"])
                rows.append(dict(row, ms=ms, tflops=mult * flops / ms / 1e9, status="ok"))
    return rows


def _roofline_rows(cfg: dict, device: torch.device, backends: list[str], mm: dict, copy: dict,
                   quick: bool) -> list[dict]:
    """Per model and backend: the measured step time over the floor of :mod:`benchmarks.floors` (FLOPs over
    the measured fp32 matmul rate, bytes over the measured copy bandwidth, whichever is larger)."""
    rows = []
    for name, depth, k in cfg["models"]:
        size = input_size(name)
        step_flops = floors.step_flops(lambda: build_model(name, depth, k, "naive", torch.device("meta")),
                                       cfg["batch"], size)
        for backend in backends:
            row = _measure(name, depth, k, backend, cfg["batch"], "fp32", device, True, 1 if quick else 5,
                           3 if quick else 20)
            if row["status"] == "ok":
                model = build_model(name, depth, k, "naive", torch.device("cpu"))
                nbytes = floors.step_bytes_floor(model, cfg["batch"], size, torch.float32)
                floor_ms = max(step_flops / (mm["tflops"] * 1e9), nbytes / (copy["gbps"] * 1e6))
                row.update(step_flops=step_flops, step_bytes=nbytes, floor_ms=floor_ms,
                           over_floor=row["step_ms"] / floor_ms, achieved_gbps=nbytes / row["step_ms"] / 1e6,
                           copy_fraction=nbytes / row["step_ms"] / 1e6 / copy["gbps"])
            rows.append(dict(row, kind="roofline"))
    return rows


def _kernel_profile(cfg: dict, device: torch.device, backends: list[str]) -> list[dict]:
    """CUDA: where one DenseNet-BC-100 training step of each block backend spends device time, per kernel name
    (the profiler's CUDA activity): calls, total and share, the largest ``profile_top`` kernels."""
    from torch.profiler import ProfilerActivity, profile
    rows = []
    for backend in backends:
        if backend == "compile" or backend_unavailable(backend, device, torch.float32):
            continue
        torch.manual_seed(0)
        step = Step(build_model("bc", 100, 12, backend, device), cfg["batch"], 32, "fp32", device)
        step.step()
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step.step()
            sync(device)
        kernels_ = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        total = sum(e.device_time_total for e in kernels_) or 1.0
        for e in sorted(kernels_, key=lambda e: -e.device_time_total)[:cfg["profile_top"]]:
            rows.append(dict(kind="profile", backend=backend, name=e.key[:80], calls=e.count,
                             ms=e.device_time_total / 1e3, share=e.device_time_total / total, status="ok"))
        del step
        _free(device)
    return rows


def kernels(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None,
            rows: list | None = None) -> tuple[dict, list[dict]]:
    """Ceilings (copy bandwidth, matmul rate), BN-ReLU-Conv1x1 on a feature-buffer prefix (unfused PyTorch, the
    conv alone, the fused kernels, each with its achieved bandwidth), BN2-ReLU-Conv3x3 forward and backward on a
    bottleneck (PyTorch's and the cpp backend's CPU ops), per model the measured step time over the
    roofline floor, and on CUDA a per-kernel device-time profile of a BC-100 step."""
    cfg = dict(batch=2 if quick else 64, shapes=[[24 + 12 * l_, 48] for l_ in ((0, 15) if quick else
                                                                          (0, 15, 31, 47))], hw=32,
               conv3x3_shapes=[[48, 12, 8]] if quick else [[48, 12, hw_] for hw_ in (32, 16, 8)],
               dtype="fp32" if quick or device.type != "cuda" else "bf16", reps=5 if quick else 50,
               models=[["bc", 16, 12]] if quick else [["bc", 100, 12], ["densenet121", None, 32]],
               profile=device.type == "cuda", profile_top=12, copy_elems=(1 << 22) if quick else (1 << 28),
               matmul_n=512 if quick else 8192)
    cfg = _override(cfg, overrides)
    rows = _begin(rows, cfg)
    rows.extend(_ceilings(device, cfg))
    copy = next(r for r in rows if r.get("name") == "copy")
    mm = next(r for r in rows if r.get("name") == "matmul-fp32")       # the roofline steps below run in fp32
    rows.extend(_conv1x1_rows(cfg, device))
    rows.extend(_conv3x3_rows(cfg, device))
    rows.extend(_roofline_rows(cfg, device, backends, mm, copy, quick))
    if cfg["profile"] and device.type == "cuda":
        rows.extend(_kernel_profile(cfg, device, backends))
    sync(device)
    return cfg, rows


def peers(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None,
          rows: list | None = None) -> tuple[dict, list[dict]]:
    """torchvision's and timm's DenseNet-121 (with and without ``memory_efficient``) and effdense's, same
    weights and inputs, in one process: peak memory and step time."""
    cfg = _override(dict(batch=2 if quick else 64, size=64 if quick else 224, dtype="fp32",
                         reps=3 if quick else 20), overrides)
    rows = _begin(rows, cfg)
    peers_ = []
    try:
        import torchvision
        peers_ += [("torchvision", lambda me: torchvision.models.densenet121(weights=None, memory_efficient=me))]
    except ImportError:
        pass
    try:
        import timm
        peers_ += [("timm", lambda me: timm.create_model("densenet121", pretrained=False, memory_efficient=me))]
    except ImportError:
        pass
    if not peers_:
        rows.append(dict(status="skipped: neither torchvision nor timm is importable"))
        return cfg, rows
    torch.manual_seed(0)
    reference = effdense.densenet121().state_dict()
    models = [(f"{label}{'-memory_efficient' if me else ''}", lambda make=make, me=me: make(me))
              for label, make in peers_ for me in (False, True)]
    models += [(f"effdense-{b}", lambda b=b: effdense.densenet121(backend=b)) for b in backends
               if b != "compile" and backend_unavailable(b, device, DTYPES[cfg["dtype"]]) is None]
    for impl, make in models:
        try:
            model = make()
        except TypeError as err:              # an older timm without memory_efficient
            rows.append(dict(impl=impl, status=f"unavailable: {err}"))
            continue
        missing = model.load_state_dict(reference, strict=False)
        step = Step(model.to(device), cfg["batch"], cfg["size"], cfg["dtype"], device, num_classes=1000)
        step.step()
        rows.append(dict(impl=impl, status="ok", dtype=cfg["dtype"], same_weights=not missing.missing_keys,
                         peak_bytes=measure_step(step.step, device).peak_bytes,
                         step_ms=median_ms(step.step, device, 1, cfg["reps"])))
        del model, step
        _free(device)
    return cfg, rows


def _count_step(depth: int, k: int, backend: str, batch: int, size: int, device: torch.device, dry_run: bool,
                drop_rate: float = 0.0) -> Launches:
    """Launches of one training step (forward, cross-entropy, backward) after one warm-up step, whose
    gradients the counted step accumulates into (as the baseline count did: one ``add_`` per parameter tensor,
    the same for every backend); host syncs labelled by dense block (:func:`effdense.tools.launches.label_blocks`)."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=depth, growth_rate=k, drop_rate=drop_rate, backend=backend).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()

    with label_blocks(model):
        return count_launches(step, dry_run=dry_run, warmup=1)


def launches(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None,
             rows: list | None = None) -> tuple[dict, list[dict]]:
    """Kernel launches and host syncs of one training step per backend and depth (DenseNet-BC k=12), counted
    with :func:`effdense.tools.launches.count_launches`: leaf ATen ops that launch a kernel, plus Triton launches
    (in a dry run where the kernels run in Triton's interpreter). Launches are counted without dropout (the
    baseline's protocol), host syncs in a second step with dropout (``sync_drop_rate``: dropout seeds are where
    a block would sync). Counts do not depend on the image size or the batch: a small step is enough, on CPU
    as on CUDA."""
    if quick:
        cfg = dict(batch=2, size=8, growth_rates=[12], depths=[10], sync_drop_rate=0.2)
    else:
        cfg = dict(batch=2, size=32, growth_rates=[12], depths=[40, 100, 250], sync_drop_rate=0.2)
    cfg = _override(cfg, overrides)
    from effdense import backends as B
    rows = _begin(rows, cfg)
    for k in cfg["growth_rates"]:
        for depth in cfg["depths"]:
            mine = []
            for backend in backends:
                row = dict(model="bc", depth=depth, growth_rate=k, backend=backend, batch=cfg["batch"],
                           size=cfg["size"])
                if backend == "compile":
                    rows.append(dict(row, status="skipped: a compiled graph's launches are not the eager step's"))
                    continue
                why = B.unavailable_reason(backend, device, torch.float32)
                if why is not None:
                    rows.append(dict(row, status=f"unavailable: {why}"))
                    continue
                dry = backend == "triton" and _interpreting()
                args = (depth, k, backend, cfg["batch"], cfg["size"], device, dry)
                n = _count_step(*args)
                s = _count_step(*args, drop_rate=cfg["sync_drop_rate"])
                mine.append(dict(row, status="ok", launches=n.total, aten=n.aten, triton=n.triton,
                                 host_syncs=sum(s.syncs.values()), block_syncs=s.syncs_in(),
                                 block_ranges=sum(s.ranges.values()), triton_dry_run=dry, top_ops=n.top(8)))
                _free(device)
            naive = next((r["launches"] for r in mine if r["backend"] == "naive"), None)
            for r in mine:
                r["vs_naive"] = r["launches"] / naive if naive else None
            rows += mine
    return cfg, rows


def _interpreting() -> bool:
    try:
        from effdense import kernels
    except ImportError:
        return False
    return kernels.interpreting()


SUITES = {"memory": memory, "speed": speed, "capacity": capacity, "kernels": kernels, "peers": peers,
          "launches": launches, "loader": loader, "inference": inference}
