"""Packaging: the metadata (install_requires, extras, license), the sdist's contents, an install that cannot
lose the extension silently (``EFFDENSE_REQUIRE_EXT=1`` fails without torch and on a failed compile; without
it the build says so and names ``python -m effdense.build_ext``), that command afterwards (one compile, slow),
and the manifest check of :mod:`effdense._ext` (a library for another PyTorch is not loaded).

The CUDA wheel (``pip wheel --no-build-isolation`` with the CUDA part) is built and tested by
csrc/cuda_build_check.sh in CI, the editable install by .ci/run itself."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

import effdense
from effdense import _build as build_ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMAND = "python -m effdense.build_ext"

if not os.path.exists(os.path.join(ROOT, "setup.py")):
    pytest.skip("setup.py is not in this checkout (installed package only)", allow_module_level=True)


def _copy_tree(dest: str) -> str:
    """The project's sources (no build outputs, libraries or VCS data) copied to ``dest``."""
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.manifest.json",
                                  "_C.build-error", ".pytest_cache", ".benchmarks", "results", "runs", ".venv*")
    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


def _run(cmd, cwd, env=None, timeout=900):
    full = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})}
    for var in ("EFFDENSE_REQUIRE_EXT", "EFFDENSE_SKIP_EXT", "EFFDENSE_AUTO_BUILD"):
        if var not in (env or {}):
            full.pop(var, None)
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def test_metadata_requires_extras_license(tmp_path):
    p = _run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path)], ROOT, {"EFFDENSE_SKIP_EXT": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    info = tmp_path / "effdense.egg-info"
    requires = (info / "requires.txt").read_text()
    core = requires.split("\n[")[0].split()
    assert {"numpy", "tqdm"} <= set(core) and any(r.startswith("torch") for r in core), requires
    assert "[digits]\nscikit-learn" in requires and "[train]\nscikit-learn" in requires, requires
    pkg_info = (info / "PKG-INFO").read_text()
    assert "BSD-3-Clause" in pkg_info
    license_text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert license_text.startswith("BSD 3-Clause License") and "the effdense authors" in license_text
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        system = tomllib.load(f)["build-system"]
    assert system["build-backend"] == "setuptools.build_meta" and not any("torch" in r for r in system["requires"])


def test_sdist_ships_tests_sources_and_license(tmp_path):
    src = _copy_tree(str(tmp_path / "src"))
    p = _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], src, {"EFFDENSE_SKIP_EXT": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    (tarball,) = (tmp_path / "dist").glob("effdense-*.tar.gz")
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    want = {"LICENSE", "pyproject.toml", "setup.py", "MANIFEST.in", "pytest.ini", "README.md", "tests/conftest.py",
            "tests/utils.py", "tests/fixtures/torchvision_densenet121_keys.json", "benchmarks/__init__.py",
            "effdense/build_ext.py", "effdense/_build.py", "csrc/cuda_build_check.sh", "csrc/check_compile.py"}
    want |= {f"csrc/{f}" for f in build_ext.source_files(os.path.join(ROOT, "csrc"))}
    want |= {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "tests", "fixtures"))
             for f in fs}
    assert not want - names, sorted(want - names)
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n]


def _fake_torchless(tmp_path) -> dict:
    """An environment in which ``import torch`` fails, as in an isolated build."""
    shim = tmp_path / "no_torch"
    (shim / "torch").mkdir(parents=True)
    (shim / "torch" / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    return {"PYTHONPATH": str(shim)}


def test_build_without_torch_is_loud_and_fails_with_require_ext(tmp_path):
    env = _fake_torchless(tmp_path)
    p = _run([sys.executable, "setup.py", "--version"], ROOT, env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "WITHOUT the C++/CUDA extension" in p.stderr and COMMAND in p.stderr, p.stderr
    assert "PyTorch is not importable" in p.stderr and "--no-build-isolation" in p.stderr
    p = _run([sys.executable, "setup.py", "--version"], ROOT, {**env, "EFFDENSE_REQUIRE_EXT": "1"})
    assert p.returncode != 0 and "EFFDENSE_REQUIRE_EXT=1" in p.stderr and "PyTorch is not importable" in p.stderr
    p = _run([sys.executable, "setup.py", "--version"], ROOT, {"EFFDENSE_SKIP_EXT": "1", "EFFDENSE_REQUIRE_EXT": "1"})
    assert p.returncode != 0 and "EFFDENSE_SKIP_EXT" in p.stderr


def test_failed_compile_fails_with_require_ext_and_is_recorded_without(tmp_path):
    """A compiler that refuses every source (but answers --version, as torch checks) stands for a broken
    compile: nothing is compiled, so this is fast. A compiler that does not even run fails the same way."""
    fake = tmp_path / "fakecc"
    fake.write_text('#!/bin/sh\ncase " $* " in *" --version "*|*" -v "*) exec c++ "$@" ;; esac\n'
                    'echo "fakecc: error: refusing to compile" >&2\nexit 1\n')
    fake.chmod(0o755)
    args = [sys.executable, "setup.py", "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp")]
    record = tmp_path / "lib" / "effdense" / "_C.build-error"
    for cc in (str(fake), "false"):
        env = {"CC": cc, "CXX": cc, "MAX_JOBS": "1", "EFFDENSE_NO_CUDA": "1"}
        p = _run(args, ROOT, {**env, "EFFDENSE_REQUIRE_EXT": "1"})
        assert p.returncode != 0, p.stdout[-2000:]
        assert not list((tmp_path / "lib").glob("effdense/_C*.so"))
        p = _run(args, ROOT, env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert record.exists() and record.read_text().startswith("building effdense._C failed"), cc
        assert "WITHOUT the C++/CUDA extension" in p.stderr and COMMAND in p.stderr
        record.unlink()


def test_max_jobs_reads_memavailable(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    # the page cache counts: MemAvailable 18 GiB where MemFree is 6.5 GiB
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         6815744 kB\n"
                       "MemAvailable:   18874368 kB\nBuffers:          100000 kB\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(meminfo if f == "/proc/meminfo" else f, *a, **k))
    assert build_ext.mem_available_gib() == pytest.approx(18.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert build_ext.max_jobs(with_cuda=False) == "12"   # min(16 cores, 18 / 1.5 GiB)
    assert build_ext.max_jobs(with_cuda=True) == "4"     # min(8, 18 / 4 GiB)


def _write_fake_library(folder, manifest: dict | None) -> str:
    so = os.path.join(folder, build_ext.library_name())
    with open(so, "wb") as f:
        f.write(b"\x7fELF not a real library")
    if manifest is not None:
        build_ext.write_manifest(so, manifest)
    return so


def _ext_in_copy(tmp_path, manifest: dict | None, env: dict | None = None):
    """Import effdense from a copy of the package holding a fake library (with ``manifest``): the reasons of
    effdense._ext and of the cpp backend (and stderr, as a third item)."""
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(effdense.__file__), site / "effdense",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.manifest.json", "_C.build-error"))
    _write_fake_library(str(site / "effdense"), manifest)
    code = ("import json; from effdense import _ext; from effdense.backends import unavailable_reason; "
            "print(json.dumps([_ext.reason(), unavailable_reason('cpp', 'cpu')]))")
    env = {"PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), **(env or {})}
    p = _run([sys.executable, "-c", code], str(tmp_path), env)
    assert p.returncode == 0, p.stderr[-3000:]
    return [*json.loads(p.stdout.strip().splitlines()[-1]), p.stderr]


def test_library_for_another_torch_is_not_loaded(tmp_path):
    other = "2.9.1+cu128" if torch.__version__.startswith("2.11.0") else "2.11.0+cu130"  # never the running one
    manifest = {**build_ext.torch_abi(), "torch": other, "torch_git": "70d99e998b49", "cuda": "13.0",
                "with_cuda": True, "cuda_archs": ["90"], "sources": "0", "commit": "abc"}
    reason, backend_reason, _ = _ext_in_copy(tmp_path / "a", manifest)
    assert reason == backend_reason
    assert reason.startswith("effdense._C not loaded") and "built for another PyTorch" in reason, reason
    assert f"torch {other} (built) vs" in reason and COMMAND in reason, reason
    # EFFDENSE_AUTO_BUILD=1 rebuilds instead, saying why (here it fails at once: the copy has no sources)
    reason, _, err = _ext_in_copy(tmp_path / "b", manifest, {"EFFDENSE_AUTO_BUILD": "1"})
    assert "EFFDENSE_AUTO_BUILD=1: building effdense._C" in err and "built for another PyTorch" in err, err
    assert reason.startswith("effdense._C failed to load") and "sources are missing" in reason, reason


def test_missing_library_reason_names_the_command(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(effdense.__file__), site / "effdense",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.manifest.json", "_C.build-error"))
    code = "from effdense.backends import unavailable_reason; print(unavailable_reason('cpp', 'cpu'))"
    p = _run([sys.executable, "-c", code], str(tmp_path), {"PYTHONPATH": str(site),
                                                            "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("effdense._C not built") and COMMAND in p.stdout, p.stdout


def test_manifest_compare_abi_and_staleness(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    abi = {"python": "cp312", "torch": "2.11.0+cu130", "torch_git": "70d99e998b49", "cuda": "13.0"}
    m = {**abi, "sources": build_ext.sources_digest(str(csrc)), "with_cuda": True, "cuda_archs": ["90"]}
    assert build_ext.compare(m, abi, str(csrc), ["90"]) == ([], [])
    diff, stale = build_ext.compare({**m, "torch_git": "0123"}, abi, str(csrc))
    assert len(diff) == 1 and diff[0].startswith("torch_git 0123 (built)") and not stale
    (csrc / "ops.cpp").write_text((csrc / "ops.cpp").read_text() + "// edited\n")
    diff, stale = build_ext.compare(m, abi, str(csrc), ["100"])
    assert not diff and len(stale) == 2 and "other sources" in stale[0] and "sm_100" in stale[1]
    assert build_ext.compare({**m, "cuda_archs": ["90+PTX"]}, abi, None, ["100"]) == ([], [])


def test_cpu_isa_flags_and_the_manifest_refuses_a_cpu_without_them(monkeypatch):
    """EFFDENSE_CPU_ISA: auto takes avx512 where the CPU has avx512f beside avx2, fma and f16c, else avx2 where it
    has those; a library built for an ISA is refused (an ABI difference, not a crash) on a CPU that lacks a flag."""
    monkeypatch.setattr(build_ext, "cpu_flags", lambda: {"sse2", "avx2", "fma", "f16c"})
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert build_ext.cpu_isa("auto") == "avx2" and build_ext.cpu_isa("baseline") == "baseline"
    assert "-mavx2" in build_ext.compile_args(False, [], "avx2")["extra_compile_args"]["cxx"]
    assert "-mavx512f" not in build_ext.compile_args(False, [], "avx2")["extra_compile_args"]["cxx"]
    assert "-mavx2" not in build_ext.compile_args(False, [], "baseline")["extra_compile_args"]["cxx"]
    assert "-mavx512f" in build_ext.compile_args(False, [], "avx512")["extra_compile_args"]["cxx"]
    with pytest.raises(ValueError, match="EFFDENSE_CPU_ISA: expected auto, baseline, avx2, avx512, got 'avx10'"):
        build_ext.cpu_isa("avx10")
    monkeypatch.setattr(build_ext, "cpu_flags", lambda: {"sse2", "avx2", "fma", "f16c", "avx512f"})
    assert build_ext.cpu_isa("auto") == "avx512" and build_ext.cpu_isa("avx2") == "avx2"
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert build_ext.cpu_isa("auto") == "baseline"
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(build_ext, "cpu_flags", lambda: {"sse2", "avx2", "fma", "f16c"})
    abi = {"python": "cp312", "torch": "2.11.0+cu130", "torch_git": "70d99e998b49", "cuda": "13.0"}
    assert build_ext.compare({**abi, "cpu_isa": "avx2"}, abi) == ([], [])
    monkeypatch.setattr(build_ext, "cpu_flags", lambda: {"sse2", "avx2"})
    assert build_ext.cpu_isa("auto") == "baseline"
    diff, _ = build_ext.compare({**abi, "cpu_isa": "avx2"}, abi)
    assert diff == ["cpu_isa avx2 (built) needs CPU flags f16c, fma that this CPU lacks (rebuild here, or with "
                    "EFFDENSE_CPU_ISA=baseline)"]
    assert build_ext.compare(abi, abi) == ([], []), "a manifest from before cpu_isa: baseline"
    monkeypatch.setattr(build_ext, "cpu_flags", lambda: {"sse2", "avx2", "fma", "f16c"})
    diff, _ = build_ext.compare({**abi, "cpu_isa": "avx512"}, abi)
    assert diff == ["cpu_isa avx512 (built) needs CPU flags avx512f that this CPU lacks (rebuild here, or with "
                    "EFFDENSE_CPU_ISA=baseline)"]


@pytest.mark.slow
def test_pure_wheel_then_build_ext(tmp_path):
    """A pure Python wheel (pip wheel --no-build-isolation, EFFDENSE_SKIP_EXT=1) carries the sources; after
    ``python -m effdense.build_ext`` (one CPU compile) the cpp backend loads and matches naive in float64;
    a second run keeps the library (its manifest matches), and an edited source makes it stale."""
    src = _copy_tree(str(tmp_path / "src"))
    p = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
              str(tmp_path / "dist"), src], str(tmp_path), {"EFFDENSE_SKIP_EXT": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("effdense-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert not [n for n in names if n.endswith(".so")]
    assert {f"effdense/_csrc/{f}" for f in build_ext.source_files(os.path.join(ROOT, "csrc"))} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.path.join(ROOT, 'tests')}", "MAX_JOBS": "2",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    python = lambda *args: _run([sys.executable, *args], str(tmp_path), env)

    p = python("-c", "from effdense import _ext; print(_ext.reason())")
    assert p.stdout.startswith("effdense._C not built") and COMMAND in p.stdout, p.stdout + p.stderr[-2000:]
    p = python("-m", "effdense.build_ext", "--cpu")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "effdense._C loaded (CPU kernels only)" in p.stdout and "manifest matches" in p.stdout, p.stdout
    assert list((site / "effdense").glob("_C*.so")) and list((site / "effdense").glob("_C*.manifest.json"))
    check = ("from utils import make_block, make_input, run_steps, assert_runs_close\n"
             "import effdense\n"
             "from effdense.backends import unavailable_reason\n"
             "assert unavailable_reason('cpp', 'cpu') is None, unavailable_reason('cpp', 'cpu')\n"
             "block = make_block(dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), {})\n"
             "x = make_input((2, 4, 5, 5), {})\n"
             "assert_runs_close(run_steps(block, 'cpp', x), run_steps(block, 'naive', x), 1e-10)\n"
             "print('cpp matches naive from', effdense.__file__)\n")
    p = python("-c", check)
    assert p.returncode == 0 and str(site) in p.stdout, p.stdout + p.stderr[-3000:]
    p = python("-m", "effdense.build_ext", "--cpu")
    assert p.returncode == 0 and "using the prebuilt" in p.stdout and "building" not in p.stdout, p.stdout
    with open(site / "effdense" / "_csrc" / "ops.cpp", "a", encoding="utf-8") as f:
        f.write("// edited\n")
    p = python("-m", "effdense.build_ext", "--check")
    assert p.returncode == 1 and "built from other sources" in p.stdout, p.stdout + p.stderr[-2000:]
