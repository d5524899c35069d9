"""What every suite shares: the run's environment record, timing, models, and one training step."""
from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch

import effdense
from effdense import backends
from effdense.tools import info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SCHEMA = 1
#: ``compile`` is ``naive`` under ``torch.compile``; the rest are block backends
ALL_BACKENDS = ["naive", "checkpoint", "torch", "cpp", "triton", "compile"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the memory layouts the speed suite runs a model and its input in
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def environment(device: torch.device) -> dict:
    """Device, driver, versions, commit and command of this run (:func:`effdense.tools.info.environment`), with what
    timings depend on: the intra-op threads, the machine's load averages (1, 5, 15 min) at the start, and the
    precision fp32 runs in (cuDNN's and cuBLAS's TF32 flags, the Triton kernels' ``tl.dot`` precision)."""
    env = info.environment(device, [os.path.basename(sys.executable), "-m", "benchmarks", *sys.argv[1:]])
    env.update(threads=torch.get_num_threads(), loadavg=list(os.getloadavg()), precision=precision(),
               session=os.environ.get("EFFDENSE_SESSION"), cpp_cpu=cpp_cpu_build())
    return env


def cpp_cpu_build() -> str | None:
    """The C++ library's CPU code: its manifest's ISA (``avx512``, ``avx2``, ``baseline``) and where
    ``EFFDENSE_CPU_GEMM`` sends the tile GEMMs (``widest`` unless set); None without the library."""
    from effdense import _build, _ext
    if not _ext.available():
        return None
    manifest = _build.read_manifest(_ext.C.__file__) or {}
    return f"{manifest.get('cpu_isa', 'baseline')}, tile GEMM {os.environ.get('EFFDENSE_CPU_GEMM') or 'widest'}"


def precision() -> dict:
    """The TF32 flags and the Triton kernels' fp32 dot precision (``effdense.kernels.precision_record`` where
    the kernels provide it)."""
    record = {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
              "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    try:
        from effdense import kernels
    except ImportError as err:                   # no triton: the flags are the whole record
        return dict(record, triton=f"not importable: {err}")
    if hasattr(kernels, "precision_record"):
        return dict(record, **kernels.precision_record())
    return dict(record, fp32_dot=kernels.dot_precision(torch.float32))


def device_name(env: dict) -> str:
    """The device a result ran on: the GPU's name, or the CPU's model where recorded (older results: the machine)."""
    return env.get("cpu") or env["device"] if env["device_type"] == "cpu" else env["device"]


def device_slug(env: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{env['device_type']}-{env['device']}").strip("-").lower()


def backend_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if name == "compile":
        return None
    if name not in backends.BACKENDS:
        return "not part of this installation"
    why = backends.unavailable_reason(name, device, dtype)
    if why is None and device.type not in backends.BACKENDS[name].auto_devices:
        return f"runs on {device.type} only as a debugging path"
    return why


def build_model(name: str, depth: int | None, growth_rate: int, backend: str, device: torch.device,
                num_classes: int = 10, budget: float | None = None, compile_backend: str = "inductor"
                ) -> torch.nn.Module:
    """``name`` is ``"bc"`` (DenseNet-BC of ``depth``) or an ``effdense.MODELS`` key; ``compile`` is naive under
    :func:`compile_model` (at activation memory ``budget``). Without dropout (``drop_rate=0``, every preset's
    default): below budget 1.0 torch.compile recomputes dropout with fresh randomness (pytorch#190717)."""
    block_backend = "naive" if backend == "compile" else backend
    if name == "bc":
        model = effdense.densenet_cifar(depth=depth, growth_rate=growth_rate, num_classes=num_classes,
                                        backend=block_backend, drop_rate=0.0)
    else:
        model = effdense.MODELS[name](num_classes=num_classes, backend=block_backend, drop_rate=0.0)
    model = model.to(device)
    return compile_model(model, compile_backend, budget) if backend == "compile" else model


def compile_model(model: torch.nn.Module, backend: str = "inductor", budget: float | None = None,
                  **kwargs) -> torch.nn.Module:
    """``torch.compile(model)`` through a backend of its own that partitions the graphs under
    ``torch._functorch.config.activation_memory_budget = budget`` (PyTorch's automatic recomputation: 1.0 saves
    what the min-cut partitioner chooses, lower budgets recompute more; None: the global setting). Its own
    backend, because Dynamo hands a second instance of a module class the graphs compiled for the first
    (compiled under another budget) unless the backend differs."""
    import torch._functorch.config as functorch_config
    if budget is not None and not 0.0 <= budget <= 1.0:
        raise ValueError(f"activation memory budget must be in [0, 1], got {budget}")
    inner = torch._dynamo.lookup_backend(backend)

    def partitioned(gm, example_inputs, **kw):
        if budget is None:
            return inner(gm, example_inputs, **kw)
        with functorch_config.patch(activation_memory_budget=budget):
            return inner(gm, example_inputs, **kw)

    return torch.compile(model, backend=partitioned, **kwargs)


def input_size(name: str) -> int:
    return 32 if name == "bc" or effdense.MODELS[name]().features.conv0.kernel_size == (3, 3) else 224


class Step:
    """Forward, forward+backward, and full SGD step closures on fixed random data."""

    def __init__(self, model: torch.nn.Module, batch: int, size: int, dtype: str, device: torch.device,
                 num_classes: int = 10):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.model, self.device = model, device
        self.x = torch.randn(batch, 3, size, size, generator=g).to(device)
        self.y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        self.amp = DTYPES[dtype] if dtype != "fp32" else None
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def _loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return torch.nn.functional.cross_entropy(self.model(self.x), self.y)

    def forward(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=False)
        return self._loss()

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    def forward_backward(self) -> None:
        self.forward().backward()

    def step(self) -> None:
        self.forward_backward()
        self.opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable, device: torch.device, warmup: int, reps: int,
              setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on GPU, ``perf_counter`` on CPU) after ``warmup`` runs.
    With ``setup``, each call is ``fn(setup())`` and only ``fn`` is timed."""
    def call() -> float:
        arg = setup() if setup is not None else None
        sync(device)
        args = () if setup is None else (arg,)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        call()
    return statistics.median(call() for _ in range(reps))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
