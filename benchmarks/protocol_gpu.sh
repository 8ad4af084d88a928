#!/usr/bin/env bash
# The CIFAR-10 protocol on one GPU: train the dense ResNet-20 (benchmarks/protocol_dense.py), then
# run the Gator and SLR compare recipes for seeds 0, 1, 2 until the time budget runs out, saving
# every finished arm x seed at once under OUT_DIR. Rerunning with the same OUT_DIR resumes (the
# dense model is reused, finished arms are not rerun).
#
#   bash benchmarks/protocol_gpu.sh OUT_DIR [BUDGET_SECONDS=480] [PARALLEL_THREADS=2]
#
# Layout: OUT_DIR/protocol_dense_resnet20.{safetensors,json,jsonl}, OUT_DIR/compare_gator_resnet20/,
# OUT_DIR/compare_slr_resnet20/ (arms/<arm>/seed<k>.json, compare.md, compare.json, the plot),
# OUT_DIR/logs/. Six compare processes (2 recipes x 3 seeds) share the GPU at once: a ResNet-20 step
# is launch-bound, so one process leaves most of the GPU idle. Their latency columns are therefore
# measured beside the other processes (speed-ups are same-run ratios against the dense model);
# rerun `prunekit compare <recipe> --out <dir> --arms <arm>` alone for clean timings.
# Expected on one H200 (estimates from the H100 figures in the design notes, not measured: a
# ResNet-56 epoch at batch 256 took 5.8 s there, launch-bound): dense model 2-3 minutes (30 epochs
# of about 2 s plus data decoding); one arm x seed about 40-60 s alone, 2-3x that with six
# processes sharing the GPU. A 480 s budget therefore covers the dense model and about the first
# 3-4 arms of each recipe (recipe order: the most informative first) for all three seeds;
# 15-20 minutes cover every arm. Rerun with the same OUT_DIR to continue.
# Environment knobs (for a CPU rehearsal of the flow): DEVICE (cuda), SEEDS ("0 1 2"),
# RECIPES ("gator slr"), DATA (the tarball; found beside the repository by default), DENSE_ARGS (extra protocol_dense.py flags), OVERRIDES (extra compare overrides).
set -u
OUT=${1:?usage: protocol_gpu.sh OUT_DIR [BUDGET_SECONDS] [THREADS_PER_PROCESS]}
BUDGET=${2:-480}
THREADS=${3:-2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/logs"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-0 1 2}
RECIPES=${RECIPES:-gator slr}
DENSE_ARGS=${DENSE_ARGS:-}
OVERRIDES=${OVERRIDES:-}
# The JPEG CIFAR-10: DATA, else ../shared/data or shared/data beside the repository root.
if [ -z "${DATA:-}" ]; then
  for d in ../shared/data/cifar10-jpg.tar.gz shared/data/cifar10-jpg.tar.gz; do
    [ -f "$d" ] && DATA=$(cd "$(dirname "$d")" && pwd)/$(basename "$d") && break
  done
fi
[ -f "${DATA:-}" ] || { echo "CIFAR-10 tarball not found; set DATA=/path/to/cifar10-jpg.tar.gz"; exit 1; }
OVERRIDES="data.root=$DATA $OVERRIDES"

echo "== dense model ($(date -u +%T))"
python benchmarks/protocol_dense.py --device "$DEVICE" --threads "$THREADS" --out "$OUT/protocol_dense_resnet20" \
    --data "$DATA" $DENSE_ARGS 2>&1 | tee "$OUT/logs/dense.log"
DENSE="$OUT/protocol_dense_resnet20.safetensors"
[ -f "$DENSE" ] || { echo "no dense model; stopping"; exit 1; }

if [ "$(left)" -gt 30 ]; then
  echo "== compare runs, $(left) s left ($(date -u +%T))"
  pids=()
  for recipe in $RECIPES; do
    for seed in $SEEDS; do
      timeout --signal=TERM "$(left)" python -m prunekit compare "recipes/compare_${recipe}_resnet20.yaml" \
          "seeds=[$seed]" device="$DEVICE" threads="$THREADS" dense.weights="$DENSE" bench.device="$DEVICE" \
          $OVERRIDES --out "$OUT/compare_${recipe}_resnet20_seed${seed}" > "$OUT/logs/${recipe}_seed${seed}.log" 2>&1 &
      pids+=($!)
    done
  done
  wait "${pids[@]}"
fi

echo "== reports from the finished records ($(date -u +%T))"
SEED_LIST="[$(echo $SEEDS | tr ' ' ',')]"
for recipe in $RECIPES; do
  # one process holds a compare folder: each seed ran in its own; their records (arms/<arm>/seed<n>.json)
  # come together in one folder, whose report reads them all
  mkdir -p "$OUT/compare_${recipe}_resnet20/arms"
  for seed in $SEEDS; do
    [ -d "$OUT/compare_${recipe}_resnet20_seed${seed}/arms" ] && \
      cp -rn "$OUT/compare_${recipe}_resnet20_seed${seed}/arms/." "$OUT/compare_${recipe}_resnet20/arms/"
  done
  python -m prunekit compare "recipes/compare_${recipe}_resnet20.yaml" "seeds=$SEED_LIST" device="$DEVICE" \
      dense.weights="$DENSE" bench.device="$DEVICE" $OVERRIDES --out "$OUT/compare_${recipe}_resnet20" --report-only 2>&1 | tail -n 20
done
echo "== done in $(( $(date +%s) - START )) s"
