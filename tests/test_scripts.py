"""The data and tokenizer stages as a user runs them: real subprocesses on a local corpus, offline."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import make_docs
from nanochat import dataset
from nanochat.common import UserError, print_result

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


# -----------------------------------------------------------------------------
# The same stages in-process, where they must stop in one line before (or instead of) doing work

def test_tok_train_refuses_a_vocab_past_32_bits():
    from scripts import tok_train
    with pytest.raises(UserError, match=r"^--vocab-size=5000000000 is too large"):
        tok_train.main(["--vocab-size=5000000000"])


def test_tok_stages_name_a_damaged_shard(base_dir, tokenizer):
    from scripts import tok_eval, tok_train
    data = base_dir / "base_data_climbmix"
    data.mkdir(parents=True)
    for i in (0, 1):  # row groups of one document each
        dataset.write_shard([None, "a text", "another"], str(data / dataset.shard_name(i)))
    tokenizer.save(str(base_dir / "tokenizer"))
    error = rf"^shard {data / dataset.shard_name(0)} has 1 null text\(s\) in row group 0: .* python -m nanochat.dataset"
    with pytest.raises(UserError, match=error):
        tok_train.main(["--vocab-size=300"])
    with pytest.raises(UserError, match=error):  # a damaged shard is an error, not "no data to evaluate on"
        tok_eval.main([])


@pytest.fixture
def report_sections(base_dir):
    """A report folder as a run leaves it: a header and two stages' sections."""
    from nanochat import report
    report.reset()
    print_result("tok_train", vocab_size=400, train_chars=1000)
    print_result("base_eval", core_metric=0.25)
    return base_dir / "report"


def test_report_goes_on_without_a_damaged_file(tmp_path, report_sections, capsys):
    from nanochat import report
    for name in ("header.json", "tok_train.json"):  # as a run killed mid-write would leave them
        text = (report_sections / name).read_text()
        (report_sections / name).write_text(text[:len(text) // 2])
    path, columns = report.generate(str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert f"- Run details unknown: {report_sections / 'header.json'} is unreadable (JSONDecodeError" in text
    assert f"## Tokenizer training\n{report_sections / 'tok_train.json'} is unreadable (JSONDecodeError" in text
    assert "rerun the stage to restore this section" in text
    assert "- core_metric: 0.2500" in text and columns["BASE"] == {"CORE": 0.25}  # the rest is all there
    assert capsys.readouterr().out.count("the report goes on without it") == 2


def test_report_folder_problems_are_one_line(tmp_path, report_sections, base_dir):
    from nanochat import report
    with pytest.raises(UserError, match=r"^--copy-to /nonexistent/dir is not a folder you can write"):
        report.main(["generate", "--copy-to", "/nonexistent/dir"])
    (report_sections / "notes").mkdir()  # the user's own things in the folder
    (report_sections / "notes" / "todo.txt").write_text("keep me")
    report.main(["reset"])
    assert sorted(os.listdir(report_sections)) == ["header.json", "notes"]  # the old sections gone, the notes kept
    shutil.rmtree(report_sections)
    report_sections.write_text("not a folder")
    with pytest.raises(UserError, match=rf"^{report_sections} must be a folder for the report card \(.*\): move it away"):
        print_result("tok_train", vocab_size=400)
