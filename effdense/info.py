"""``python -m effdense.info``: versions, devices, and for each backend whether it can run, or why not."""
from __future__ import annotations

import importlib
import os
import platform

import torch

from . import __version__, backends


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as err:  # noqa: BLE001 - report any import failure as text
        return f"not importable ({type(err).__name__}: {err})"


def devices() -> list[torch.device]:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def report() -> str:
    lines = [
        f"effdense   {__version__}",
        f"python     {platform.python_version()} ({platform.machine()})",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'})",
        f"triton     {_version('triton')}",
        f"tf32       matmul={torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}",
    ]
    from . import _ext
    lines.append("effdense._C " + (("loaded, CUDA kernels" if _ext.has_cuda_kernels() else "loaded, CPU kernels only")
                                   if _ext.available() else _ext.reason()))
    for dev in devices():
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
        lines.append(f"device     {dev}: {name}")
    env = os.environ.get(backends.ENV_VAR)
    lines.append(f"{backends.ENV_VAR}={env!r}" if env else f"{backends.ENV_VAR} unset: 'auto' tries "
                 + " > ".join(backends.AUTO_ORDER))
    lines.append("")
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    header = f"{'backend':<11}{'device':<8}" + "".join(f"{str(d).replace('torch.', ''):<10}" for d in dtypes)
    lines.append(header)
    reasons: dict[str, str] = {}  # reason -> footnote mark
    for name in backends.names():
        for dev in devices():
            cells = []
            for dt in dtypes:
                if name == "auto":
                    try:
                        cells.append(backends.resolve("auto", dev, dt).name)
                    except (RuntimeError, ValueError) as err:   # ValueError: a bad EFFDENSE_BACKEND
                        mark = reasons.setdefault(str(err), f"[{len(reasons) + 1}]")
                        cells.append(f"no {mark}")
                    continue
                why = backends.unavailable_reason(name, dev, dt)
                if why is None:
                    cells.append("yes")
                else:
                    mark = reasons.setdefault(why, f"[{len(reasons) + 1}]")
                    cells.append(f"no {mark}")
            lines.append(f"{name:<11}{dev.type:<8}" + "".join(f"{c:<10}" for c in cells))
    for name in [n for n in backends.AUTO_ORDER if n not in backends.BACKENDS]:
        lines.append(f"{name:<11}not part of this installation")
    for why, mark in reasons.items():
        lines.append(f"{mark} {why}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
