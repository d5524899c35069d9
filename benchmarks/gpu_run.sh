#!/usr/bin/env bash
# Every GPU figure the project needs, in one prepared command of 7 minutes (EFFDENSE_GPU_TOTAL=420 seconds) on a lent
# H100 or H200: with the machine's start, a task's 15 minutes of device time leave room for one rerun, which finds
# the Triton and inductor caches of the first run in build/gpu-run-cache:
#
#   EFFDENSE_COMMIT=<the commit, typed in literally> bash benchmarks/gpu_run.sh     # results into $OUT
#   bash benchmarks/gpu_run.sh --rehearse     # the same phases on CPU, tiny sizes, < 4 minutes (CI runs it)
#
# The copy on the GPU machine has no .git, so the commit must come in the command (it is recorded in every
# result); carry the prebuilt extension (effdense/_C.cpython-312-x86_64-linux-gnu.so and its manifest: *.so is
# git-ignored, so name it in the device tool's `carry`).
#
# Phases run in order of importance, each under its own deadline (`timeout`), all under one overall deadline:
# a phase cut off loses only what it had not measured yet (the benchmark suites rewrite their JSON after every
# row), and the later phases still run. $OUT gets three files, at its top level (the device tool brings back at
# most 8, no deeper than two folders):
#   gpu_run.log          everything printed, phase by phase
#   gpu_run.json         per phase: status, exit code, seconds, deadline; the pytest summary; the commit
#   results-<dev>.tgz    the new results folder benchmarks/results/<device>/ (JSON, summary.md, plots):
#                        `tar xzf results-<dev>.tgz -C benchmarks/results` here, then
#                        `python -m benchmarks.report --readme README.md --plots`
#
# Sizing (H200, from FLOPs, bytes and launches; a phase past the overall deadline is skipped, so the least important
# ones come last). DenseNet-BC-100 k=12 at 32x32 is ~0.29 GFLOP per image forward, ~1 GFLOP a training step with the
# recomputation: 64 GFLOP at batch 64, under 1 ms of tensor-core time, so a step is launch-bound:
# ~1500 launches at ~5 us is ~8 ms eager (naive), less captured. A speed variant is 3 warm-up steps, one for
# memory, then 7 rounds x (5 steps + forward + backward) = ~55 steps, ~0.5 s; 10 variants x 2 dtypes x 2 batches
# is ~30 s, plus Triton's JIT for the first triton step (the bounded compile set of issue 10, ~1 s a kernel,
# warm after the correctness phase, and reused from build/gpu-run-cache by a rerun on the same machine).
# torch.compile of naive BC-100 (forward + backward, ~1500 nodes) takes ~30-60 s of inductor per mode: only
# fp32 batch 64, default and reduce-overhead. DenseNet-121 at 224x224 batch 64 is ~0.6 TFLOP a step, ~3-5 ms
# of tensor-core time but ~40-60 ms in practice (BN/ReLU/concat traffic, ~25 GB a step at ~4 TB/s): 5 rounds x
# 3 steps x 10 variants ~ 15 s. Memory vs depth: building a 1000-layer model takes ~2 s of Python, its step
# ~0.1 s; naive stops at its first OOM (~700 layers at batch 64: quadratic, ~80 GB). The 12 GiB capacity
# search is ~10 probes per backend (doubling from 64 layers per block, then bisection). Inference: BC-100 eval
# forwards at batch 1/32/256, ~0.1 GFLOP to 75 GFLOP, launch-bound, plus one inductor compile of the forward
# (~15 s) per batch. Budgets: torch.compile of naive BC-100 at activation memory budgets 0.5, 0.2, 0.05 (the 1.0
# row is the compile phase's), each a fresh inductor compile of forward + backward (~25 s from a warm FX cache),
# one run per budget, so that a budget cut off by the deadline loses only its own rows.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF="$REPO/benchmarks/gpu_run.sh"
cd "$REPO"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ------------------------------------------------------------------------------------------ one phase
phase() {      # (run in its own process: bash gpu_run.sh --phase NAME)
  local name=$1
  set -f        # the word lists ($SPEED_SET, $KERNEL_SIZES, $MEM_DEPTHS) hold JSON: split into words, never glob
  case "$name" in
    setup) setup ;;
    correctness) correctness ;;
    build)          # only when setup found no usable prebuilt library; the later phases' deadlines shrink
      MAX_JOBS=16 "$PY" -m effdense.build_ext --cuda --archs 90 --jobs 16 && "$PY" -c "from effdense import _ext; \
print('effdense._C:', _ext.reason() or 'loaded')" ;;
    speed-bc100-b64)
      bench --suite speed --depths "$BC" --growth-rates 12 --batches "$B64" --dtypes $DTYPES \
        --backends naive checkpoint torch cpp triton $SPEED_SET ;;
    memory)
      bench --suite memory --batch "$B64" --growth-rates 12 --depths $MEM_DEPTHS \
        --backends naive checkpoint cpp triton ;;
    capacity)
      bench --suite capacity --backends naive cpp triton --set 'caps_gib=[12]' densenet264=false start_layers=64 \
        max_layers_per_block=400 ;;
    compile)
      bench --suite speed --depths "$BC" --growth-rates 12 --batches "$B64" --dtypes fp32 --backends naive compile \
        --set "compile_backend=\"$COMPILE_BACKEND\"" $SPEED_SET ;;
    densenet121)
      bench --suite speed --batches "$B64" --dtypes fp32 --backends naive checkpoint torch cpp triton \
        --set "models=$D121" rounds=5 reps=3 $SPEED_SET ;;
    peers)
      bench --suite peers --backends naive --set batch="$B64" size="$PEER_SIZE" reps="$PEER_REPS" ;;
    speed-bc100-b256)
      bench --suite speed --depths "$BC" --growth-rates 12 --batches "$B256" --dtypes $DTYPES \
        --backends naive checkpoint torch cpp triton --set rounds=5 reps=3 $SPEED_SET ;;
    kernels)
      bench --suite kernels --backends naive cpp triton --set 'models=[]' $KERNEL_SIZES ;;
    launches)
      bench --suite launches --depths "$LAUNCH_DEPTH" --backends naive checkpoint torch cpp triton ;;
    inference)      # eval forward (issue 28): latency, images/s, peak memory; compile's first call timed apart
      bench --suite inference --depths "$BC" --growth-rates 12 --batches $INFER_BATCHES \
        --backends naive checkpoint torch cpp triton compile --set "compile_backend=\"$COMPILE_BACKEND\"" \
        $INFER_SET ;;
    budgets)        # torch.compile's automatic recomputation beside cpp (issue 28); without dropout, since
      local b rc=0  # below budget 1.0 the partitioner recomputes dropout with fresh randomness (pytorch#190717)
      for b in $BUDGETS; do
        bench --suite speed --depths "$BC" --growth-rates 12 --batches "$B64" --dtypes fp32 \
          --backends naive compile cpp --set "budgets=[$b]" "compile_backend=\"$COMPILE_BACKEND\"" rss=false \
          rounds=3 reps=3 $SPEED_SET || rc=$?
      done
      return $rc ;;
    *) echo "unknown phase $name" >&2; return 2 ;;
  esac
}

bench() { "$PY" -m benchmarks --device "$DEVICE" --out "$RESULTS" "$@"; }

setup() {
  echo "python $PY; commit ${EFFDENSE_COMMIT:-unknown}"
  set +f        # the library's name is a glob
  local prebuilt=(effdense/_C*.so effdense/_C*.manifest.json)
  if [ -e "${prebuilt[0]}" ]; then ls -l "${prebuilt[@]}" 2> /dev/null
  else echo "no prebuilt effdense._C in effdense/"; fi
  local missing=""
  for f in "${TEST_FILES[@]}"; do [ -e "$f" ] || missing="$missing $f"; done
  [ -z "$missing" ] || { echo "gpu_run.sh lists test files that do not exist:$missing"; return 4; }
  local ok=0
  "$PY" -c "from effdense import _ext; import sys; print('effdense._C:', _ext.reason() or ('loaded, CUDA kernels' \
if _ext.has_cuda_kernels() else 'loaded, CPU kernels only')); sys.exit(0 if _ext.available() and \
($REHEARSE or _ext.has_cuda_kernels()) else 3)" || ok=$?
  "$PY" -m effdense.build_ext --check || true          # what the manifest says about the library here
  if [ "$ok" -ne 0 ] && [ "$REHEARSE" = 0 ]; then
    echo "effdense._C does not load with CUDA kernels: the next phase BUILDS it (the prebuilt one was not usable)"
    touch "$WORK/need-build"
  elif [ "$ok" -ne 0 ]; then
    echo "rehearsal: effdense._C not loaded; not building (the GPU run would)"
  fi
  "$PY" -m effdense.info
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'threads', torch.get_num_threads())"
  "$PY" -c "import xdist" 2> /dev/null && echo "pytest-xdist: yes" || echo "pytest-xdist: no (tests run in one process)"
}

# The CUDA tests that matter (issue 14): every backend against naive on CUDA (fp64 where a backend has it, fp32
# with TF32 off otherwise: the tests' own fixtures), autocast tolerance tables, the Triton kernels at odd shapes and
# every tile config, dropout, channels-last, CUDA graphs, the 20-step BC-100 loss curves. `-k "cuda or triton"`
# keeps the CUDA cases of the shared files and whole modules whose name says triton/cuda; the CPU-only AOT and
# nvcc/tiling tests are not listed. Each test has a timeout; compile-heavy tests spread over 8 processes.
TEST_FILES=(tests/backends/test_equivalence.py tests/backends/test_cpp_backend.py tests/csrc/test_cpp_ops.py
            tests/kernels/test_triton_kernels.py tests/kernels/test_triton_transition.py
            tests/backends/test_triton_backend.py tests/models/test_cuda_graphs.py tests/train/test_cuda_training.py)
# The first step of a Triton test compiles its specializations (164 distinct ones for these tests; 183-304 s of one
# core here, the 32 conv3x3_fwd ones 169 s; the GPU machine's cores are no faster): pytest-xdist spreads the tests,
# and so the compiles, over 14 of the 16 cores, the workers sharing one Triton cache on disk; a rerun on the same
# machine finds them there. The selection is listed first, so that the summary can name the tests a deadline cut off.
correctness() {
  local args=(-q -p no:cacheprovider -rfEs --timeout "$TEST_TIMEOUT" -k "cuda or triton" "${TEST_FILES[@]}")
  "$PY" -m pytest "${args[@]}" --collect-only > "$WORK/collected.txt" || { tail -5 "$WORK/collected.txt"; return 4; }
  tail -1 "$WORK/collected.txt"
  if [ "$REHEARSE" = 1 ]; then           # on CPU the CUDA cases skip: the selection is checked, a few run for real
    "$PY" -m pytest -q -p no:cacheprovider -rfEs --timeout "$TEST_TIMEOUT" --junitxml "$WORK/junit.xml" \
      tests/models/test_cuda_graphs.py -k "refused or make_capturable"
  else
    "$PY" -c "import xdist" 2> /dev/null && args+=(-n 14)
    "$PY" -m pytest "${args[@]}" --junitxml "$WORK/junit.xml"
  fi
}

# ------------------------------------------------------------------------------------------ the driver
if [ "${1:-}" = "--phase" ]; then
  phase "$2"
  exit $?
fi
REHEARSE=0
case "${1:-}" in
  --rehearse) REHEARSE=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [--rehearse]" >&2; exit 2 ;;
esac
if [ "$REHEARSE" = 1 ]; then
  OUT=${OUT:-/tmp/effdense-gpu-rehearsal}
  DEVICE=cpu BC=10 B64=2 B256=4 MEM_DEPTHS="10 16" D121='[["bc",16,12]]' PEER_SIZE=32 PEER_REPS=2 LAUNCH_DEPTH=10
  COMPILE_BACKEND=aot_eager TEST_TIMEOUT=60 TOTAL=240 SPEED_SET="--set rounds=2 reps=1 warmup=1 rss=false" DTYPES=fp32
  INFER_BATCHES="1 2" INFER_SET="--set rounds=2 reps=1 warmup=1" BUDGETS="0.05"
  KERNEL_SIZES="batch=2 shapes=[[24,48]] reps=3 copy_elems=1048576 matmul_n=256 profile=false"
  export TRITON_INTERPRET=1
  # (full deadline, rehearsal deadline) per phase: the table below
else
  OUT=${OUT:-/tmp/effdense-gpu-run}
  DEVICE=cuda BC=100 B64=64 B256=256 MEM_DEPTHS="100 250 400 700 1000" D121='[["densenet121",null,32]]'
  PEER_SIZE=224 PEER_REPS=10 LAUNCH_DEPTH=40 COMPILE_BACKEND=inductor TEST_TIMEOUT=90 TOTAL=${EFFDENSE_GPU_TOTAL:-420}
  KERNEL_SIZES="" SPEED_SET="" DTYPES="fp32 bf16" INFER_BATCHES="1 32 256" INFER_SET="" BUDGETS="0.5 0.2 0.05"
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/effdense-gpu-work.XXXXXX")
RESULTS="$WORK/results"
LOG="$OUT/gpu_run.log"
: > "$LOG"
# caches a rerun on the same machine reuses (build/ is git-ignored: the device tool keeps it between calls)
CACHE=${EFFDENSE_CACHE:-$REPO/build/gpu-run-cache}
[ "$REHEARSE" = 1 ] && CACHE="$WORK/cache"
export TRITON_CACHE_DIR="$CACHE/triton" TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor"
# one session: benchmarks.report merges this run's results of a suite (four speed phases) into one table
export EFFDENSE_SESSION="gpu_run-$(date -u +%Y%m%dT%H%M%SZ)"
export REHEARSE DEVICE DTYPES BC B64 B256 MEM_DEPTHS D121 PEER_SIZE PEER_REPS LAUNCH_DEPTH COMPILE_BACKEND \
  TEST_TIMEOUT KERNEL_SIZES SPEED_SET INFER_BATCHES INFER_SET BUDGETS WORK RESULTS PY
if [ -z "${EFFDENSE_COMMIT:-}" ] && ! git -C "$REPO" rev-parse HEAD > /dev/null 2>&1; then
  echo "WARNING: no .git and no EFFDENSE_COMMIT: results will say commit unknown" | tee -a "$LOG"
fi
[ -n "${EFFDENSE_COMMIT:-}" ] || export EFFDENSE_COMMIT=$(git -C "$REPO" rev-parse HEAD 2> /dev/null || echo unknown)

START=$(date +%s)
END=$((START + TOTAL))
PACK_RESERVE=10
: > "$WORK/phases.tsv"
run() {   # run NAME FULL_DEADLINE REHEARSAL_DEADLINE
  local name=$1 budget=$2
  [ "$REHEARSE" = 1 ] && budget=$3
  local left=$((END - PACK_RESERVE - $(date +%s)))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 5 ]; then
    printf '%s\tskipped\t-\t0\t%s\n' "$name" "$budget" >> "$WORK/phases.tsv"
    echo "=== $name: skipped, the overall deadline is near" | tee -a "$LOG"
    return
  fi
  echo "=== $name: deadline ${budget}s, at $(( $(date +%s) - START ))s" | tee -a "$LOG"
  local t0=$(date +%s) rc=0
  # SIGINT to the phase's whole process group: pytest still writes its summary and junit file, a suite its rows
  timeout -s INT --kill-after=15 "$budget" bash "$SELF" --phase "$name" >> "$LOG" 2>&1 || rc=$?
  local dt=$(( $(date +%s) - t0 )) status=ok
  [ "$rc" -ne 0 ] && status=failed
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 130 ]; } && status=timeout
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" "$budget" >> "$WORK/phases.tsv"
  echo "    $name: $status (rc $rc) in ${dt}s" | tee -a "$LOG"
}

#   phase               full  rehearsal (seconds; the rehearsal's deadlines allow for the ~5 s import of torch 2.11+cu130
#                                  in each process; on an idle 2-core CPU its phases take about a third)
run setup               30    30
[ -e "$WORK/need-build" ] && run build 240 0   # 16 jobs: a few minutes of nvcc; the last phases are then cut
run correctness         130   25
run speed-bc100-b64     45    20
run memory              30    15
run compile             45    25
run inference           30    16
run budgets             60    18
run capacity            20    12
run densenet121         20    18
run speed-bc100-b256    20    20
run peers               10    20
run kernels             10    12
run launches            10    22

# ------------------------------------------------------------------------------------------ results
"$PY" -m benchmarks.report --results "$RESULTS" --plots >> "$LOG" 2>&1 || echo "report failed" | tee -a "$LOG"
for dev in "$RESULTS"/*/; do
  [ -d "$dev" ] && tar czf "$OUT/results-$(basename "$dev").tgz" -C "$RESULTS" "$(basename "$dev")"
done
"$PY" - "$WORK" "$OUT/gpu_run.json" "$START" "$REHEARSE" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys, time, xml.etree.ElementTree as ET
work, out, start, rehearse = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
phases = []
for line in open(os.path.join(work, "phases.tsv")):
    name, status, rc, seconds, deadline = line.rstrip("\n").split("\t")
    phases.append(dict(name=name, status=status, rc=rc, seconds=int(seconds), deadline=int(deadline)))
tests = None
junit = os.path.join(work, "junit.xml")
if os.path.exists(junit):
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    tests = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    cases = [c for s in suites for c in s.iter("testcase")]
    tests["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in cases
                       if c.find("failure") is not None or c.find("error") is not None]
    collected = os.path.join(work, "collected.txt")  # the selection: what has no result was cut off
    if os.path.exists(collected) and not rehearse:
        done = {(c.get("classname", "").replace(".", "/"), c.get("name")) for c in cases}
        ids = [ln.strip() for ln in open(collected) if "::" in ln]
        key = lambda i: (i.split("::")[0].removesuffix(".py"), i.split("::")[-1])
        tests["cut_off"] = [i for i in ids if key(i) not in done]
results = sorted(os.path.relpath(p, os.path.join(work, "results")) for p in glob.glob(f"{work}/results/*/*.json"))
loaded = {r: json.load(open(os.path.join(work, "results", r))) for r in results}
incomplete = [r for r in results if loaded[r].get("complete") is False]
rows = {r: len(d.get("rows", [])) for r, d in loaded.items()}  # a phase that measured nothing shows 0
summary = dict(rehearsal=rehearse, commit=os.environ.get("EFFDENSE_COMMIT"), seconds=int(time.time()) - start,
               phases=phases, tests=tests, results=results, incomplete=incomplete, rows=rows)
with open(out, "w") as f:
    json.dump(summary, f, indent=1)
print(f"\n{'phase':<18}{'status':<9}{'rc':>4}{'s':>6}{'deadline':>10}")
for p in phases:
    print(f"{p['name']:<18}{p['status']:<9}{p['rc']:>4}{p['seconds']:>6}{p['deadline']:>10}")
if tests:
    print(f"tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
          f"{tests['skipped']} skipped" + ("".join(f"\n  FAILED {t}" for t in tests["failed"][:20])))
    cut = tests.get("cut_off", [])
    if cut:
        print(f"{len(cut)} selected tests have no result (cut off by the deadline):"
              + "".join(f"\n  CUT OFF {t}" for t in cut[:20]) + ("\n  ..." if len(cut) > 20 else ""))
for r, d in loaded.items():
    print(f"{d.get('suite', '?'):<10}{rows[r]:>4} rows  {r}{'' if d.get('complete') else '  (cut off)'}")
print(f"{len(results)} result files ({len(incomplete)} cut off by their deadline); total {summary['seconds']}s")
EOF
rm -rf "$WORK"
ls -l "$OUT"
