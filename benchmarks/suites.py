"""The benchmark suites. Each takes ``(device, quick, backends, overrides)`` and returns ``(config, rows)``; a
row is one measurement (or the reason there is none: ``status`` other than ``"ok"``). ``overrides`` replaces
entries of the suite's configuration by name (``batch``, ``batches``, ``depths``, ``growth_rates``, ``dtypes``;
for ``speed``, ``depths`` and ``growth_rates`` choose DenseNet-BC models instead of the default list)."""
from __future__ import annotations

import gc
from collections.abc import Callable

import torch

import effdense
from effdense.memory import measure_step

from . import floors
from .common import DTYPES, Step, backend_unavailable, build_model, input_size, is_oom, median_ms, sync

GiB = 2 ** 30


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _override(cfg: dict, overrides: dict | None) -> dict:
    unknown = set(overrides or {}) - set(cfg)
    return dict(cfg, **{k: v for k, v in (overrides or {}).items() if k not in unknown})


def _measure(name: str, depth: int | None, k: int, backend: str, batch: int, dtype: str, device: torch.device,
             time_it: bool, warmup: int = 2, reps: int = 10) -> dict:
    """One configuration: peak memory of a training step and, if ``time_it``, median phase times."""
    row = dict(model=name, depth=depth, growth_rate=k, backend=backend, batch=batch, dtype=dtype)
    why = backend_unavailable(backend, device, DTYPES[dtype])
    if why is not None:
        return dict(row, status=f"unavailable: {why}")
    size = input_size(name)
    try:
        torch.manual_seed(0)
        model = build_model(name, depth, k, backend, device)
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


def memory(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None
           ) -> tuple[dict, list[dict]]:
    """Peak memory of one training step vs depth, DenseNet-BC k=12 and k=24, 32x32, with the predicted floor."""
    if quick:
        cfg = dict(batch=2, growth_rates=[12], depths=[10, 16, 22], dtype="fp32")
    else:
        cfg = dict(batch=64, growth_rates=[12, 24], depths=[40, 100, 190, 250, 400, 700, 1000], dtype="fp32")
    cfg = _override(cfg, overrides)
    rows = []
    for k in cfg["growth_rates"]:
        for backend in backends:
            for depth in cfg["depths"]:
                row = _measure("bc", depth, k, backend, cfg["batch"], cfg["dtype"], device, time_it=False)
                rows.append(row)
                if row["status"] == "oom":
                    break                                  # deeper will not fit either
    return cfg, rows


def speed(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None
          ) -> tuple[dict, list[dict]]:
    """Median forward/backward/step time and images/s (and peak memory) per model, batch and dtype."""
    if quick:
        cfg = dict(models=[("bc", 16, 12)], batches=[2], dtypes=["fp32"], warmup=1, reps=3)
    else:
        cfg = dict(models=[("bc", 100, 12), ("bc", 250, 24), ("densenet121", None, 32), ("densenet169", None, 32),
                           ("densenet201", None, 32), ("densenet264", None, 32)],
                   batches=[64, 256], dtypes=["fp32", "bf16"], warmup=5, reps=20)
    overrides = dict(overrides or {})
    if "depths" in overrides:                  # DenseNet-BC models of these depths instead of the default list
        cfg["models"] = [("bc", d, k) for k in overrides.pop("growth_rates", [12]) for d in overrides.pop("depths")]
    cfg = _override(cfg, overrides)
    rows = []
    for name, depth, k in cfg["models"]:
        for batch in cfg["batches"]:
            for dtype in cfg["dtypes"]:
                for backend in backends:
                    rows.append(_measure(name, depth, k, backend, batch, dtype, device, True, cfg["warmup"],
                                         cfg["reps"]))
    return dict(cfg, models=[list(m) for m in cfg["models"]]), rows


def _fits(name: str, depth: int | None, backend: str, batch: int, dtype: str, device: torch.device) -> bool:
    row = _measure(name, depth, 12, backend, batch, dtype, device, time_it=False)
    return row["status"] == "ok"


def _deepest(backend: str, batch: int, device: torch.device, limit: int) -> int:
    """Largest N (layers per block) such that DenseNet-BC(6N+4) k=12 trains; doubling then bisection."""
    lo, hi = 0, 1
    while hi <= limit and _fits("bc", 6 * hi + 4, backend, batch, "fp32", device):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits("bc", 6 * mid + 4, backend, batch, "fp32", device) else (lo, mid)
    return 6 * lo + 4 if lo else 0


def capacity(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None
             ) -> tuple[dict, list[dict]]:
    """Deepest DenseNet-BC k=12 each backend trains at batch 64 under emulated 4/8/12 GiB cards, and whether
    DenseNet-264 (224x224, batch 64, bf16) trains in 4 GiB. CUDA only (``set_per_process_memory_fraction``)."""
    cfg = dict(caps_gib=[4, 8, 12], batch=64, max_layers_per_block=400)
    if device.type != "cuda":
        return cfg, [dict(status="skipped: needs CUDA (per-process memory caps)")]
    rows = []
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        for cap in cfg["caps_gib"]:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total), device)
            for backend in backends:
                why = backend_unavailable(backend, device, torch.float32)
                if why is not None:
                    rows.append(dict(cap_gib=cap, backend=backend, status=f"unavailable: {why}"))
                    continue
                deepest = _deepest(backend, cfg["batch"], device, cfg["max_layers_per_block"])
                rows.append(dict(cap_gib=cap, backend=backend, model="bc", growth_rate=12, batch=cfg["batch"],
                                 deepest_depth=deepest, status="ok"))
            if cap == 4:
                for backend in backends:
                    if backend_unavailable(backend, device, torch.bfloat16) is None:
                        rows.append(dict(cap_gib=cap, backend=backend, model="densenet264", batch=cfg["batch"],
                                         dtype="bf16", trains=_fits("densenet264", None, backend, cfg["batch"],
                                                                    "bf16", device), status="ok"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return cfg, rows


def _ceilings(device: torch.device, quick: bool) -> list[dict]:
    """Measured copy bandwidth (bytes read + written) and matmul rate of this device."""
    n = (1 << 22) if quick else (1 << 28)
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), device, 2, 5 if quick else 50)
    rows = [dict(kind="ceiling", name="copy", bytes=2 * a.numel() * 4, ms=ms, gbps=2 * a.numel() * 4 / ms / 1e6,
                 status="ok")]
    for dtype in (["fp32"] if quick or device.type != "cuda" else ["fp32", "bf16"]):
        m = 512 if quick else 8192
        x = torch.randn(m, m, device=device, dtype=DTYPES[dtype])
        y = torch.randn(m, m, device=device, dtype=DTYPES[dtype])
        ms = median_ms(lambda: x @ y, device, 2, 5 if quick else 20)
        rows.append(dict(kind="ceiling", name=f"matmul-{dtype}", flops=2 * m ** 3, ms=ms, tflops=2 * m ** 3 / ms / 1e9,
                         status="ok"))
    return rows


#: fused kernels to compare against the unfused sequence: ``name -> (availability(device) -> reason|None,
#: factory(x_prefix, scale, shift, weight) -> callable)``; kernel backends add theirs here
FUSED_CONV1X1: dict[str, tuple[Callable, Callable]] = {}


def kernels(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None
            ) -> tuple[dict, list[dict]]:
    """Ceilings, BN-ReLU-Conv1x1 on a feature-buffer prefix (unfused PyTorch, the conv alone, fused kernels),
    and per model the measured step time over the roofline floor of :mod:`benchmarks.floors`."""
    cfg = dict(batch=2 if quick else 64, shapes=[[24 + 12 * l_, 48] for l_ in ((0, 15) if quick else
                                                                          (0, 15, 31, 47))], hw=32,
               dtype="fp32" if quick or device.type != "cuda" else "bf16")
    rows = _ceilings(device, quick)
    copy = next(r for r in rows if r["name"] == "copy")
    mm = next(r for r in rows if r["name"] == "matmul-fp32")       # the roofline steps below run in fp32
    dt = DTYPES[cfg["dtype"]]
    n, hw = cfg["batch"], cfg["hw"]
    for c, b in cfg["shapes"]:
        buf = torch.randn(n, c + 64, hw, hw, device=device, dtype=dt).contiguous(memory_format=torch.channels_last)
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
            ms = median_ms(fn, device, 2, 5 if quick else 50)
            rows.append(dict(kind="conv1x1", impl=name, c_in=c, c_out=b, batch=n, hw=hw, dtype=cfg["dtype"], ms=ms,
                             gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9, status="ok"))
    models = [("bc", 16, 12)] if quick else [("bc", 100, 12), ("densenet121", None, 32)]
    for name, depth, k in models:
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
                row.update(kind="roofline", step_flops=step_flops, step_bytes=nbytes, floor_ms=floor_ms,
                           over_floor=row["step_ms"] / floor_ms)
            rows.append(dict(row, kind="roofline"))
    sync(device)
    return cfg, rows


def peers(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None
          ) -> tuple[dict, list[dict]]:
    """torchvision's and timm's DenseNet-121 (with and without ``memory_efficient``) and effdense's, same
    weights and inputs, in one process: peak memory and step time."""
    cfg = dict(batch=2 if quick else 64, size=64 if quick else 224)
    peers_ = []
    try:
        import torchvision
        peers_ += [("torchvision", lambda me: torchvision.models.densenet121(weights=None, memory_efficient=me))]
    except ImportError:
        pass
    try:
        import timm
        peers_ += [("timm", lambda me: timm.create_model("densenet121", pretrained=False))]
    except ImportError:
        pass
    if not peers_:
        return cfg, [dict(status="skipped: neither torchvision nor timm is importable")]
    rows = []
    torch.manual_seed(0)
    reference = effdense.densenet121().state_dict()
    for label, make in peers_:
        for me in (False, True):
            model = make(me)
            missing = model.load_state_dict(reference, strict=False)
            step = Step(model.to(device), cfg["batch"], cfg["size"], "fp32", device, num_classes=1000)
            step.step()
            rows.append(dict(impl=f"{label}{'-memory_efficient' if me else ''}", status="ok",
                             same_weights=not missing.missing_keys,
                             peak_bytes=measure_step(step.step, device).peak_bytes,
                             step_ms=median_ms(step.step, device, 1, 3 if quick else 20)))
            _free(device)
            if label == "timm":
                break
    for backend in backends:
        if backend == "compile" or backend_unavailable(backend, device, torch.float32):
            continue
        model = effdense.densenet121(backend=backend)
        model.load_state_dict(reference)
        step = Step(model.to(device), cfg["batch"], cfg["size"], "fp32", device, num_classes=1000)
        step.step()
        rows.append(dict(impl=f"effdense-{backend}", status="ok", same_weights=True,
                         peak_bytes=measure_step(step.step, device).peak_bytes,
                         step_ms=median_ms(step.step, device, 1, 3 if quick else 20)))
        _free(device)
    return cfg, rows


SUITES = {"memory": memory, "speed": speed, "capacity": capacity, "kernels": kernels, "peers": peers}
