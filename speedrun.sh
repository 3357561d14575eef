#!/usr/bin/env bash
# The $100 tier: the whole nanochat pipeline on one 8-GPU node. It installs what it needs.
#   bash speedrun.sh        (DEPTH=24 or 26 for bigger models; NPROC=4 on fewer GPUs: gradient accumulation compensates;
#                            RL=1 to add reinforcement learning on GSM8K)
# Stages: data -> tokenizer -> pretraining -> base evaluation -> midtraining -> SFT -> chat evaluation (RL optional).
# It ends with report.md, the report card.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
DEPTH="${DEPTH:-20}"
NPROC="${NPROC:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"
source runs/setup.sh
python -m nanochat.report reset

# 8 shards (~2B chars) are enough for the tokenizer; the rest of pretraining's ~170 shards download meanwhile
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 170 > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
DOWNLOAD_PID=$!
python -m scripts.tok_train
python -m scripts.tok_eval
wait $DOWNLOAD_PID

torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- --depth="$DEPTH" --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_loss
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_eval
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.mid_train -- --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_eval -- -i mid
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_sft -- --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_eval -- -i sft
if [ "${RL:-0}" = 1 ]; then  # optional: RL on GSM8K
    torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_rl -- --run="$WANDB_RUN"
    torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_eval -- -i rl -a GSM8K
fi
python -m nanochat.report generate
echo "talk to it: python -m scripts.chat_web (then open http://localhost:8000) or python -m scripts.chat_cli"
