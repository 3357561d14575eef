#!/usr/bin/env bash
# On a fresh GPU pod (RunPod, or any Linux machine): install, get a chat model, serve it, and say where and with which key.
#   bash runs/cloud_start.sh USER/NAME   # pull USER/NAME's sft model from the Hugging Face Hub (or NANOCHAT_HF_REPO=USER/NAME)
#   bash runs/cloud_start.sh             # none named: serve the sft model here, or first train one with speedrun.sh
# PORT: default 8000. NANOCHAT_API_KEY: default one made on the first run and kept in $NANOCHAT_BASE_DIR/api_key.
# HF_TOKEN for a private repo, HF_ENDPOINT for a mirror. NANOCHAT_START_TIMEOUT: seconds chat_web may take to load
# (default 600). Safe to run again: a server already answering on PORT with the key (and only with it) is reused, and a
# pull downloads only what is not here yet. The last line is JSON: url, api_key, pid, model, model_tag, step, reused, log.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
HF_REPO="${1:-${NANOCHAT_HF_REPO:-}}"
PORT="${PORT:-8000}"
START_TIMEOUT="${NANOCHAT_START_TIMEOUT:-600}"
if ! command -v curl >/dev/null; then
    echo "error: curl is missing, and this script asks the server with it: install it (apt-get install -y curl)" >&2
    exit 1
fi
if ! [[ "$START_TIMEOUT" =~ ^[0-9]+$ ]]; then
    echo "error: NANOCHAT_START_TIMEOUT=$START_TIMEOUT must be a whole number of seconds" >&2
    exit 1
fi
mkdir -p "$NANOCHAT_BASE_DIR"
source runs/setup.sh

KEY_FILE="$NANOCHAT_BASE_DIR/api_key"
if [ -z "${NANOCHAT_API_KEY:-}" ]; then
    [ -s "$KEY_FILE" ] || (umask 077 && python -c "import secrets; print('sk-' + secrets.token_urlsafe(24))" > "$KEY_FILE")
    NANOCHAT_API_KEY="$(cat "$KEY_FILE")"
fi
export NANOCHAT_API_KEY  # chat_web reads it from here: a key on its command line would show in ps
STATE="$NANOCHAT_BASE_DIR/chat_web-$PORT.state"  # "PID MODEL TAG STEP" of the server this script started on PORT
LOG="$NANOCHAT_BASE_DIR/chat_web-$PORT.log"
LOCAL_URL="http://127.0.0.1:$PORT"
answers() { curl -sf --max-time 5 "$@" >/dev/null; }
# the sft checkpoint chat_web -i sft would pick here (the largest tag, its last step), as "TAG STEP"
local_sft() { python -c 'import os; from nanochat.checkpoint_manager import find_checkpoint
folder, step = find_checkpoint("sft"); print(os.path.basename(folder), step)' 2>/dev/null; }

if answers "$LOCAL_URL/health"; then
    PID="" MODEL="unknown" TAG="" STEP=""
    [ -s "$STATE" ] && read -r PID MODEL TAG STEP < "$STATE"
    if ! answers -H "Authorization: Bearer $NANOCHAT_API_KEY" "$LOCAL_URL/v1/models"; then
        echo "error: a server on port $PORT answers, but not to the API key in $KEY_FILE (or NANOCHAT_API_KEY): stop" \
             "it${PID:+ (kill $PID)}, or pick another PORT" >&2
        exit 1
    fi
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$LOCAL_URL/v1/models")" != 401 ]; then
        echo "error: a server on port $PORT answers without an API key, so anyone who can reach it may use it: stop" \
             "it${PID:+ (kill $PID)} and run this again, or pick another PORT" >&2
        exit 1
    fi
    if [ -n "$HF_REPO" ] && [ "$MODEL" != "hub:$HF_REPO" ]; then
        echo "error: the server on port $PORT serves $MODEL, not hub:$HF_REPO: stop it${PID:+ (kill $PID)} and run" \
             "this again, or pick another PORT" >&2
        exit 1
    fi
    REUSED=1
else
    if [ -n "$HF_REPO" ]; then  # the pull's progress to stderr, its result line (the last) kept to serve what it pulled
        PULLED="$(python -m scripts.hub pull --repo "$HF_REPO" | tee /dev/stderr | tail -n 1)"
        SERVE="$(python -c 'import json, sys; r = json.loads(sys.argv[1]); print(r["model_tag"], r["step"])' "$PULLED")"
        MODEL="hub:$HF_REPO"
    elif SERVE="$(local_sft)"; then
        MODEL="local"
    else
        GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)"
        if [ "$GPUS" = 0 ]; then
            echo "error: no model named (NANOCHAT_HF_REPO or an argument), no sft checkpoint in $NANOCHAT_BASE_DIR, and" \
                 "no GPU (nvidia-smi -L) to train one with speedrun.sh: name a Hub repo, or run this on a GPU pod" >&2
            exit 1
        fi
        export NPROC="${NPROC:-$GPUS}"  # speedrun.sh assumes 8
        echo "no model named (NANOCHAT_HF_REPO or an argument) and no sft checkpoint here: training one with" \
             "speedrun.sh on $NPROC GPUs"
        bash speedrun.sh
        SERVE="$(local_sft)"
        MODEL="speedrun"
    fi
    read -r TAG STEP <<< "$SERVE"
    # in a session of its own (setsid), so that it outlives this shell and its terminal
    setsid nohup python -m scripts.chat_web -i sft -g "$TAG" -s "$STEP" --host 0.0.0.0 -p "$PORT" > "$LOG" 2>&1 < /dev/null &
    PID=$!
    echo "$PID $MODEL $TAG $STEP" > "$STATE"
    echo "waiting for chat_web (pid $PID, log $LOG) to load the model (at most ${START_TIMEOUT}s: NANOCHAT_START_TIMEOUT)"
    DEADLINE=$((SECONDS + START_TIMEOUT))
    until answers "$LOCAL_URL/health"; do
        if ! kill -0 "$PID" 2>/dev/null; then
            echo "error: chat_web stopped before it answered; the end of $LOG:" >&2
            tail -n 5 "$LOG" >&2
            exit 1
        fi
        if [ "$SECONDS" -ge "$DEADLINE" ]; then
            kill -- "-$PID" 2>/dev/null || true
            rm -f "$STATE"
            echo "error: chat_web did not answer on $LOCAL_URL/health within ${START_TIMEOUT}s, so it was stopped: raise" \
                 "NANOCHAT_START_TIMEOUT if the model is still loading; the end of $LOG:" >&2
            tail -n 5 "$LOG" >&2
            exit 1
        fi
        sleep 1
    done
    REUSED=0
fi

if [ -n "${RUNPOD_POD_ID:-}" ]; then
    URL="https://$RUNPOD_POD_ID-$PORT.proxy.runpod.net"  # RunPod's proxy to an exposed HTTP port
else
    ADDRESS="$(hostname -I 2>/dev/null | awk '{print $1}' || true)"
    URL="http://${ADDRESS:-localhost}:$PORT"
fi
echo "chat at $URL with API key $NANOCHAT_API_KEY (the page asks for it; API clients send 'Authorization: Bearer KEY')"
python -c 'import json, sys; url, key, pid, model, tag, step, reused, log = sys.argv[1:]
print(json.dumps({"url": url, "api_key": key, "pid": int(pid) if pid else None, "model": model, "model_tag": tag or None,
                  "step": int(step) if step else None, "reused": reused == "1", "log": log}))' \
    "$URL" "$NANOCHAT_API_KEY" "$PID" "$MODEL" "$TAG" "$STEP" "$REUSED" "$LOG"
