"""The data and tokenizer stages as a user runs them: real subprocesses on a local corpus, offline."""

import json
import os
import subprocess
import sys

from conftest import make_docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, expect_ok=True):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert (proc.returncode == 0) == expect_ok, proc.stdout + proc.stderr
    return proc


def result(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_then_tokenizer_pipeline(tmp_path, base_dir):
    # before any data or tokenizer: one-line errors that say what to run
    err = run("scripts.tok_train", "--vocab-size=300", expect_ok=False).stderr.strip()
    assert err == f"error: no pretraining shards under {base_dir}: run python -m nanochat.dataset -n 8 " \
                  "(or python -m nanochat.dataset --local PATH to build them from local text files)"
    err = run("scripts.tok_eval", expect_ok=False).stderr.strip()
    assert err == f"error: no tokenizer at {base_dir}/tokenizer/tokenizer.pkl: run python -m scripts.tok_train first"

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(make_docs(600, seed=5)))
    data = result(run("nanochat.dataset", "--local", str(corpus), "--doc-chars", "800"))
    assert data["stage"] == "dataset" and data["shards"] == 2

    err = run("scripts.tok_train", "--vocab-size=100", expect_ok=False).stderr
    assert err.strip() == "error: --vocab-size=100 is too small: it must be at least 265 (256 bytes + 9 special tokens)"

    trained = result(run("scripts.tok_train", "--vocab_size=400", "--max-chars=200000", "--doc-cap=500"))
    assert trained["stage"] == "tok_train" and trained["vocab_size"] == 400
    assert 200_000 <= trained["train_chars"] < 200_000 + 500
    assert os.path.exists(trained["tokenizer"]) and os.path.exists(trained["token_bytes"])

    evaluated = run("scripts.tok_eval")
    ratios = result(evaluated)["bytes_per_token"]["ours"]
    assert set(ratios) == {"news", "korean", "code", "math", "science", "train", "val"}
    assert ratios["train"] > 1.5  # a trained tokenizer compresses its own kind of text
