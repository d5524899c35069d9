"""effdense: memory-efficient DenseNets for PyTorch.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so the build sees the PyTorch already
installed: pyproject.toml declares setuptools as the build backend but not torch (an isolated build would
download another PyTorch, gigabytes, and could build against a torch other than the one that runs it).

The C++/CUDA extension ``effdense._C`` (csrc/) is built with ``torch.utils.cpp_extension`` and ninja: the
CPU part always, the CUDA part when PyTorch has CUDA (``torch.version.cuda``) and ``nvcc`` is found. Its
sources and flags are defined once, in effdense/_build.py (``python -m effdense.build_ext`` builds the
same library after an install that went without it; wheels carry the sources in ``effdense/_csrc``). A
successful build writes a manifest beside the library (torch version and git hash, CUDA, commit, sources).
Environment switches:

* ``EFFDENSE_SKIP_EXT=1``: pure Python install (no extension; the ``"cpp"`` backend reports why).
* ``EFFDENSE_CUDA_ARCHS``: CUDA architectures, ``;``- or ``,``-separated (default ``"80;90"``); a ``+PTX``
  suffix (``"90+PTX"``) also embeds PTX for that architecture.
* ``EFFDENSE_NO_CUDA=1``: build the CPU part only, even with a CUDA PyTorch and nvcc.
* ``EFFDENSE_CPU_ISA``: ``auto`` (default: AVX-512 or else AVX2/FMA code, the widest the building CPU has),
  ``avx512``, ``avx2`` or ``baseline`` (plain x86-64, for a library built on one machine and run on another).
* ``EFFDENSE_REQUIRE_EXT=1``: the install fails whenever the extension is not built: PyTorch not importable
  (an isolated build), a failed compile, or ``EFFDENSE_SKIP_EXT=1``. Without it each of these installs the
  package without ``effdense._C``, says so on stderr with the command that builds it afterwards, and a failed
  build is recorded in ``effdense/_C.build-error``.
* ``MAX_JOBS``: parallel compile jobs; when unset, chosen from the CPU cores and ``MemAvailable``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_ERROR_FILE = "_C.build-error"


def _load_build_ext():
    """effdense/_build.py, loaded by path: the package itself cannot be imported before it is installed."""
    spec = importlib.util.spec_from_file_location("_effdense_build", os.path.join(HERE, "effdense", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BX = _load_build_ext()
CSRC = os.path.join(HERE, "csrc")


def _version() -> str:
    with open(os.path.join(HERE, "effdense", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _long_description() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def _no_extension(why: str) -> dict:
    """A build without ``effdense._C``: an error under ``EFFDENSE_REQUIRE_EXT=1``, else a loud notice."""
    if BX.env_flag("EFFDENSE_REQUIRE_EXT"):
        raise SystemExit(f"effdense: EFFDENSE_REQUIRE_EXT=1 but {BX.EXT_NAME} cannot be built: {why}")
    bar = "=" * 100
    msg = (f"effdense: installing WITHOUT the C++/CUDA extension {BX.EXT_NAME}: {why}.\n"
           f"effdense: the 'cpp' backend will be unavailable. Build the extension afterwards with\n"
           f"effdense:     {BX.COMMAND}\n"
           f"effdense: or reinstall with `pip install --no-build-isolation .` (EFFDENSE_REQUIRE_EXT=1 makes "
           f"this an error).")
    print(f"{bar}\n{msg}\n{bar}", file=sys.stderr, flush=True)
    warnings.warn(msg.splitlines()[0])
    return {}


class BuildPy(build_py):
    """Also copies the extension's sources into the wheel (``effdense/_csrc``), so that
    ``python -m effdense.build_ext`` can build it later; an editable install reads the checkout's csrc/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not os.path.isdir(CSRC):
            return
        dest = os.path.join(self.build_lib, "effdense", "_csrc")
        for rel in BX.source_files(CSRC):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            self.copy_file(os.path.join(CSRC, rel), os.path.join(dest, rel))


def _extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for ``effdense._C``, or nothing for a pure Python install."""
    if BX.env_flag("EFFDENSE_SKIP_EXT"):
        return _no_extension("EFFDENSE_SKIP_EXT is set")
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # noqa: BLE001 - no PyTorch at build time: pure Python install
        return _no_extension(f"PyTorch is not importable at build time ({type(err).__name__}: {err}); pip "
                             "builds in an isolated environment unless given --no-build-isolation")

    with_cuda, why = BX.cuda_plan(torch, cpp_extension)
    if why and torch.version.cuda is not None and not BX.env_flag("EFFDENSE_NO_CUDA"):
        warnings.warn(f"effdense: {why}; building the CPU part of {BX.EXT_NAME} only")
    archs = BX.cuda_archs()
    os.environ.setdefault("MAX_JOBS", BX.max_jobs(with_cuda))
    ext = BX.extension(cpp_extension, CSRC, with_cuda, archs, optional=not BX.env_flag("EFFDENSE_REQUIRE_EXT"),
                       rel_to=HERE)
    print(f"effdense: building {BX.EXT_NAME} ({'CPU + CUDA sm_' + ','.join(archs) if with_cuda else 'CPU only'}, "
          f"MAX_JOBS={os.environ['MAX_JOBS']})")

    class BuildExtension(cpp_extension.BuildExtension):
        """An optional extension: a failed build warns and records why in ``effdense/_C.build-error``
        (read by :mod:`effdense._ext`) unless ``EFFDENSE_REQUIRE_EXT=1``; a successful one removes the record
        and writes the library's manifest (read by :mod:`effdense._ext` before it loads the library)."""

        def run(self):
            # setuptools builds into build/ and then copies into the source tree for --inplace and editable
            # installs (it clears self.inplace meanwhile): the error record and the manifest follow the library
            self._to_source = bool(self.inplace)
            super().run()

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            for so in getattr(self, "_manifests", []):
                inplace = os.path.join(HERE, "effdense", os.path.basename(so))
                if os.path.exists(inplace) and os.path.abspath(inplace) != os.path.abspath(so):
                    shutil.copyfile(BX.manifest_path(so), BX.manifest_path(inplace))

        def _records(self, ext) -> list[str]:
            records = [os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_ERROR_FILE)]
            if getattr(self, "_to_source", False):
                records.append(os.path.join(HERE, "effdense", BUILD_ERROR_FILE))
            return records

        def _failed(self, ext, err) -> None:
            """An optional build failed: record why, say so loudly; a required one re-raises."""
            if not ext.optional:
                raise err
            for record in self._records(ext):
                os.makedirs(os.path.dirname(record), exist_ok=True)
                with open(record, "w", encoding="utf-8") as f:
                    f.write(f"building {ext.name} failed: {type(err).__name__}: {err} (the compiler output "
                            "is in the build log: pip install -v --no-build-isolation .)\n")
            _no_extension(f"the build failed ({type(err).__name__}: {err}); the compiler output is above")

        def build_extensions(self):
            # torch checks the compiler here, before any extension is built: a missing or broken compiler is a
            # failed build of the (optional) extension too
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001
                if any(not e.optional for e in self.extensions):
                    raise
                for e in self.extensions:
                    self._failed(e, err)

        def build_extension(self, ext):
            so = self.get_ext_fullpath(ext.name)
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - ninja raises RuntimeError, not a CompileError
                self._failed(ext, err)
                return
            for record in self._records(ext):
                if os.path.exists(record):
                    os.remove(record)
            BX.write_manifest(so, BX.make_manifest(so, CSRC, with_cuda, archs, builder="setup.py"))
            self._manifests = [*getattr(self, "_manifests", []), so]

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


def _kwargs() -> dict:
    kw = _extension_kwargs()
    kw.setdefault("cmdclass", {})["build_py"] = BuildPy
    return kw


setup(
    name="effdense",
    version=_version(),
    description="Memory-efficient DenseNets for PyTorch: linear memory in depth, fused BN-ReLU-Conv kernels",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["effdense", "effdense.*"]),
    # numpy and tqdm: the training command imports them (effdense-train must work after a plain install)
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ['triton>=3.2; platform_system == "Linux"'],
        "digits": ["scikit-learn"],        # --dataset digits (scikit-learn's bundled digits)
        "vision": ["torchvision", "pillow"],  # --dataset folder (a user's image folders, streamed from disk)
        "train": ["scikit-learn"],         # every in-memory dataset of effdense-train
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "export": ["onnx", "onnxscript", "onnxruntime"],  # torch.onnx.export and running its files (tests)
        "test": ["pytest>=7", "pytest-timeout", "scikit-learn", 'triton>=3.2; platform_system == "Linux"', "onnx",
                 "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["effdense-train = effdense.train.run:main", "effdense-eval = effdense.train.eval:main"]},
    zip_safe=False,
    **_kwargs(),
)
