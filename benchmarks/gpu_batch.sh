#!/usr/bin/env bash
# Run a list of independent training jobs side by side on one GPU until a deadline: the way to
# spend a short GPU lease on many small CIFAR trainings, which are launch-bound and leave one GPU
# mostly idle when run one at a time.
#
#   bash benchmarks/gpu_batch.sh JOBS_FILE OUT_DIR [BUDGET_SECONDS=500] [PARALLEL=8]
#
# JOBS_FILE: one job per line, "<name> <estimated seconds> <command ...>", in priority order;
# blank lines and lines starting with # are skipped; $DATA in a command is replaced by the CIFAR-10
# tarball and $OUT by OUT_DIR. A job starts only if its estimate fits in the time left; every job
# is killed at the deadline; each writes its own log under OUT_DIR/logs. Jobs should write their
# results incrementally under $OUT (the repository's benchmarks do), so a killed job loses only
# what it had not finished.
#
# CUDA MPS is started when nvidia-cuda-mps-control exists and a test client works (kernels of
# several processes then share the GPU at once); otherwise the processes time-slice it.
# Measured on one H200 (2026-11-30, CIFAR ResNet-20, 30 epochs, batch 256, eager float32): one
# process alone 76 s; 6 processes under MPS about 205 s each; 14 processes under MPS 330-405 s
# each; an SSC model in its structured execution did not finish in 222 s beside 5 others (use
# the masked execution for training: the default of benchmarks/ssc_cifar10.py).
# Latency measurements must not run beside these jobs: time them first, on a quiet GPU.
set -u
JOBS=${1:?usage: gpu_batch.sh JOBS_FILE OUT_DIR [BUDGET_SECONDS] [PARALLEL]}
OUT=${2:?usage: gpu_batch.sh JOBS_FILE OUT_DIR [BUDGET_SECONDS] [PARALLEL]}
BUDGET=${3:-500}
PARALLEL=${4:-8}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/logs"
END=$(( $(date +%s) + BUDGET ))
left() { echo $(( END - $(date +%s) )); }
if [ -z "${DATA:-}" ]; then
  for d in ../shared/data/cifar10-jpg.tar.gz shared/data/cifar10-jpg.tar.gz .gpu/cifar10-jpg.tar.gz; do
    [ -f "$d" ] && DATA=$(cd "$(dirname "$d")" && pwd)/$(basename "$d") && break
  done
fi
[ -f "${DATA:-}" ] || { echo "CIFAR-10 tarball not found; set DATA=/path/to/cifar10-jpg.tar.gz"; exit 1; }
# decode the images once into the cache, so that the jobs do not all decode them at the same time
python3 -c "from prunekit.protocol import PROTOCOL; from prunekit.data import load_data; load_data(PROTOCOL.data_config(device='cpu', root='$DATA'))" \
  > "$OUT/logs/decode.log" 2>&1 || { echo "decoding the data failed: $OUT/logs/decode.log"; exit 1; }
MPS=0
if command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/prunekit_mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/prunekit_mps_log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if timeout 10 nvidia-cuda-mps-control -d && timeout 60 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    MPS=1
  else
    echo quit | timeout 10 nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi
echo "mps=$MPS, $PARALLEL at a time, $(left) s left"
PIDS=()
while read -r name est cmd; do
  case "$name" in ""|\#*) continue ;; esac
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 2; done
  if [ "$(left)" -lt "$est" ]; then echo "skip $name ($(left) s left, needs ~$est)"; continue; fi
  cmd=${cmd//\$DATA/$DATA}; cmd=${cmd//\$OUT/$OUT}
  echo "start $name $(date -u +%T)"
  timeout "$(left)" bash -c "$cmd" > "$OUT/logs/$name.log" 2>&1 &
  PIDS+=($!)
done < "$JOBS"
[ ${#PIDS[@]} -gt 0 ] && wait "${PIDS[@]}"
[ $MPS = 1 ] && (echo quit | timeout 10 nvidia-cuda-mps-control)
echo "done $(date -u +%T), $(left) s left"
