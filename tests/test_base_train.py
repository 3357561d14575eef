"""Pretraining and base evaluation as a user runs them: real subprocesses, a tiny model, offline data."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import make_docs
from nanochat import dataset
from test_core_eval import write_bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=4",
        "--total-batch-size=512", "--eval-tokens=512", "--core-metric-every=-1", "--sample-every=-1", "--warmup-steps=2"]


@pytest.fixture
def workspace(base_dir, tokenizer):
    data = base_dir / "base_data_climbmix"
    data.mkdir(parents=True)
    docs = make_docs(900, seed=21, max_words=120)
    dataset.write_shard(docs[:400], str(data / dataset.shard_name(0)))
    dataset.write_shard(docs[400:800], str(data / dataset.shard_name(1)))
    dataset.write_shard(docs[800:], str(data / dataset.shard_name(2)))
    tokenizer.save(str(base_dir / "tokenizer"))
    import torch
    torch.save(torch.tensor(tokenizer.token_bytes(), dtype=torch.int32), base_dir / "tokenizer" / "token_bytes.pt")
    return base_dir


def run(module, *args, nproc=1, expect_ok=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, env={**os.environ, "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1"})
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def result(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_lines(proc):
    """The progress lines without their timings: 'step 00005/00008 (62.50%) | loss: ... | lrm: ...'."""
    return [" | ".join(line.split(" | ")[:3]) for line in proc.stdout.splitlines() if line.startswith("step ") and "/" in line]


def test_train_resume_and_evaluate(workspace):
    full = run("scripts.base_train", *TINY, "--num-iterations=8", "--save-every=4", "--eval-every=4")
    out = result(full)
    assert out["stage"] == "base_train" and out["step"] == 8 and out["num_iterations"] == 8
    assert out["total_batch_size"] == 512 and out["tokens"] == 8 * 512
    assert "Parameter counts:" in full.stdout and "FLOPs per token" in full.stdout
    ckpt = workspace / "base_checkpoints" / "d2"
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("meta")) == ["meta_000004.json", "meta_000008.json"]

    # a run resumed from step 4 continues exactly as the uninterrupted one: same losses, same val bpb
    resumed = run("scripts.base_train", *TINY, "--num-iterations=8", "--save-every=4", "--eval-every=4", "--resume-from-step=4")
    assert step_lines(resumed) == step_lines(full)[4:]
    assert result(resumed)["val_bpb"] == out["val_bpb"] and result(resumed)["train_loss"] == out["train_loss"]

    loss = result(run("scripts.base_loss", "--device-batch-size=4", "--split-tokens=1024", "--num-samples=2"))
    assert loss["step"] == 8 and 0 < loss["val_bpb"] < 20 and 0 < loss["train_bpb"] < 20
    assert len(loss["samples"]["prompted"]) == 7 and len(loss["samples"]["unconditioned"]) == 2

    write_bundle(str(workspace / "eval_bundle"))
    core = result(run("scripts.base_eval", "--max-per-task=4"))
    assert set(core["results"]) == {"mc_task", "schema_task", "lm_task"} and -2 < core["core_metric"] < 1
    with open(core["csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Task", "Accuracy", "Centered"] and rows[-1][0] == "CORE"


def test_two_processes_train_and_resume_exactly(workspace):
    args = [*TINY, "--num-iterations=4", "--save-every=2", "--eval-every=-1", "--model-tag=ddp"]
    full = run("scripts.base_train", *args, nproc=2)
    out = result(full)
    assert out["world_size"] == 2 and out["total_batch_size"] == 512  # one micro-step per rank: 2 x 4 x 64
    meta = json.loads((workspace / "base_checkpoints" / "ddp" / "meta_000002.json").read_text())
    states = meta["dataloader_state_dicts"]
    assert [s["rank"] for s in states] == [0, 1]
    assert sorted(os.listdir(workspace / "base_checkpoints" / "ddp"))[:2] == ["meta_000002.json", "meta_000004.json"]
    resumed = run("scripts.base_train", *args, "--resume-from-step=2", nproc=2)
    assert step_lines(resumed) == step_lines(full)[2:]
    assert result(resumed)["val_bpb"] == out["val_bpb"]


def test_user_errors_are_one_line(workspace):
    err = run("scripts.base_train", *TINY, "--total-batch-size=1000", expect_ok=False).stderr.strip().splitlines()[-1]
    assert err == ("error: --total-batch-size=1000 is not a multiple of device_batch_size x max_seq_len x processes = 256: "
                   "change one of them")
    err = run("scripts.base_train", "--depth=0", expect_ok=False).stderr.strip().splitlines()[-1]
    assert err.endswith("error: --depth must be at least 1 (see --help)")
    err = run("scripts.base_loss", "--model-tag=d99", expect_ok=False).stderr.strip().splitlines()[-1]
    assert err.startswith("error: no base checkpoints in") and err.endswith("run python -m scripts.base_train first")
