"""effdense: memory-efficient DenseNets for PyTorch.

Install with ``pip install --no-build-isolation .`` so the build sees the PyTorch already installed
(an isolated build would download a new one).

The C++/CUDA extension ``effdense._C`` (csrc/) is built with ``torch.utils.cpp_extension`` and ninja: the
CPU part always, the CUDA part when PyTorch has CUDA (``torch.version.cuda``) and ``nvcc`` is found.
Environment switches:

* ``EFFDENSE_SKIP_EXT=1``: pure Python install (no extension; the ``"cpp"`` backend reports why).
* ``EFFDENSE_CUDA_ARCHS``: CUDA architectures, ``;``- or ``,``-separated (default ``"80;90"``); a ``+PTX``
  suffix (``"90+PTX"``) also embeds PTX for that architecture.
* ``EFFDENSE_NO_CUDA=1``: build the CPU part only, even with a CUDA PyTorch and nvcc.
* ``EFFDENSE_REQUIRE_EXT=1``: a failed extension build fails the install. Without it the failure is a
  warning, the package installs without ``effdense._C`` and ``effdense/_C.build-error`` records why.
* ``MAX_JOBS``: parallel compile jobs; when unset, chosen from the CPU cores and the available memory.
"""
from __future__ import annotations

import os
import re
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "effdense._C"
BUILD_ERROR_FILE = "_C.build-error"

def _sources(pattern: str) -> list[str]:
    """The project's sources matching ``pattern`` (relative paths, sorted: a stable build order)."""
    import glob
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


#: C++ sources of the CPU part (every csrc/*.cpp but the CUDA glue csrc/cuda_*.cpp), and of the CUDA part
CPU_SOURCES = [s for s in _sources("csrc/*.cpp") if not os.path.basename(s).startswith("cuda_")]
CUDA_SOURCES = _sources("csrc/cuda_*.cpp") + _sources("csrc/cuda/*.cu")


def _version() -> str:
    with open(os.path.join(HERE, "effdense", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _long_description() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_arch_flags() -> list[str]:
    """nvcc ``-gencode`` flags for ``EFFDENSE_CUDA_ARCHS`` (default ``"80;90"``)."""
    flags = []
    for arch in re.split(r"[;,\s]+", os.environ.get("EFFDENSE_CUDA_ARCHS", "80;90").strip()):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "").removeprefix("sm_")
        if not num.isdigit():
            raise ValueError(f"EFFDENSE_CUDA_ARCHS: cannot read architecture {arch!r} (expected e.g. 80;90)")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def _max_jobs(with_cuda: bool) -> str:
    """Parallel compile jobs when ``MAX_JOBS`` is unset: one per usable core for the C++ sources, half the
    cores with CUDA (nvcc runs several processes per job, as in flash-attention's setup.py), and never more
    than the available memory allows (about 1.5 GiB per g++ job, 4 GiB per nvcc job)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    jobs = max(1, cores // 2 if with_cuda else cores)
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        jobs = max(1, min(jobs, int(free_gib / (4 if with_cuda else 1.5))))
    except (ValueError, OSError, AttributeError):
        pass
    return str(jobs)


def _extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for ``effdense._C``, or nothing for a pure Python install."""
    if _env_flag("EFFDENSE_SKIP_EXT"):
        print("effdense: EFFDENSE_SKIP_EXT is set, installing without the C++/CUDA extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # noqa: BLE001 - no PyTorch at build time: pure Python install
        warnings.warn(f"effdense: PyTorch is not importable ({err}); installing without {EXT_NAME}. "
                      "Install with `pip install --no-build-isolation .` so the build sees PyTorch.")
        return {}

    sources = list(CPU_SOURCES)
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    wants_cuda = torch.version.cuda is not None and not _env_flag("EFFDENSE_NO_CUDA")
    with_cuda = wants_cuda and nvcc is not None and os.path.exists(nvcc)
    if wants_cuda and not with_cuda:
        warnings.warn(f"effdense: PyTorch has CUDA but nvcc was not found (set CUDA_HOME); building the CPU "
                      f"part of {EXT_NAME} only")
    os.environ.setdefault("MAX_JOBS", _max_jobs(with_cuda))
    cxx = ["-O3", "-Wall", "-Wno-unused-function"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for is OpenMP-backed in PyTorch's Linux wheels
        link.append("-fopenmp")
    extra = {"cxx": cxx}
    macros = []
    if with_cuda:
        sources += CUDA_SOURCES
        macros.append(("WITH_CUDA", None))
        cxx.append("-DWITH_CUDA")
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DWITH_CUDA", *_cuda_arch_flags()]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    # depends: rebuild on header changes, and ship every source (CUDA ones too) in an sdist
    depends = [f for f in (*_sources("csrc/*.h"), *_sources("csrc/cuda/*.h"), *CUDA_SOURCES) if f not in sources]
    ext = ext_cls(EXT_NAME, sources, extra_compile_args=extra, extra_link_args=link, define_macros=macros,
                  depends=depends, optional=not _env_flag("EFFDENSE_REQUIRE_EXT"))
    print(f"effdense: building {EXT_NAME} ({'CPU + CUDA' if with_cuda else 'CPU only'}, "
          f"MAX_JOBS={os.environ['MAX_JOBS']})")

    class BuildExtension(cpp_extension.BuildExtension):
        """An optional extension: a failed build warns and records why in ``effdense/_C.build-error``
        (read by :mod:`effdense._ext`) unless ``EFFDENSE_REQUIRE_EXT=1``; a successful one removes the record."""

        def build_extension(self, ext):
            record = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_ERROR_FILE)
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - ninja raises RuntimeError, not a CompileError
                if not ext.optional:
                    raise
                os.makedirs(os.path.dirname(record), exist_ok=True)
                with open(record, "w", encoding="utf-8") as f:
                    f.write(f"building {ext.name} failed: {type(err).__name__}: {err} (the compiler output is in "
                            "the build log: pip install -v --no-build-isolation .)\n")
                self.warn(f"building extension {ext.name!r} failed ({err}); installing without it "
                          "(set EFFDENSE_REQUIRE_EXT=1 to make this an error)")
                return
            if os.path.exists(record):
                os.remove(record)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="effdense",
    version=_version(),
    description="Memory-efficient DenseNets for PyTorch: linear memory in depth, fused BN-ReLU-Conv kernels",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["effdense", "effdense.*"]),
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ['triton>=3.2; platform_system == "Linux"'],
        "train": ["tqdm", "scikit-learn"],
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "test": ["pytest>=7", "pytest-timeout", "numpy", "tqdm", "scikit-learn",
                 'triton>=3.2; platform_system == "Linux"'],
    },
    entry_points={"console_scripts": ["effdense-train = effdense.train:main", "effdense-eval = effdense.eval:main"]},
    zip_safe=False,
    **_extension_kwargs(),
)
