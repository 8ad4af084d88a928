#!/usr/bin/env bash
# Evolved pruning functions on one GPU: the transfer benchmark (a) at the protocol's budget, three
# seed processes side by side, then (optionally) the mini evolution (b). Resumable: rerun the same
# command and finished (arm, seed) records and generations are kept.
#   bash benchmarks/evolve_gpu.sh            # (a) only: protocol dense model if missing, 12 arms x 3 seeds
#   MINI=1 bash benchmarks/evolve_gpu.sh     # (a) then (b)
# Expected on an H200: dense 2-3 min (benchmarks/protocol_dense.py), then 12 arms of a 15-epoch
# ResNet-20 fine-tune per seed process, about 1-1.5 min each: 15-20 min for (a) with the three
# processes sharing the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
DENSE=local/protocol_dense_resnet20.safetensors
if [ ! -f "$DENSE" ]; then python benchmarks/protocol_dense.py --device cuda; fi
for s in 0 1 2; do
  python benchmarks/evolve_transfer.py --device cuda --threads 4 --seeds "$s" \
    --out "benchmarks/results/evolve_transfer_seed$s.json" > "local/evolve_transfer_seed$s.log" 2>&1 &
done
wait
if [ "${MINI:-0}" = "1" ]; then
  python benchmarks/evolve_mini.py --device cuda --workers 4 --run-dir local/evolve_mini_gpu \
    --out benchmarks/results/evolve_mini_gpu.json
fi
