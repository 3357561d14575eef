#!/usr/bin/env bash
# A depth sweep: base models d12 ... d26 at the compute-optimal horizon, one after another, results in a CSV.
#   bash runs/miniseries.sh [series-name]          (DEPTHS="12 16 20" NPROC=8 to change the sweep)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
SERIES="${1:-miniseries}"
DEPTHS="${DEPTHS:-12 14 16 18 20 22 24 26}"
NPROC="${NPROC:-8}"
source runs/setup.sh
OUT="$NANOCHAT_BASE_DIR/$SERIES"
mkdir -p "$OUT"
for d in $DEPTHS; do
    if [ "$d" -ge 28 ]; then B=8; elif [ "$d" -ge 20 ]; then B=16; else B=32; fi  # what fits in 80 GB
    torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- --depth="$d" --device-batch-size="$B" \
        --model-tag="${SERIES}_d$d" --core-metric-every=999999 --core-metric-max-per-task=-1 --sample-every=-1 \
        --run="${WANDB_RUN:-dummy}" | tee "$OUT/d$d.log"
    python -m dev.results_csv "$OUT/results.csv" "$OUT/d$d.log" --fields depth num_params num_scaling_params \
        num_iterations tokens total_batch_size min_val_bpb core_metric total_training_time mfu
done
cat "$OUT/results.csv"
