#!/usr/bin/env bash
# The ~$1000 tier: a d32 model (about 1.9B parameters) on one 8-GPU node, ~33 hours, then the chat stages.
#   bash runs/run1000.sh        (NPROC=4 on fewer GPUs: gradient accumulation compensates)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
NPROC="${NPROC:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"
source runs/setup.sh
python -m nanochat.report reset

python -m nanochat.dataset -n 16
python -m nanochat.dataset -n 800 > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
DOWNLOAD_PID=$!
python -m scripts.tok_train
python -m scripts.tok_eval
wait $DOWNLOAD_PID

T="torchrun --standalone --nproc_per_node=$NPROC -m"
$T scripts.base_train -- --depth=32 --device-batch-size=8 --run="$WANDB_RUN"
$T scripts.base_loss -- --device-batch-size=8
$T scripts.base_eval
$T scripts.mid_train -- --device-batch-size=8 --run="$WANDB_RUN"
$T scripts.chat_eval -- -i mid
$T scripts.chat_sft -- --device-batch-size=8 --run="$WANDB_RUN"
$T scripts.chat_eval -- -i sft
python -m nanochat.report generate
echo "talk to it: python -m scripts.chat_web (then open http://localhost:8000) or python -m scripts.chat_cli"
