#!/usr/bin/env bash
# The $100 tier: the whole nanochat pipeline on one 8-GPU node. It installs what it needs.
#   bash speedrun.sh
# Stages so far: data -> tokenizer. Pretraining, chat finetuning, evaluation and the report join as they land.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
source runs/setup.sh

# 8 shards (~2B chars) are enough for the tokenizer; the rest of pretraining's ~170 shards download meanwhile
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 170 > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
DOWNLOAD_PID=$!
python -m scripts.tok_train
python -m scripts.tok_eval
wait $DOWNLOAD_PID
