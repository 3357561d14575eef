#!/usr/bin/env bash
# An isoFLOP sweep: for each compute budget, several depths trained for exactly that many FLOPs; results in a CSV
# to fit the compute-optimal model size and tokens:params ratio.
#   bash runs/scaling_laws.sh [label]     (FLOPS="1e18 2.15e18" DEPTHS="10 12 14" NPROC=8 to change it)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
LABEL="${1:-scaling}"
FLOPS="${FLOPS:-1e18 2.15e18 4.64e18 1e19}"
DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
NPROC="${NPROC:-8}"
source runs/setup.sh
OUT="$NANOCHAT_BASE_DIR/scaling_laws_$LABEL"
mkdir -p "$OUT"
for f in $FLOPS; do
    for d in $DEPTHS; do
        log="$OUT/f${f}_d$d.log"
        if [ -f "$log" ] && tail -n 1 "$log" | grep -q '^{'; then continue; fi  # done in an earlier invocation
        torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- --depth="$d" --target-flops="$f" \
            --target-param-data-ratio=-1 --model-tag="${LABEL}_f${f}_d$d" --eval-tokens=$((100 * 524288)) \
            --core-metric-every=999999 --core-metric-max-per-task=-1 --sample-every=-1 | tee "$log"
        python -m dev.results_csv "$OUT/results.csv" "$log" --fields depth num_params num_scaling_params \
            flops_per_token num_iterations tokens total_batch_size min_val_bpb core_metric
    done
done
cat "$OUT/results.csv"
