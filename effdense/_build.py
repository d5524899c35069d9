"""How ``effdense._C`` is built, found and matched to the running PyTorch: the extension's sources and flags
(shared by setup.py and ``python -m effdense.build_ext``), the manifest written beside every library, and the
build itself. See :mod:`effdense.build_ext` (the command) and :mod:`effdense._ext` (loading).

Imports only the standard library at module level: ``setup.py`` loads this file by path, before the package is
importable, so an install and a later build agree on sources and flags.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.machinery
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

EXT_NAME = "effdense._C"
COMMAND = "python -m effdense.build_ext"
PKG_DIR = os.path.dirname(os.path.abspath(__file__))
#: default CUDA architectures (A100, H100/H200); EFFDENSE_CUDA_ARCHS overrides
DEFAULT_ARCHS = "80;90"
#: the manifest fields that must match for a library to load: its ABI (a mismatch can crash, not only fail)
ABI_KEYS = ("python", "torch", "torch_git", "cuda")
_SOURCE_EXTS = (".cpp", ".h", ".cu", ".cuh")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------------------ sources

def find_csrc(pkg_dir: str = PKG_DIR) -> str | None:
    """The extension's source folder: the checkout's ``csrc/`` beside the package, else the wheel's copy."""
    for cand in (os.path.join(os.path.dirname(pkg_dir), "csrc"), os.path.join(pkg_dir, "_csrc")):
        if os.path.isfile(os.path.join(cand, "ops.cpp")):
            return cand
    return None


def source_files(csrc: str) -> list[str]:
    """Every source and header under ``csrc`` (relative paths, sorted): what the digest and a wheel cover."""
    out = []
    for root, _, files in os.walk(csrc):
        out += [os.path.relpath(os.path.join(root, f), csrc) for f in files if f.endswith(_SOURCE_EXTS)]
    return sorted(p.replace(os.sep, "/") for p in out)


def sources(csrc: str, with_cuda: bool) -> tuple[list[str], list[str]]:
    """(compiled sources, other dependencies) relative to ``csrc``: the op boundary ``*.cpp`` and the CPU kernels
    ``cpu/*.cpp``, plus with CUDA the kernels ``cuda/*.cu`` and their torch glue ``cuda/*.cpp``. Headers (and CUDA
    files in a CPU build) are dependencies: a change rebuilds, and an sdist ships them."""
    files = source_files(csrc)
    cpu = [f for f in files if f.endswith(".cpp") and ("/" not in f or f.startswith("cpu/"))]
    cuda = [f for f in files if f.startswith("cuda/") and f.endswith((".cpp", ".cu"))]
    compiled = cpu + (cuda if with_cuda else [])
    return compiled, [f for f in files if f not in compiled]


def sources_digest(csrc: str) -> str:
    """sha256 over the relative paths and contents of every source and header (the manifest's ``sources``)."""
    h = hashlib.sha256()
    for rel in source_files(csrc):
        with open(os.path.join(csrc, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]


def git_commit(root: str) -> str | None:
    """``EFFDENSE_BUILD_COMMIT`` when set (the build check builds a copy without .git), else the checkout's
    short commit with ``+dirty`` when ``csrc/`` has uncommitted changes; None outside a git checkout."""
    if os.environ.get("EFFDENSE_BUILD_COMMIT"):
        return os.environ["EFFDENSE_BUILD_COMMIT"]
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        run = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=20)
        head = run("rev-parse", "--short=10", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--", "csrc").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


# -------------------------------------------------------------------------------------------------- flags

def cuda_archs(spec: str | None = None) -> list[str]:
    """``"80;90+PTX"`` (``;``/``,``/space separated, ``sm_`` and dots allowed) -> ``["80", "90+PTX"]``."""
    spec = spec if spec is not None else os.environ.get("EFFDENSE_CUDA_ARCHS", DEFAULT_ARCHS)
    out = []
    for arch in re.split(r"[;,\s]+", spec.strip()):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "").removeprefix("sm_")
        if not num.isdigit():
            raise ValueError(f"EFFDENSE_CUDA_ARCHS: cannot read architecture {arch!r} (expected e.g. 80;90)")
        out.append(num + ("+PTX" if ptx else ""))
    return out


def cuda_arch_flags(archs: list[str]) -> list[str]:
    """nvcc ``-gencode`` flags: a cubin per architecture, plus PTX for those marked ``+PTX``."""
    flags = []
    for arch in archs:
        num = arch.removesuffix("+PTX")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if arch.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def mem_available_gib() -> float | None:
    """``MemAvailable`` of /proc/meminfo: free memory plus the reclaimable page cache. (``SC_AVPHYS_PAGES``
    counts free pages only, 6.6 GiB where 17.9 GiB were available, and starved the build of jobs.)"""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def max_jobs(with_cuda: bool) -> str:
    """Parallel compile jobs when ``MAX_JOBS`` is unset: one per usable core for the C++ sources, half the
    cores with CUDA (nvcc runs several processes per job, as in flash-attention's setup.py), and never more
    than the available memory allows (about 1.5 GiB per g++ job, 4 GiB per nvcc job)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    jobs = max(1, cores // 2 if with_cuda else cores)
    avail = mem_available_gib()
    if avail is not None:
        jobs = max(1, min(jobs, int(avail / (4 if with_cuda else 1.5))))
    return str(jobs)


#: ``EFFDENSE_CPU_ISA`` values: the x86-64 instruction-set extensions the C++ code may use, the compiler flags
#: that allow them and the /proc/cpuinfo flags a CPU needs to run the library. The library is built on the machine
#: that runs it (pip builds from source), so ``auto`` takes what the building CPU has, like DeepSpeed's op builder
#: (its CPU ops use the building machine's SIMD width); the manifest records the choice and a CPU without it gets
#: a clear refusal instead of an illegal instruction. ``-ffp-contract=fast`` lets a*b+c become one FMA (ISO C++
#: modes turn that off): the tiled BN-ReLU and statistics loops are mostly that. ``avx512`` (AVX-512F on top) gives
#: the tile GEMMs 512-bit register tiles (csrc/cpu/gemm.h); the README's CPU speed figures are from such a build.
CPU_ISAS = {"baseline": ([], ()),
            "avx2": (["-mavx2", "-mfma", "-mf16c", "-ffp-contract=fast"], ("avx2", "fma", "f16c")),
            "avx512": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-ffp-contract=fast"],
                       ("avx2", "fma", "f16c", "avx512f"))}


def cpu_flags() -> set[str]:
    """The running CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(spec: str | None = None) -> str:
    """The ``CPU_ISAS`` entry to build for: ``EFFDENSE_CPU_ISA`` (``auto``, ``avx512``, ``avx2`` or ``baseline``),
    by default ``auto``: the widest of ``avx512`` and ``avx2`` whose flags an x86-64 CPU has all of, else
    ``baseline``."""
    spec = (spec if spec is not None else os.environ.get("EFFDENSE_CPU_ISA", "auto")).strip().lower()
    if spec == "auto":
        if platform.machine().lower() in ("x86_64", "amd64"):
            have = cpu_flags()
            for isa in ("avx512", "avx2"):
                if set(CPU_ISAS[isa][1]) <= have:
                    return isa
        return "baseline"
    if spec not in CPU_ISAS:
        raise ValueError(f"EFFDENSE_CPU_ISA: expected auto, {', '.join(CPU_ISAS)}, got {spec!r}")
    return spec


def compile_args(with_cuda: bool, archs: list[str], isa: str | None = None) -> dict:
    """``extra_compile_args``/``extra_link_args``/``define_macros`` of the extension."""
    cxx = ["-O3", "-Wall", "-Wno-unused-function", *CPU_ISAS[isa or cpu_isa()][0]]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for is OpenMP-backed in PyTorch's Linux wheels; cpu/bn.cpp: omp simd
        link.append("-fopenmp")
    extra = {"cxx": cxx}
    macros = []
    if with_cuda:
        macros.append(("WITH_CUDA", None))
        cxx.append("-DWITH_CUDA")
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DWITH_CUDA", *cuda_arch_flags(archs)]
    return {"extra_compile_args": extra, "extra_link_args": link, "define_macros": macros}


def cuda_plan(torch, cpp_extension, cuda: bool | None = None) -> tuple[bool, str]:
    """(build the CUDA part?, why not). ``cuda``: None = when PyTorch has CUDA and nvcc is found (unless
    ``EFFDENSE_NO_CUDA=1``), False = never, True = required (an error when impossible)."""
    if cuda is False or (cuda is None and env_flag("EFFDENSE_NO_CUDA")):
        return False, "CPU part only requested"
    if torch.version.cuda is None:
        why = f"PyTorch {torch.__version__} has no CUDA"
    else:
        home = cpp_extension.CUDA_HOME
        nvcc = os.path.join(home, "bin", "nvcc") if home else None
        if nvcc and os.path.exists(nvcc):
            return True, ""
        why = f"PyTorch has CUDA {torch.version.cuda} but nvcc was not found (set CUDA_HOME)"
    if cuda:
        raise RuntimeError(f"effdense: a CUDA build was requested but {why}")
    return False, why


def extension(cpp_extension, csrc: str, with_cuda: bool, archs: list[str], *, optional: bool = False,
              rel_to: str | None = None):
    """The ``effdense._C`` Extension. Source paths are relative to ``rel_to`` when given (setup.py needs
    relative paths for an sdist), else absolute."""
    compiled, depends = sources(csrc, with_cuda)
    base = os.path.relpath(csrc, rel_to) if rel_to else csrc
    path = lambda f: os.path.join(base, f)
    cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return cls(EXT_NAME, [path(f) for f in compiled], depends=[path(f) for f in depends], optional=optional,
               **compile_args(with_cuda, archs))


# ------------------------------------------------------------------------------------------------ manifest

def manifest_path(so_path: str) -> str:
    """``.../_C.cpython-312-x86_64-linux-gnu.so`` -> ``.../_C.cpython-312-x86_64-linux-gnu.manifest.json``."""
    return so_path.removesuffix(".so") + ".manifest.json"


def python_tag() -> str:
    return f"cp{sys.version_info[0]}{sys.version_info[1]}"


def torch_abi() -> dict:
    """The running interpreter's and PyTorch's ABI: what a library's manifest must match."""
    import torch
    return {"python": python_tag(), "torch": torch.__version__,
            "torch_git": torch.version.git_version, "cuda": torch.version.cuda}


def make_manifest(so_path: str, csrc: str, with_cuda: bool, archs: list[str], builder: str) -> dict:
    nvcc = None
    if with_cuda:
        from torch.utils import cpp_extension
        try:
            out = subprocess.run([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
                                 capture_output=True, text=True, timeout=60).stdout
            nvcc = (re.findall(r"V(\d[\d.]*)", out) or [None])[-1]
        except (OSError, subprocess.SubprocessError):
            pass
    return {"file": os.path.basename(so_path), **torch_abi(), "with_cuda": with_cuda,
            "cuda_archs": archs if with_cuda else [], "nvcc": nvcc, "cpu_isa": cpu_isa(),
            "commit": git_commit(os.path.dirname(csrc)), "sources": sources_digest(csrc), "builder": builder,
            "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_manifest(so_path: str, manifest: dict) -> str:
    path = manifest_path(so_path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(so_path: str) -> dict | None:
    """The manifest beside ``so_path``; None when there is none; ``{"unreadable": why}`` when it is broken."""
    try:
        with open(manifest_path(so_path), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {"unreadable": "not a JSON object"}
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"unreadable": str(err)}


def describe(m: dict) -> str:
    """``torch 2.11.0+cu130 (git 70d99e998b) for cp312, CUDA 13.0 sm_90, sources 1a2b.., commit 33e5c6b``."""
    cuda = f"CUDA {m.get('cuda')}" + (" sm_" + ",".join(m["cuda_archs"]) if m.get("with_cuda") else " (CPU part only)")
    return (f"torch {m.get('torch')} (git {str(m.get('torch_git'))[:10]}) for {m.get('python')}, {cuda}, "
            f"CPU {m.get('cpu_isa', 'baseline')}, sources {m.get('sources')}, commit {m.get('commit') or '?'}")


def compare(manifest: dict, abi: dict | None = None, csrc: str | None = None,
            gpu_archs: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(ABI differences, staleness) of a library's manifest against this environment, one line each.

    ABI differences (Python tag, torch version or git hash, CUDA version) make loading unsafe. Staleness:
    sources that differ from ``csrc``, or a GPU of this machine that the library has no code for."""
    if "unreadable" in manifest:
        return [f"its manifest is unreadable ({manifest['unreadable']})"], []
    abi = abi or torch_abi()
    diff = [f"{k} {manifest.get(k)!s} (built) vs {abi[k]!s} (here)" for k in ABI_KEYS if manifest.get(k) != abi[k]]
    isa = manifest.get("cpu_isa", "baseline")
    missing = sorted(set(CPU_ISAS[isa][1]) - cpu_flags()) if isa in CPU_ISAS else [f"unknown ISA {isa!r}"]
    if missing:
        diff.append(f"cpu_isa {isa} (built) needs CPU flags {', '.join(missing)} that this CPU lacks "
                    "(rebuild here, or with EFFDENSE_CPU_ISA=baseline)")
    stale = []
    if csrc is not None and manifest.get("sources") != sources_digest(csrc):
        stale.append(f"built from other sources ({manifest.get('sources')}, commit {manifest.get('commit') or '?'}) "
                     f"than {csrc} ({sources_digest(csrc)})")
    built = {a.removesuffix("+PTX") for a in manifest.get("cuda_archs", [])}
    ptx = [int(a.removesuffix("+PTX")) for a in manifest.get("cuda_archs", []) if a.endswith("+PTX")]
    for arch in gpu_archs or []:
        if arch not in built and not any(p <= int(arch) for p in ptx):
            stale.append(f"no code for this machine's GPU (sm_{arch})"
                         + ("" if manifest.get("with_cuda") else ": built without CUDA"))
    return diff, stale


def local_gpu_archs() -> list[str]:
    """Compute capabilities of the visible GPUs (``["90"]`` on an H100/H200); empty without a GPU."""
    import torch
    if not torch.cuda.is_available():
        return []
    return sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


# ------------------------------------------------------------------------------------------------- builds

def cache_dir() -> str:
    """The per-ABI folder of the torch extensions cache used when the package directory is read-only."""
    import torch
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "torch_extensions")
    tag = f"{python_tag()}-torch{torch.__version__}-{torch.version.git_version[:10]}"
    return os.path.join(base, "effdense", tag)


def library_name() -> str:
    return "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]


def default_dest() -> str:
    return PKG_DIR if os.access(PKG_DIR, os.W_OK) else cache_dir()


def build(dest: str | None = None, *, csrc: str | None = None, cuda: bool | None = None,
          archs: list[str] | None = None, jobs: str | None = None, build_temp: str | None = None,
          builder: str = COMMAND) -> str:
    """Compile ``effdense._C`` into ``dest`` (default: the package directory if writable, else
    :func:`cache_dir`) with its manifest; returns the library's path. The library is moved into place only
    once complete, so a failed or interrupted build leaves the previous one."""
    import torch
    from setuptools import Distribution
    from torch.utils import cpp_extension

    csrc = csrc or find_csrc()
    if csrc is None:
        raise RuntimeError(f"effdense: the extension's sources are missing (neither {os.path.dirname(PKG_DIR)}/csrc "
                           f"nor {PKG_DIR}/_csrc exists): reinstall effdense from a wheel or a checkout")
    with_cuda, why = cuda_plan(torch, cpp_extension, cuda)
    if archs is None:
        archs = cuda_archs(os.environ["EFFDENSE_CUDA_ARCHS"]) if "EFFDENSE_CUDA_ARCHS" in os.environ else (
            local_gpu_archs() or cuda_archs(DEFAULT_ARCHS))  # a GPU machine builds for its own GPUs only
    dest = dest or default_dest()
    os.makedirs(dest, exist_ok=True)
    build_temp = build_temp or os.path.join(cache_dir(), "build-" + ("cuda" if with_cuda else "cpu"))
    jobs = jobs or os.environ.get("MAX_JOBS") or max_jobs(with_cuda)
    print(f"effdense: building {EXT_NAME} ({'CPU + CUDA sm_' + ','.join(archs) if with_cuda else 'CPU only: ' + why}, "
          f"MAX_JOBS={jobs}) from {csrc} into {dest}", flush=True)
    ext = extension(cpp_extension, csrc, with_cuda, archs)
    dist = Distribution({"name": "effdense", "ext_modules": [ext], "script_name": "effdense.build_ext",
                         "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(
                             use_ninja=shutil.which("ninja") is not None)}})
    old_jobs = os.environ.get("MAX_JOBS")
    os.environ["MAX_JOBS"] = str(jobs)
    try:
        with tempfile.TemporaryDirectory(prefix="effdense-build-", dir=dest) as lib:
            cmd = dist.get_command_obj("build_ext")
            cmd.build_lib, cmd.build_temp, cmd.inplace = lib, build_temp, 0
            dist.run_command("build_ext")
            built = cmd.get_ext_fullpath(EXT_NAME)
            target = os.path.join(dest, os.path.basename(built))
            manifest = make_manifest(target, csrc, with_cuda, archs, builder)
            os.replace(built, target)
            write_manifest(target, manifest)
    finally:
        if old_jobs is None:
            os.environ.pop("MAX_JOBS", None)
        else:
            os.environ["MAX_JOBS"] = old_jobs
    error_record = os.path.join(dest, "_C.build-error")
    if os.path.exists(error_record):
        os.remove(error_record)
    print(f"effdense: built {target}: {describe(manifest)}", flush=True)
    return target


def library_in(folder: str) -> str | None:
    """The ``_C`` library of ``folder`` that Python's import would pick (by extension-suffix order), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def installed_library() -> str | None:
    """The library :mod:`effdense._ext` loads: the package's, else the cache's (where a read-only package's
    rebuild goes), the first whose manifest matches this PyTorch (or that has none); else the first found;
    None when neither folder has one."""
    found = [p for p in (library_in(PKG_DIR), library_in(cache_dir())) if p]
    for path in found:
        manifest = read_manifest(path)
        if manifest is None or not compare(manifest)[0]:
            return path
    return found[0] if found else None


def needs_build(so_path: str | None, csrc: str | None, cuda: bool | None = None) -> list[str]:
    """Why ``so_path`` must be rebuilt here (empty: it can be used as it is)."""
    if so_path is None:
        return [f"no {EXT_NAME} library in {PKG_DIR} or {cache_dir()}"]
    manifest = read_manifest(so_path)
    if manifest is None:
        return [f"{so_path} has no manifest (built by an older setup.py?)"]
    diff, stale = compare(manifest, csrc=csrc, gpu_archs=local_gpu_archs())
    why = diff + stale
    import torch
    from torch.utils import cpp_extension
    want_cuda = cuda_plan(torch, cpp_extension, cuda)[0]
    if want_cuda and not manifest.get("with_cuda"):
        why.append("built without CUDA, and a CUDA build is possible here")
    if cuda is False and manifest.get("with_cuda"):
        why.append("built with CUDA, and --cpu was asked")
    return why


def ensure(force: bool = False, **kw) -> str:
    """Keep the installed library when it matches this environment (saying so), else rebuild (saying why)."""
    so = library_in(kw["dest"]) if kw.get("dest") else installed_library()
    csrc = kw.get("csrc") or find_csrc()
    why = ["--force"] if force else needs_build(so, csrc, kw.get("cuda"))
    if not why:
        print(f"effdense: using the prebuilt {so}: it matches this environment: {describe(read_manifest(so))}")
        return so
    print(f"effdense: {'re' if so else ''}building {EXT_NAME}: " + "; ".join(why), flush=True)
    return build(**kw)
