#!/usr/bin/env bash
# One call of the lent GPU machine per phase (each well inside the device tool's 10-minute limit):
#   bash benchmarks/gpu_session.sh build test        # build effdense._C with CUDA, effdense.info, full test suite
#   bash benchmarks/gpu_session.sh core              # BC-100 k=12, batch 64/256, fp32/bf16, every backend (issues 3, 4, 6)
#   bash benchmarks/gpu_session.sh memory capacity   # memory vs depth; deepest model under 4/8/12 GiB caps
#   bash benchmarks/gpu_session.sh kernels peers     # roofline and fused kernels; torchvision/timm DenseNet-121
#   bash benchmarks/gpu_session.sh train             # short Fashion-MNIST run (issue 5), log and curves
# The GPU machine fetches nothing: for `train`, first here `apt-get install dataset-fashion-mnist`, copy
# /usr/share/datasets/fashion-mnist into an ignored folder of the repo (.data/fashion-mnist, about 30 MB), name
# `.data` in the device tool's `carry`, and set FASHION_MNIST=.data/fashion-mnist.
# Logs and a tarball of benchmarks/results land in $OUT (the device tool brings back at most 8 files).
# The copy there has no .git: pass the commit, e.g. `EFFDENSE_COMMIT=$(git rev-parse HEAD)` typed into the command,
# so every result records it (effdense.info.environment).
set -uo pipefail
OUT=${OUT:-/tmp/effdense-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
for phase in "$@"; do
  case "$phase" in
    build)
      MAX_JOBS=${MAX_JOBS:-16} EFFDENSE_REQUIRE_EXT=1 python3 -m pip install --no-build-isolation --no-deps -e . \
        > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      python3 -m effdense.info | tee "$OUT/info.txt" ;;
    test)
      python3 -m pytest -q tests -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -25 ;;
    core)
      python3 -m benchmarks --suite speed --depths 100 --growth-rates 12 --batches 64 256 --dtypes fp32 bf16 \
        2>&1 | tee "$OUT/core.log" | tail -30 ;;
    memory|capacity|kernels|peers)
      python3 -m benchmarks --suite "$phase" 2>&1 | tee "$OUT/$phase.log" | tail -30 ;;
    train)
      rm -rf /tmp/effdense-fashion
      python3 -m effdense.train --dataset fashion-mnist --data-dir "${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}" \
        --epochs 3 --no-progress --output-dir /tmp/effdense-fashion 2>&1 | tee "$OUT/train.log" | tail -25
      python3 -m benchmarks.runs /tmp/effdense-fashion --console "$OUT/train.log" ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
python3 -m benchmarks.report --plots > /dev/null 2>&1
tar czf "$OUT/results.tgz" benchmarks/results 2>/dev/null
echo "results: $OUT/results.tgz"
