import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from nanochat.engine import TextStream
from nanochat.retrieval import KnowledgeBase
from test_chat_web import make_chat_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(base_dir, *args, stdin=None):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DTYPE": "float32"}
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_one_shot_and_repl(base_dir, tokenizer):
    make_chat_model_dir(base_dir, tokenizer)
    corpus = base_dir / "sky.txt"
    corpus.write_text("The sky is blue because air scatters blue light more than red light.")
    KnowledgeBase.build("sky", [corpus], dense=False)
    proc = run_cli(base_dir, "-i", "base", "-p", "Why is the sky blue?", "-t", "0", "-m", "10", "--kb", "sky")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["turns"] == 1 and result["tokens_generated"] == 10 and "Assistant: " in proc.stdout
    assert result["kb"] == "sky" and result["searches"] == 0  # this model was never taught to search
    assert result["last_answer"] in proc.stdout  # what was streamed is the answer
    assert result["compiled"]  # decoding is compiled by default; --eager gives the same answer without compiling
    eager = run_cli(base_dir, "-i", "base", "-p", "Why is the sky blue?", "-t", "0", "-m", "10", "--kb", "sky", "--eager")
    eager = json.loads(eager.stdout.strip().splitlines()[-1])
    assert not eager["compiled"] and eager["last_answer"] == result["last_answer"]

    proc = run_cli(base_dir, "-i", "base", "-t", "0", "-m", "5", "--eager", stdin="hello\nclear\n\nhello\nexit\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["turns"] == 2 and "(new conversation)" in proc.stdout
    answers = [line for line in proc.stdout.splitlines() if line.startswith("Assistant: ")]
    assert len(answers) == 2 and answers[0] == answers[1]  # after 'clear', the same greedy answer to the same prompt


def test_a_long_conversation_drops_its_oldest_turns(base_dir, tokenizer):
    make_chat_model_dir(base_dir, tokenizer)  # the model reads 1024 tokens
    def words(tokens):  # a message of at least this many tokens
        text = "river stone light garden "
        while len(tokenizer.encode(text)) < tokens:
            text += "river stone light garden "
        return text
    message, too_long = words(400), words(1100)  # the third message overflows; too_long never fits
    proc = run_cli(base_dir, "-i", "base", "-t", "0", "-m", "5", stdin=f"{message}\n{message}\n{too_long}\n{message}\nexit\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["turns"] == 3
    assert proc.stdout.count("(the conversation outgrew the 1024 tokens this model reads: dropped the oldest turn)") == 1
    assert "; this model reads at most 1023: write a shorter one)" in proc.stdout
    proc = run_cli(base_dir, "-i", "base", "-p", too_long)  # one-shot: nothing to drop, one line
    assert proc.returncode == 1 and proc.stderr.strip().endswith("this model reads at most 1023: write a shorter one")


def test_ctrl_c_stops_the_answer_and_twice_at_the_prompt_leaves(base_dir, tokenizer):
    make_chat_model_dir(base_dir, tokenizer)  # its answers never end by themselves
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DTYPE": "float32"}
    # past the trained context, so an answer runs on for 10,000 tokens: seconds even compiled on a fast machine
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", "-i", "base", "-t", "0", "-m", "10000",
                             "--past-context"], cwd=REPO,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True).start()

    def wait_for(text, count=1):
        deadline = time.time() + 60
        while "".join(out).count(text) < count:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()  # first: reading the stderr of a live process would wait for ever
                pytest.fail(f"no {text!r} (x{count}) in:\n{''.join(out)}\nstderr:\n{proc.stderr.read()}")
            time.sleep(0.05)

    for turn in (1, 2):
        proc.stdin.write("tell me everything\n")
        proc.stdin.flush()
        wait_for("Assistant: ", turn)
        time.sleep(0.5)  # some of the answer is out
        proc.send_signal(signal.SIGINT)
        wait_for(" [stopped]", turn)
        wait_for("User: ", turn + 1)
    proc.send_signal(signal.SIGINT)  # at the prompt: a warning, the conversation stays
    wait_for("(Ctrl-C again, or 'quit', to leave)")
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    result = json.loads("".join(out).strip().splitlines()[-1])
    assert result["turns"] == 2 and result["tokens_generated"] > 0


def test_missing_model_is_one_line(base_dir):
    proc = run_cli(base_dir, "-p", "hi")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("run python -m scripts.chat_sft first")


def test_text_stream_shows_tool_calls_and_whole_characters(tokenizer):
    sp = tokenizer.encode_special
    stream = TextStream(tokenizer)
    ids = [*tokenizer.encode("so "), sp("<|python_start|>"), *tokenizer.encode("12*3"), sp("<|python_end|>"),
           sp("<|output_start|>"), *tokenizer.encode("36"), sp("<|output_end|>"), *tokenizer.encode(" café 🤖")]
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == "so [calculator: 12*3 = 36] café 🤖"
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters are never split into halves
    stream = TextStream(tokenizer)  # a call the calculator could not answer still closes
    ids = [sp("<|python_start|>"), *tokenizer.encode("x+1"), sp("<|python_end|>"), *tokenizer.encode(" ok")]
    assert "".join(stream.push(t) for t in ids) == "[calculator: x+1] ok"


def test_answers_stop_where_the_trained_context_ends_unless_past_context(base_dir, tokenizer):
    make_chat_model_dir(base_dir, tokenizer, sequence_len=32)  # a model whose answers never end, trained on 32 tokens
    proc = run_cli(base_dir, "-i", "base", "-p", "hi", "-t", "0", "-m", "100")
    assert proc.returncode == 0, proc.stderr
    prompt = len(tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]}))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens_generated"] == 32 - prompt
    assert "[stopped: the conversation filled the 32 tokens this model was trained on; --past-context lets answers " \
           "run on]" in proc.stdout
    proc = run_cli(base_dir, "-i", "base", "-p", "hi", "-t", "0", "-m", "100", "--past-context")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens_generated"] == 100 and "[stopped" not in proc.stdout
