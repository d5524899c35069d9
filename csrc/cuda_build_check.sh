#!/usr/bin/env bash
# csrc/cuda_build_check.sh — build effdense._C with CUDA against a real CUDA PyTorch (default torch==2.11.0, the
# +cu130 build of the GPU machine) on a machine without a GPU, in a virtual environment of its own (the caller's
# Python environment and its torch are never touched), and check the result. Run by .ci/run.
#
# From a copy of the working tree (tracked and untracked-but-not-ignored files, uncommitted edits included; or
# --rev REV for a git revision) it: installs torch==$TORCH with its nvidia-* runtime wheels into a cached venv (a
# CUDA torch imports without a GPU once those are present); builds a wheel with
#   CUDA_HOME=... EFFDENSE_REQUIRE_EXT=1 EFFDENSE_CUDA_ARCHS=... pip wheel --no-build-isolation --no-deps .
# printing every compiler/linker error as file:line: message; installs that wheel (with its dependencies, from
# the cache) and checks its contents (library, manifest, the sources python -m effdense.build_ext needs);
# imports effdense._C outside the source tree (RTLD_NOW: unresolved symbols fail here); checks that every
# effdense op has a CUDA kernel and that the library embeds a cubin per requested arch; runs the CPU tests of the
# cpp backend against the installed wheel; prints where the time went.
#
# Usage: csrc/cuda_build_check.sh [--python 3.11] [--torch 2.11.0] [--archs "90"] [--repo DIR] [--rev REV]
#                                 [--tests "tests/csrc/test_cpp_ops.py tests/backends/test_cpp_backend.py"] [--no-tests]
#                                 [--prebuild | --no-prebuild] [--out DIR] [--offline] [--download-only] [--keep]
#                                 [--stack] [--suite "PYTEST ARGS"]
#   --python 3.12      build for the GPU machine's Python; implies --prebuild
#   --prebuild         also copy the library and its manifest into the checkout's effdense/ (git-ignored), e.g.
#                      effdense/_C.cpython-312-x86_64-linux-gnu.so + .manifest.json; effdense._ext loads it on a
#                      machine whose torch build matches the manifest (python -m effdense.build_ext says which)
#   --rev REV          build `git archive REV` instead of the working tree
#   --offline          never download; the cache (~/.cache/effdense-cudabuild) must hold every wheel
#   --download-only    fill the wheel cache and stop (.ci/run starts this early, in the background)
#   --tests "tests -k cpp"   every cpp-backend test (slower)
#   --stack            the GPU machine's whole stack in the venv, not only torch: triton 3.6.0 (torch 2.11's pin),
#                      torchvision 0.26.0, numpy < 2.4 (triton 3.6's interpreter), timm, onnx, onnxruntime,
#                      onnxscript, scikit-learn, pillow, matplotlib, pytest-xdist (.ci/run's device-stack suite)
#   --suite "ARGS"     then run `pytest ARGS` in the copied source tree with the venv's Python, the built library
#                      beside the package (.ci/run: the test suite on the GPU machine's stack, on CPU)
# Environment: EFFDENSE_CUDABUILD_CACHE (default ~/.cache/effdense-cudabuild), CUDA_HOME (default /usr/local/cuda),
# MAX_JOBS (default: the number of cores), EFFDENSE_CPU_ISA (default avx2: the wheel is for the GPU machine, whose
# CPU this machine cannot see; AVX2 is what x86-64 servers of the H100/H200 era all have).
# Exit status: 0 all good; 1 setup/download failure; 2 compile or link failure (an undefined symbol shows at
# import: g++ -shared allows them); 3 wheel/import/registration/cubin failure; 4 test failures.
# The last line is a one-line summary; the line before it, the time per stage.
set -uo pipefail
{  # braces: bash reads the whole script before running it, so editing it during a run is safe

SUITE="" STACK=0
PYVER=3.11 PYVER_GIVEN=0 TORCH=2.11.0 ARCHS=90 REV="" KEEP=0 OFFLINE=0 RUN_TESTS=1 PREBUILD=auto DOWNLOAD_ONLY=0
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TESTS="tests/csrc/test_cpp_ops.py tests/backends/test_cpp_backend.py"
CACHE="${EFFDENSE_CUDABUILD_CACHE:-$HOME/.cache/effdense-cudabuild}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER=$2; PYVER_GIVEN=1; shift 2 ;;
    --torch) TORCH=$2; shift 2 ;;
    --archs) ARCHS=$2; shift 2 ;;
    --repo) REPO=$2; shift 2 ;;
    --rev) REV=$2; shift 2 ;;
    --tests) TESTS=$2; shift 2 ;;
    --no-tests) RUN_TESTS=0; shift ;;
    --prebuild) PREBUILD=1; shift ;;
    --no-prebuild) PREBUILD=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --offline) OFFLINE=1; shift ;;
    --download-only) DOWNLOAD_ONLY=1; shift ;;
    --stack) STACK=1; shift ;;
    --suite) SUITE=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)"; exit 1 ;;
  esac
done
[ "$PREBUILD" = auto ] && PREBUILD=$PYVER_GIVEN

T0=$(date +%s) TLAST=$(date +%s) TIMES=""
elapsed() { echo $(( $(date +%s) - T0 )); }
lap() { local now; now=$(date +%s); TIMES="$TIMES $1 $((now - TLAST))s,"; TLAST=$now; }  # lap NAME: time since the last lap
step() { echo "== [$(elapsed)s] $*"; }
WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS" "$CACHE/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/effdense-cudabuild.XXXXXX")
LOGS="$WORK/logs"
mkdir -p "$LOGS"
STAGE=setup COMPILE=- LINK=- IMPORT=- TESTRES=- SUITERES=- TVER=- NERR=0 SOSIZE=-
finish() {  # finish RC: keep the logs, drop the work folder unless --keep, print the summary last
  local rc=$1 verdict=PASS
  [ "$rc" -ne 0 ] && verdict="FAIL($STAGE)"
  local keep_logs
  keep_logs="$CACHE/logs/$(date +%Y%m%d-%H%M%S)-py$PYVER"
  mkdir -p "$keep_logs" && cp -r "$LOGS"/. "$keep_logs"/ 2>/dev/null
  ls -dt "$CACHE"/logs/*/ 2>/dev/null | tail -n +21 | xargs -r rm -rf  # the last 20 runs' logs
  if [ "$KEEP" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
  echo "logs: $keep_logs"
  lap finish
  echo "time:${TIMES%,} (total $(elapsed)s)"
  echo "cuda_build_check: $verdict python=$PYVER torch=$TVER archs=$ARCHS compile=$COMPILE link=$LINK" \
       "import=$IMPORT so=$SOSIZE tests=\"$TESTRES\" suite=\"$SUITERES\" errors=$NERR time=$(elapsed)s"
  exit "$rc"
}

# ---------------------------------------------------------------- toolchain
PY=""
if command -v pyenv >/dev/null 2>&1; then
  PY=$(ls -d "$(pyenv root)"/versions/"$PYVER"*/bin/python 2>/dev/null | sort -V | tail -1)
fi
[ -z "$PY" ] && PY=$(command -v "python$PYVER" || true)
[ -x "${PY:-}" ] || { echo "no Python $PYVER found (pyenv or python$PYVER on PATH)"; finish 1; }
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# one run per Python version at a time: the venv and the wheel cache are shared between runs
exec 9>"$CACHE/.lock-$PYTAG"
command -v flock >/dev/null 2>&1 && { flock -n 9 || { echo "waiting for another run ($CACHE/.lock-$PYTAG)"; flock 9; }; }

# wheels of the venv: no `wheel` package (pip < 25 would take the legacy setup.py route); setuptools >= 70.1 builds
# PEP 660 editables without it, torch 2.11 wants < 82; tqdm and numpy: effdense's install_requires
PKGS=("torch==$TORCH" ninja pytest pytest-timeout numpy tqdm "setuptools>=70.1,<82")
STACK_PKGS=("triton==3.6.0" "torchvision==0.26.0" "numpy<2.4" timm onnx onnxruntime onnxscript scikit-learn pillow
            matplotlib pytest-xdist)
[ "$STACK" = 1 ] && PKGS+=("${STACK_PKGS[@]}")
download() {
  step "pip download (cache: $WHEELS)"
  # native pip of that Python: no --platform (pip would not widen manylinux_2_28 to the _2_27 nvidia wheels)
  local before after
  before=$(du -sm "$WHEELS" | cut -f1)
  if ! nice -n 10 "$PY" -m pip download -q -d "$WHEELS" "${PKGS[@]}" >"$LOGS/download.log" 2>&1; then
    echo "pip download failed:"; grep -v '^WARNING: Location' "$LOGS/download.log" | tail -5; return 1
  fi
  after=$(du -sm "$WHEELS" | cut -f1)
  echo "downloaded $((after - before)) MB (cache now $after MB)"
}
# every wheel already in the cache? (-d the cache itself: nothing is copied, nothing fetched)
cached() { "$PY" -m pip download -q --no-index --find-links "$WHEELS" -d "$WHEELS" "${PKGS[@]}" >/dev/null 2>&1; }
if [ "$DOWNLOAD_ONLY" = 1 ]; then
  STAGE=download
  if cached; then echo "wheel cache complete ($(du -sm "$WHEELS" | cut -f1) MB): nothing to download"
  else download || finish 1; fi
  lap download; finish 0
fi

step "python $PYVER, nvcc, sources"
"$PY" -c 'import sysconfig,os,sys; h=os.path.join(sysconfig.get_paths()["include"],"Python.h"); sys.exit(not os.path.exists(h))' \
  || { echo "$PY has no Python.h (install its dev headers)"; finish 1; }
NVCC="$CUDA_HOME/bin/nvcc"
[ -x "$NVCC" ] || { echo "no nvcc at $NVCC (set CUDA_HOME)"; finish 1; }
echo "python: $PY ($("$PY" -V 2>&1)); nvcc: $("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*')"
echo "glibc: $(ldd --version | head -1 | grep -o '[0-9.]*$'); g++: $(g++ -dumpfullversion)"
SRC="$WORK/src"
mkdir -p "$SRC"
if [ -n "$REV" ]; then
  git -C "$REPO" archive "$REV" | tar -x -C "$SRC" || { echo "git archive of $REPO $REV failed"; finish 1; }
  COMMIT=$(git -C "$REPO" rev-parse --short=10 "$REV")
elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  # the working tree as git sees it: tracked files as they are now, untracked ones that are not ignored
  ( cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
      [ -f "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf - ) | tar -x -C "$SRC" \
    || { echo "copying the working tree of $REPO failed"; finish 1; }
  COMMIT=$(git -C "$REPO" rev-parse --short=10 HEAD)
  [ -n "$(git -C "$REPO" status --porcelain --untracked-files=normal)" ] && COMMIT="$COMMIT+dirty"
else  # not a git checkout: everything but build outputs
  tar -C "$REPO" --exclude=./build --exclude=./dist --exclude='*.so' --exclude=./.git --exclude='./.venv*' \
      --exclude='__pycache__' -cf - . | tar -x -C "$SRC" || { echo "copying $REPO failed"; finish 1; }
  COMMIT=unknown
fi
echo "source: $REPO @ $COMMIT${REV:+ ($REV)} -> $SRC ($(find "$SRC" -type f | wc -l) files)"
lap toolchain

# ---------------------------------------------------------------- the venv (cached, rebuilt when broken)
VENV="$CACHE/venv-$PYTAG-torch$TORCH"
MODS="torch, ninja, pytest, numpy, tqdm, setuptools"
[ "$STACK" = 1 ] && VENV="$VENV-stack" \
  MODS="$MODS, triton, torchvision, timm, onnx, onnxruntime, onnxscript, sklearn, PIL, xdist"
VPY="$VENV/bin/python"
venv_ok() { [ -x "$VPY" ] && "$VPY" -c "import $MODS; assert torch.__version__.startswith('$TORCH')" >/dev/null 2>&1; }
if venv_ok; then
  step "reusing venv $VENV"
else
  if ! cached; then
    [ "$OFFLINE" = 1 ] && { echo "--offline, and the cache lacks wheels for: ${PKGS[*]}"; finish 1; }
    download || finish 1
    lap download
  fi
  step "venv with torch==$TORCH and its runtime wheels"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || finish 1
  if ! nice -n 10 "$VPY" -m pip install -q --no-compile --no-index --find-links "$WHEELS" "${PKGS[@]}" >"$LOGS/venv.log" 2>&1; then
    echo "venv install failed:"; tail -20 "$LOGS/venv.log"; rm -rf "$VENV"; finish 1
  fi
  echo "venv: $(du -sm "$VENV" | cut -f1) MB"
  lap venv
fi
# torch.utils.cpp_extension runs `ninja` from PATH: a wrapper adds -k 0, so that a failed object does not stop the
# others and every translation unit's errors show in one build
mkdir -p "$WORK/bin"
cat >"$WORK/bin/ninja" <<EOF
#!/bin/sh
case " \$* " in *" --version "*) exec "$VENV/bin/ninja" "\$@" ;; esac
exec "$VENV/bin/ninja" -k 0 "\$@"
EOF
chmod +x "$WORK/bin/ninja"
export PATH="$WORK/bin:$VENV/bin:$PATH"
TINFO=$("$VPY" -c '
import torch
print(torch.__version__, torch.version.cuda)
print(f"torch {torch.__version__} (git {torch.version.git_version[:12]}), built for CUDA {torch.version.cuda}, "
      f"cuda.is_available()={torch.cuda.is_available()}, C++11 ABI={torch.compiled_with_cxx11_abi()}")' 2>"$LOGS/torch_import.log") \
  || { echo "import torch failed:"; tail -20 "$LOGS/torch_import.log"; finish 1; }
read -r TVER TCUDA <<<"$(head -1 <<<"$TINFO")"
tail -1 <<<"$TINFO"
[ "$TCUDA" != None ] || { echo "torch $TVER has no CUDA"; finish 1; }
NCUDA=$("$NVCC" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)
[ "${TCUDA%%.*}" = "${NCUDA%%.*}" ] || echo "WARNING: nvcc $NCUDA vs torch CUDA $TCUDA: different majors (cpp_extension refuses)"

# ---------------------------------------------------------------- build a wheel
STAGE=compile
JOBS=${MAX_JOBS:-$(nproc)}
ISA="${EFFDENSE_CPU_ISA:-avx2}"
step "pip wheel --no-build-isolation (CUDA_HOME=$CUDA_HOME EFFDENSE_CUDA_ARCHS=$ARCHS EFFDENSE_CPU_ISA=$ISA MAX_JOBS=$JOBS)"
( cd "$SRC" && CUDA_HOME="$CUDA_HOME" EFFDENSE_REQUIRE_EXT=1 EFFDENSE_CUDA_ARCHS="$ARCHS" EFFDENSE_CPU_ISA="$ISA" MAX_JOBS="$JOBS" \
    EFFDENSE_BUILD_COMMIT="$COMMIT" nice -n 10 "$VPY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" . ) \
  >"$LOGS/build.log" 2>&1
BRC=$?
WHL=$(ls "$WORK"/dist/effdense-*.whl 2>/dev/null | head -1)
# compiler and linker diagnostics: g++ "file:line:col: error: ...", nvcc "file(line): error: ...", ld, ninja;
# nvcc's file(line) is rewritten as file:line so every error reads file:line: message
grep -E \
  '(: (fatal )?error[: ])|(\([0-9]+\): (error|catastrophic error))|nvcc fatal|undefined reference|multiple definition|cannot find -l|ld returned|^ *FAILED:' \
  "$LOGS/build.log" | sed -E "s/^ +//; s/ +\$//; s|$SRC/||g; s/^([^ :]+)\(([0-9]+)\): /\1:\2: /" \
  | awk '!seen[$0]++' >"$LOGS/errors.txt"
grep -E '(: warning: )|(\([0-9]+\): warning)' "$LOGS/build.log" \
  | sed -E "s/^ +//; s/ +\$//; s|$SRC/||g; s/^([^ :]+)\(([0-9]+)\): /\1:\2: /" | awk '!seen[$0]++' >"$LOGS/warnings.txt"
NERR=$(grep -cvE '^FAILED:|ld returned' "$LOGS/errors.txt")
NWARN=$(wc -l <"$LOGS/warnings.txt")
[ "$NWARN" -gt 0 ] && { echo "compiler warnings ($NWARN):"; cat "$LOGS/warnings.txt"; }
if [ $BRC -ne 0 ] || [ -z "$WHL" ]; then
  if grep -qE '^FAILED: .*\.o( |$)|^[^ ]+\.(cpp|cu|cuh|h|hpp):[0-9]+(:[0-9]+)?: (fatal |catastrophic )?error|nvcc fatal' \
      "$LOGS/errors.txt"; then
    COMPILE=FAIL
    echo "compile failed (pip rc=$BRC); errors:"; cat "$LOGS/errors.txt"
  elif ! grep -q "building 'effdense._C' extension" "$LOGS/build.log"; then
    COMPILE=not-run STAGE=pip NERR=0
    echo "pip failed before compiling (rc=$BRC):"
    grep -E 'effdense:|^ *error|Error' "$LOGS/build.log" | sed 's/^ *//' | awk '!seen[$0]++' | tail -20
  else
    COMPILE=ok LINK=FAIL STAGE=link
    echo "link failed (pip rc=$BRC); errors:"; cat "$LOGS/errors.txt"
    [ -s "$LOGS/errors.txt" ] || tail -40 "$LOGS/build.log"
  fi
  lap build; finish 2
fi
COMPILE=ok LINK=ok
lap build
grep -q 'CPU + CUDA' "$LOGS/build.log" || { echo "setup.py built the CPU part only:"; grep 'effdense:' "$LOGS/build.log"; COMPILE=cpu-only; finish 2; }
echo "built $(basename "$WHL") ($(du -h "$WHL" | cut -f1)); ninja: $(grep -cE '^ *\[[0-9]+/[0-9]+\] ' "$LOGS/build.log") steps"
NLOG=$(ls "$SRC"/build/temp.*/.ninja_log 2>/dev/null | head -1)  # start/end ms per object: where the build time goes
[ -n "$NLOG" ] && echo "compile time per object (MAX_JOBS=$JOBS in parallel): $(awk -F'\t' 'NR > 1 { n = $4; sub(".*/", "", n);
  printf "%s%s %.0fs", sep, n, ($2 - $1) / 1000; sep = ", " }' "$NLOG")"

# ---------------------------------------------------------------- install the wheel, check it, import
STAGE=import
step "install the wheel; contents, import effdense._C, CUDA registrations, embedded GPU code"
# --force-reinstall of the wheel only (the venv is reused between runs), then its dependencies from the cache:
# install_requires must be satisfiable with the wheel cache alone
if ! { "$VPY" -m pip install -q --force-reinstall --no-deps "$WHL" && \
       "$VPY" -m pip install -q --no-index --find-links "$WHEELS" "$WHL"; } >"$LOGS/install.log" 2>&1; then
  echo "installing the wheel (with its dependencies, from the cache) failed:"; tail -10 "$LOGS/install.log"; IMPORT=FAIL; finish 3
fi
mkdir -p "$WORK/run"
( cd "$WORK/run" && "$VPY" - "$ARCHS" "$SRC/csrc" ) <<'EOF' 2>&1 | c++filt | tee "$LOGS/import.log"
import ctypes, glob, importlib.util, os, re, struct, sys
import torch
archs, csrc = sys.argv[1], sys.argv[2]
pkg = importlib.util.find_spec("effdense").submodule_search_locations[0]  # found, not imported yet
if "site-packages" not in pkg:
    print(f"effdense found at {pkg}, not in the installed wheel"); sys.exit(1)
so = (sorted(glob.glob(os.path.join(pkg, "_C.*.so"))) or [None])[0]
if so is None:
    print(f"the wheel has no effdense/_C library: {sorted(os.listdir(pkg))}"); sys.exit(1)


def link_defect(err):  # g++ -shared leaves undefined references for load time: point at the sources that use the name
    m = re.search(r"undefined symbol: (\S+)", str(err))
    if not m:
        return
    import subprocess
    full = subprocess.run(["c++filt", m.group(1)], capture_output=True, text=True).stdout.strip() or m.group(1)
    name = re.sub(r"<.*", "", full.split("(")[0]).split("::")[-1]
    uses = []
    for root, _, files in os.walk(csrc):
        for fn in sorted(files):
            if fn.endswith((".cpp", ".cu", ".h", ".cuh")):
                path = os.path.join(root, fn)
                for i, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
                    if re.search(rf"\b{re.escape(name)}\b", line):
                        uses.append(f"csrc/{os.path.relpath(path, csrc)}:{i}")
    print(f"link defect: undefined symbol {full}: defined neither in effdense's objects nor in the linked "
          f"torch/CUDA libraries; '{name}' appears at {', '.join(uses) or '(nowhere in csrc/)'}")
    sys.exit(2)


# the C++ ops alone: the library loaded before the package (whose Triton backend registers Python ops in the same
# namespace); RTLD_NOW, so an unresolved symbol (a link defect) fails here
try:
    ctypes.CDLL(so)
except OSError as err:
    print(f"loading {so} failed: {err}")
    link_defect(err)
    sys.exit(1)
bad = []
# every op the extension defines needs a CUDA kernel (or a composite one) and a CPU kernel
ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("effdense::"))
has = lambda op, key: torch._C._dispatch_has_kernel_for_dispatch_key(f"effdense::{op}", key)
composite = ("CompositeImplicitAutograd", "CompositeExplicitAutograd")
no_cuda = [op for op in ops if not (has(op, "CUDA") or any(has(op, k) for k in composite))]
no_cpu = [op for op in ops if not (has(op, "CPU") or any(has(op, k) for k in composite))]
print(f"{len(ops) - len(no_cuda)} of the extension's {len(ops)} ops have CUDA kernels: "
      f"{', '.join(op for op in ops if op not in no_cuda)}")
if no_cuda or no_cpu or not ops:
    bad.append(f"ops without a CUDA kernel: {no_cuda or 'none'}; without a CPU kernel: {no_cpu or 'none'}")

import effdense  # noqa: E402
from effdense import _ext, _build as build_ext  # noqa: E402
# the wheel: library, manifest, and the sources `python -m effdense.build_ext` rebuilds from
want_src = build_ext.source_files(csrc)
have_src = build_ext.source_files(os.path.join(pkg, "_csrc")) if os.path.isdir(os.path.join(pkg, "_csrc")) else []
if want_src != have_src:
    bad.append(f"effdense/_csrc has {have_src}, the checkout {want_src}")
manifest = build_ext.read_manifest(so)
print(f"wheel: {os.path.basename(so)}, manifest: {build_ext.describe(manifest) if manifest else 'NONE'}, "
      f"{len(have_src)} sources in effdense/_csrc")
if not manifest:
    bad.append("the wheel lacks the library's manifest")
if not _ext.available():
    print(f"import effdense._C failed: {_ext.reason()}")
    link_defect(_ext.reason())
    sys.exit(1)
print(_ext.status())

def fatbin_entries(path):  # (kind, sm) of every entry of the .nv_fatbin section
    d = open(path, "rb").read()
    shoff, = struct.unpack_from("<Q", d, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
    sh = lambda i: struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize)
    stro = sh(shstrndx)[4]
    out = set()
    for i in range(shnum):
        h = sh(i)
        if d[stro + h[0]: d.index(b"\0", stro + h[0])] != b".nv_fatbin":
            continue
        blob, off = d[h[4]: h[4] + h[5]], 0
        while off + 16 <= len(blob):
            magic, _, hsize, fsize = struct.unpack_from("<IHHQ", blob, off)
            if magic != 0xBA55ED50:
                off += 8
                continue
            p, end = off + hsize, off + hsize + fsize
            while p < end:
                kind, _, ehs, size = struct.unpack_from("<HHIQ", blob, p)
                out.add(({1: "ptx", 2: "sm"}.get(kind, f"kind{kind}"), struct.unpack_from("<I", blob, p + 28)[0]))
                p += ehs + size
            off = end
    return sorted(out)

ents = fatbin_entries(so)
print("embedded GPU code:", ", ".join(f"{k}_{a}" for k, a in ents) or "none")
lack = [a.removesuffix("+PTX") for a in build_ext.cuda_archs(archs) if ("sm", int(a.removesuffix("+PTX"))) not in ents]
if lack:
    bad.append("no cubin for sm_" + ", sm_".join(lack))
if not _ext.has_cuda_kernels():
    bad.append("has_cuda_kernels() is False")
for b in bad:
    print("FAIL:", b)
sys.exit(1 if bad else 0)
EOF
IRC=${PIPESTATUS[0]}
lap import
[ "$IRC" -eq 2 ] && { LINK=FAIL IMPORT=FAIL STAGE=link NERR=$((NERR + 1)); finish 2; }
[ "$IRC" -eq 0 ] || { IMPORT=FAIL; finish 3; }
IMPORT=ok
SITE=$(cd "$WORK/run" && "$VPY" -c 'import effdense, os; print(os.path.dirname(effdense.__file__))')  # not the checkout's
SO=$(ls "$SITE"/_C.*.so | head -1)
MANI="${SO%.so}.manifest.json"
SOSIZE=$(du -h "$SO" | cut -f1)
echo "library $(basename "$SO") ($SOSIZE); needs: $(readelf -d "$SO" | grep NEEDED | grep -o '\[.*\]' | tr -d '[]' | tr '\n' ' ')"
echo "max symbol versions: $(objdump -T "$SO" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)" \
     "$(objdump -T "$SO" | grep -o 'GLIBCXX_[0-9.]*' | sort -Vu | tail -1)" \
     "$(objdump -T "$SO" | grep -o 'CXXABI_[0-9.]*' | sort -Vu | tail -1)"

# ---------------------------------------------------------------- artifacts
OUT=${OUT:-"$CACHE/out/torch-$TVER-$PYTAG-sm${ARCHS//[;, ]/_}"}
mkdir -p "$OUT" && cp "$SO" "$MANI" "$WHL" "$OUT/"
echo "artifacts: $OUT/$(basename "$SO"), $(basename "$MANI"), $(basename "$WHL")"
if [ "$PREBUILD" = 1 ]; then
  if [ -n "$REV" ]; then
    echo "prebuilt library NOT copied into $REPO/effdense: built from --rev $REV, not the working tree"
  else
    cp "$SO" "$MANI" "$REPO/effdense/"
    echo "prebuilt: $REPO/effdense/$(basename "$SO") + $(basename "$MANI") (git-ignored: the GPU run carries them)"
  fi
fi

# ---------------------------------------------------------------- CPU tests of the cpp backend, on the wheel
if [ "$RUN_TESTS" = 1 ]; then
  STAGE=tests
  step "CPU tests against the installed wheel: pytest $TESTS"
  cp -r "$SRC/tests" "$SRC/pytest.ini" "$WORK/run/"
  # shellcheck disable=SC2086
  ( cd "$WORK/run" && EFFDENSE_REQUIRE_EXT=1 nice -n 10 "$VPY" -m pytest -q -p no:cacheprovider $TESTS ) >"$LOGS/tests.log" 2>&1
  TRC=$?
  lap tests
  TESTRES=$(grep -E '^=*.*[0-9]+ (passed|failed|error)' "$LOGS/tests.log" | tail -1 | sed -E 's/=+//g; s/^ +| +$//g')
  grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log"
  [ $TRC -eq 0 ] || { [ -n "$TESTRES" ] || TESTRES="pytest rc=$TRC"; tail -30 "$LOGS/tests.log"; finish 4; }
else
  TESTRES=skipped
fi

# ---------------------------------------------------------------- the test suite on this stack, in the source copy
if [ -n "$SUITE" ]; then
  STAGE=suite
  step "the suite on $("$VPY" -c 'import sys, torch, triton, numpy; v = sys.version_info
print(f"Python {v[0]}.{v[1]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")'):" \
       "pytest $SUITE"
  cp "$SO" "$MANI" "$SRC/effdense/"       # the package as the GPU run carries it: sources plus the prebuilt library
  # shellcheck disable=SC2086
  ( cd "$SRC" && EFFDENSE_REQUIRE_EXT=1 EFFDENSE_COMMIT="$COMMIT" PYTHON="$VPY" nice -n 10 "$VPY" -m pytest -q \
      -p no:cacheprovider --durations=15 $SUITE ) >"$LOGS/suite.log" 2>&1
  SRC_RC=$?
  lap suite
  SUITERES=$(grep -E '^=*.*[0-9]+ (passed|failed|error)' "$LOGS/suite.log" | tail -1 | sed -E 's/=+//g; s/^ +| +$//g')
  sed -n '/slowest .*durations/,/^$/p' "$LOGS/suite.log" | head -18
  grep -E '^(FAILED|ERROR) ' "$LOGS/suite.log"
  [ $SRC_RC -eq 5 ] && { SUITERES="no tests collected"; finish 4; }   # pytest's 5: the selection is broken
  [ $SRC_RC -eq 0 ] || { [ -n "$SUITERES" ] || SUITERES="pytest rc=$SRC_RC"; tail -40 "$LOGS/suite.log"; finish 4; }
fi
STAGE=done
finish 0
}
