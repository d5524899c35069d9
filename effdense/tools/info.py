"""``python -m effdense.info``: versions, devices, and for each backend whether it can run, or why not; and
:func:`environment`, the record of device, versions and commit stored beside every result (training logs,
benchmarks)."""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence

import torch

from .. import __version__, backends

#: the checkout this package runs from, when it runs from one (an editable install or the source tree)
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as err:  # noqa: BLE001 - report any import failure as text
        return f"not importable ({type(err).__name__}: {err})"


def _git(*args: str) -> str | None:
    if not os.path.exists(os.path.join(SOURCE_ROOT, ".git")):
        return None
    try:
        return subprocess.run(["git", *args], cwd=SOURCE_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` says: CPU timings and the
    data loader's throughput depend on it, whatever the device."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, command: Sequence[str] | None = None) -> dict:
    """What a recorded result needs beside it: device, driver, versions, git commit, the command (default: this
    process's ``sys.argv``) and the time. The commit is ``$EFFDENSE_COMMIT`` where set (a copy of a checkout
    without its ``.git``, e.g. on a remote GPU machine), else ``git rev-parse HEAD``, else None; ``dirty``
    (uncommitted changes to tracked files) is None where git cannot tell."""
    triton = _version("triton")
    commit, dirty = os.environ.get("EFFDENSE_COMMIT"), None
    if not commit:
        commit = _git("rev-parse", "HEAD")
        dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
    env = {
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                   platform.machine()),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None if triton.startswith("not importable") else triton,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "effdense": __version__,
        "commit": commit,
        "dirty": dirty,
        "command": " ".join(shlex.quote(a) for a in (command if command is not None else
                                                     [os.path.basename(sys.executable), *sys.argv])),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "threads": torch.get_num_threads(),           # what CPU timings depend on, with the machine's load
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(total_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", driver=_nvidia_driver())
    return env


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
    from .. import _ext
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
