"""The whole pipeline as a user runs it, at micro scale, offline: bash runs/runcpu.sh from tokenizer to report card,
for a hybrid model (MIXER_PATTERN=AM: the attention-only stages are run by test_chat_pipeline and test_base_train)
with retrieval (RAG=1: the default's math RL and evaluation run in test_chat_pipeline), then chat_web answering from
the hybrid it made, searching the knowledge base the pipeline built."""

import json
import os
import subprocess

from conftest import make_docs
from nanochat import dataset
from test_chat_web import post, start_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = {"DEPTH": "2", "SEQ_LEN": "64", "DEVICE_BATCH": "4", "TOTAL_BATCH": "256", "BASE_STEPS": "6", "MID_STEPS": "3",
         "SFT_STEPS": "3", "RL_STEPS": "1", "EVAL_TOKENS": "512", "EVAL_PROBLEMS": "2", "CHAT_DATA": "offline",
         "RUN_CORE": "0", "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1",
         "MIXER_PATTERN": "AM",  # a hybrid: attention, then a Mamba-2 layer, through every stage
         "RAG": "1", "RAG_SEQ_LEN": "256"}  # the offline knowledge base, RAG SFT and RL, eval with and without it


def test_runcpu_end_to_end_at_micro_scale(base_dir, tmp_path):
    shards = base_dir / "base_data_climbmix"  # the corpus is in place, so nothing is downloaded
    shards.mkdir(parents=True)
    docs = make_docs(1200, seed=3, max_words=80)
    dataset.write_shard(docs[:1100], str(shards / dataset.shard_name(0)))
    dataset.write_shard(docs[1100:], str(shards / dataset.shard_name(1)))
    env = {**os.environ, **MICRO, "NANOCHAT_BASE_DIR": str(base_dir), "REPORT_COPY_TO": str(tmp_path)}
    proc = subprocess.run(["bash", "runs/runcpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"stage"')]
    stages = [r["stage"] for r in results]
    assert stages == ["report", "tok_train", "tok_eval", "gen_rag_data", "rag_index", "base_train", "base_loss", "mid_train",
                      "chat_eval", "chat_sft", "chat_eval", "chat_rl", "chat_eval", "report"]
    assert [r["source"] for r in results if r["stage"] == "chat_eval"] == ["mid", "sft", "rl"]
    base, sft, rl = (next(r for r in results if r["stage"] == s) for s in ("base_train", "chat_sft", "chat_rl"))
    assert base["num_iterations"] == 6 and base["mixers"] == "AM" and results[7]["step"] == 3
    assert results[4]["chunks_added"] > 600 and set(results[4]["recall"]) == {"bm25", "dense", "hybrid"}
    assert sft["kb"] == rl["kb"] == "synthetic" and rl["searches_per_answer"] >= 0

    report = (tmp_path / "report.md").read_text()
    for title in ("Tokenizer training", "Knowledge base", "Base model training", "Midtraining", "Supervised finetuning",
                  "Reinforcement learning", "Chat evaluation (rl)", "Summary"):
        assert f"## {title}" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0] == "| Metric | BASE | MID | SFT | RL |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table[1:]}
    rag_rows = {f"RAG-{mode}{hops}" for mode in ("closed", "context", "search") for hops in ("", " 1-hop", " multi-hop")}
    assert set(rows) == {"HumanEval", "SpellingBee", "SyntheticMath"} | rag_rows
    for name, cells in rows.items():  # BASE has no chat evaluation; MID (not RAG), SFT and RL each have a number
        assert cells[0] == "-" and (cells[1] == "-") == (name in rag_rows)
        assert all(0 <= float(c.strip(" |")) <= 1 for c in cells[1:] if c.strip(" |") != "-")
    assert "Total wall clock time" in report and (tmp_path / "report_curves.svg").exists()
    assert "talk to it: python -m scripts.chat_cli -i rl --kb synthetic" in proc.stdout

    # the hybrid answers in the browser's API: its Mamba layer decodes from the state the Engine keeps for it
    proc, url = start_server(base_dir, "-i", "rl", "-m", "8", "--kb", "synthetic", env={"OMP_NUM_THREADS": "1"})
    try:
        status, body = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                            "temperature": 0, "max_tokens": 8})
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    answer = json.loads(body)
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1, body
    assert json.loads(out.strip().splitlines()[-1])["requests"] == 1
