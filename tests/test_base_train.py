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
    return make_workspace(base_dir, tokenizer)


def make_workspace(base_dir, tokenizer):
    """Three shards of pretraining data and the tokenizer, as dataset.py and tok_train leave them."""
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


def run(module, *args, expect_ok=True):
    env = {**os.environ, "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, env=env)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_on_two_machines(module, *args, base_dirs=None, expect_ok=True):
    """
    Two torchrun launches, one process each, as on two machines (--nnodes=2): they meet at a c10d rendezvous on
    127.0.0.1. base_dirs: each machine's NANOCHAT_BASE_DIR (default: the test's, shared). Returns the launch whose
    process became rank 0 (the rendezvous, not --node-rank, decides which), or both stderrs when expect_ok is False.
    """
    from test_chat_web import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}  # the dtype as users get it: rank 0 decides
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={i}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=test", "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                              env={**env, "OMP_NUM_THREADS": "1", **({"NANOCHAT_BASE_DIR": base_dirs[i]} if base_dirs else {})})
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert (p.returncode == 0) == expect_ok, out[-3000:] + err[-3000:]
    if not expect_ok:
        return [err for _, err in outs]
    first = next(i for i, (out, _) in enumerate(outs) if out.strip().startswith("{") or '"stage"' in out)
    return subprocess.CompletedProcess(procs[first].args, 0, *outs[first])


def result(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_lines(proc):
    """The progress lines without their timings: 'step 00005/00008 (62.50%) | loss: ... | lrm: ...'."""
    return [" | ".join(line.split(" | ")[:3]) for line in proc.stdout.splitlines() if line.startswith("step ") and "/" in line]


def test_train_resume_and_evaluate(workspace, tokenizer, monkeypatch):
    # --eval-tokens far beyond the val split: evaluation stops after one pass over it
    full = run("scripts.base_train", *TINY, "--num-iterations=8", "--save-every=4", "--eval-every=4", "--eval-tokens=10000000")
    out = result(full)
    val_split_tokens = sum(len(tokenizer.encode(d)) + 1 for d in make_docs(900, seed=21, max_words=120)[800:])
    assert 0.5 * val_split_tokens < out["val_tokens"] < val_split_tokens
    assert f"val bpb: {out['val_bpb']:.6f} ({out['val_tokens']:,} tokens)" in full.stdout
    assert out["stage"] == "base_train" and out["step"] == 8 and out["num_iterations"] == 8
    assert out["total_batch_size"] == 512 and out["tokens"] == 8 * 512
    assert "Parameter counts:" in full.stdout and "FLOPs per token" in full.stdout
    ckpt = workspace / "base_checkpoints" / "d2"
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("meta")) == ["meta_000004.json", "meta_000008.json"]
    meta = json.loads((ckpt / "meta_000008.json").read_text())
    assert meta["tokenizer"] == tokenizer.fingerprint() and meta["compute_dtype"] == "float32"

    # a run resumed from step 4 continues exactly as the uninterrupted one: same losses, same val bpb
    resumed = run("scripts.base_train", *TINY, "--num-iterations=8", "--save-every=4", "--eval-every=4", "--eval-tokens=10000000",
                  "--resume-from-step=4")
    assert step_lines(resumed) == step_lines(full)[4:]
    assert result(resumed)["val_bpb"] == out["val_bpb"] and result(resumed)["train_loss"] == out["train_loss"]

    # resuming into another model, or past the run's end, is one line (in-process: these stop before any work)
    from scripts import base_train
    from nanochat.common import UserError
    with pytest.raises(UserError, match=r"d2 step 4 is another model \(n_layer: saved 2, now 3; n_head: saved 2, now 3; "
                                        r"n_kv_head: saved 2, now 3; n_embd: saved 64, now 96\): "
                                        r"resume with the flags it was trained with, or give this run its own --model-tag"):
        base_train.main([*TINY, "--depth=3", "--model-tag=d2", "--resume-from-step=4", "--num-iterations=8"])
    with pytest.raises(UserError, match=r"--resume-from-step=8 is already at or past this run's last step \(8\): "
                                        r"ask for more steps with --num-iterations"):
        base_train.main([*TINY, "--num-iterations=8", "--resume-from-step=8"])
    # a resumed run freezes the GC after its own first step too (the reference's tested step == 1 only)
    import gc
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    base_train.main([*TINY, "--num-iterations=6", "--resume-from-step=4", "--eval-every=-1", "--model-tag=d2"])
    assert frozen == [True]

    loss = result(run("scripts.base_loss", "--device-batch-size=4", "--split-tokens=1024", "--num-samples=2"))
    assert loss["step"] == 8 and 0 < loss["val_bpb"] < 20 and 0 < loss["train_bpb"] < 20
    assert len(loss["samples"]["prompted"]) == 7 and len(loss["samples"]["unconditioned"]) == 2

    write_bundle(str(workspace / "eval_bundle"))
    core = result(run("scripts.base_eval", "--max-per-task=4"))
    assert set(core["results"]) == {"mc_task", "schema_task", "lm_task"} and -2 < core["core_metric"] < 1
    with open(core["csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Task", "Accuracy", "Centered"] and rows[-1][0] == "CORE"


def test_two_machines_train_and_resume_exactly(workspace, monkeypatch):
    """Two launches meeting at a rendezvous, as on two machines sharing NANOCHAT_BASE_DIR; with NANOCHAT_DTYPE unset,
    as users run it: the dtype comes from the hardware, and rank 0 decides for both. (--standalone, one launch of
    several processes, is what tests/test_distributed.py and test_optimizers.py run.)"""
    from nanochat.common import get_compute_dtype
    args = [*TINY, "--num-iterations=4", "--save-every=2", "--eval-every=-1", "--model-tag=ddp"]
    full = run_on_two_machines("scripts.base_train", *args)
    out = result(full)
    assert out["world_size"] == 2 and out["total_batch_size"] == 512  # one micro-step per rank: 2 x 4 x 64
    meta = json.loads((workspace / "base_checkpoints" / "ddp" / "meta_000002.json").read_text())
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    get_compute_dtype.cache_clear()
    assert meta["compute_dtype"] == out["compute_dtype"] == str(get_compute_dtype("cpu")[0]).removeprefix("torch.")
    get_compute_dtype.cache_clear()
    states = meta["dataloader_state_dicts"]
    assert [s["rank"] for s in states] == [0, 1]
    assert sorted(os.listdir(workspace / "base_checkpoints" / "ddp"))[:2] == ["meta_000002.json", "meta_000004.json"]
    resumed = run_on_two_machines("scripts.base_train", *args, "--resume-from-step=2")
    assert step_lines(resumed) == step_lines(full)[2:]
    assert result(resumed)["val_bpb"] == out["val_bpb"]

    # saved by 2 processes, resumed by 1 and by 4: the optimizer state reshards, the loaders restart together
    for launch in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]):
        batch = "--device-batch-size=4" if len(launch) == 1 else "--device-batch-size=2"  # 512 tokens a step either way
        proc = subprocess.run([*launch, "-m", "scripts.base_train", *args, batch, "--resume-from-step=2"], cwd=REPO,
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        size = 1 if len(launch) == 1 else 4
        assert f"resuming 2 data-parallel ranks' positions on {size}" in proc.stdout
        assert result(proc)["step"] == 4 and result(proc)["world_size"] == size and len(step_lines(proc)) >= 2
    sft = run("scripts.chat_sft", "--source=base", "--model-tag=ddp", "--data=offline", "--num-iterations=1",
              "--eval-tokens=256")
    # step 4's optimizer state, saved by the 4 processes last: finetuning in 1 takes it, resharded
    assert "the source's optimizer state was saved by 4 processes, this run has 1: resharding it" in sft.stdout
    assert result(sft)["stage"] == "chat_sft"


def test_sharded_runs_save_whole_and_resume_under_any_mode(workspace):
    """--parallel fsdp on 2 processes trains, samples on every rank (printed once) and saves one whole optimizer
    state; --parallel tp on 2 and plain one-process training both resume it, the same way (tp ranks read the same
    rows, so both read as one process does); finetuning under fsdp takes its momenta."""
    def torchrun(*args):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                              env={**os.environ, "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc
    args = [*TINY, "--num-iterations=4", "--save-every=2", "--eval-every=-1", "--model-tag=sharded"]
    full = torchrun("-m", "scripts.base_train", *args, "--parallel=fsdp", "--sample-every=2")  # trains on after sampling
    assert result(full)["parallel"] == "fsdp" and result(full)["world_size"] == 2
    assert full.stdout.count("The capital of France is") == 2  # steps 2 and 4, printed by rank 0 alone
    saved = sorted(os.listdir(workspace / "base_checkpoints" / "sharded"))
    assert [name for name in saved if name.startswith("optim_")] == ["optim_000002_rank0.pt", "optim_000004_rank0.pt"]
    tp = torchrun("-m", "scripts.base_train", *args, "--parallel=tp", "--resume-from-step=2")
    one = run("scripts.base_train", *args, "--resume-from-step=2")
    assert "resuming 2 data-parallel ranks' positions on 1" in tp.stdout
    assert step_lines(tp) == step_lines(one) and len(step_lines(one)) == 2
    assert result(tp)["val_bpb"] == result(one)["val_bpb"] and result(tp)["tp"] == 2
    sft = torchrun("-m", "scripts.chat_sft", "--source=base", "--model-tag=sharded", "--data=offline",
                   "--num-iterations=1", "--eval-tokens=256", "--parallel=fsdp")
    assert "starting the optimizer fresh" not in sft.stdout and result(sft)["parallel"] == "fsdp"


def test_machines_that_do_not_share_the_base_dir_are_one_line(workspace, tmp_path):
    errors = run_on_two_machines("scripts.base_train", *TINY, base_dirs=[str(workspace), str(tmp_path / "other")],
                                 expect_ok=False)
    for err in errors:  # every rank agrees, before any work
        line = next(line for line in err.splitlines() if line.startswith("error: "))
        assert line.startswith("error: this run spans several machines, but not all of them see rank 0's "
                               "NANOCHAT_BASE_DIR") and "Traceback" not in err.split(line)[0]


def error_line(proc):
    """The one line a user error ends in: no traceback above it."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_user_errors_are_one_line(workspace, tokenizer, monkeypatch):
    import dataclasses
    from nanochat import checkpoint_manager as cm
    from test_gpt import tiny_model
    err = error_line(run("scripts.base_train", *TINY, "--total-batch-size=1000", expect_ok=False))
    assert err == ("error: --total-batch-size=1000 is not a multiple of device_batch_size x max_seq_len x data-parallel processes = 256: "
                   "change one of them")
    err = error_line(run("scripts.base_train", "--depth=0", expect_ok=False))
    assert err == "error: --depth=0 must be at least 1"
    err = error_line(run("scripts.base_train", "--window-pattern=XYZ", expect_ok=False))
    assert err.endswith("error: --window-pattern='XYZ' must be a string of S and L, like SSSL (see --help)")
    err = error_line(run("scripts.base_train", *TINY, "--resume-from-step=7", expect_ok=False))
    assert err.startswith("error: ") and err.endswith("base_checkpoints/d2 has no step 7: pick one with --resume-from-step (saved: none)")
    err = error_line(run("scripts.base_loss", "--model-tag=d99", expect_ok=False))
    assert err.startswith("error: no base checkpoints in") and err.endswith("run python -m scripts.base_train first")

    # a checkpoint cut off halfway (a full disk, a killed copy): one line that names the file and what to do
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    checkpoint_dir = workspace / "base_checkpoints" / "d4"
    for step in (1, 2):
        cm.save_checkpoint(str(checkpoint_dir), step, model.state_dict(), None)
        cm.save_meta(str(checkpoint_dir), step, {"step": step, "model_config": dataclasses.asdict(model.config)})
    latest = checkpoint_dir / "model_000002.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    err = error_line(run("scripts.base_loss", expect_ok=False))
    assert err.startswith(f"error: {latest} cannot be read (") and err.endswith(
        "it is damaged or incomplete; pick an earlier step with --step (saved: 1, 2) or retrain")

    # CORE's bundle is fetched before training, not after hours of it (here from a port where nothing listens)
    import socket
    from nanochat import core_eval
    from scripts import base_train
    from nanochat.common import UserError
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/eval_bundle.zip"
    monkeypatch.setattr(core_eval, "EVAL_BUNDLE_URL", closed)
    with pytest.raises(UserError, match=r"cannot reach 127\.0\.0\.1:\d+ .*place eval_bundle\.zip in .*; or train without CORE: "
                                        r"--core-metric-every=-1$"):
        base_train.main([*TINY, "--core-metric-every=2"])
    with pytest.raises(UserError, match="--model-tag='runs/a' must be a plain folder name"):
        base_train.main([*TINY, "--model-tag=runs/a"])  # a tag is one folder: load_model could not find it again
    with pytest.raises(UserError, match="--parallel fsdp shards the model over processes: launch with torchrun"):
        base_train.main([*TINY, "--parallel=fsdp"])

    pkl = workspace / "tokenizer" / "tokenizer.pkl"
    pkl.write_bytes(pkl.read_bytes()[:200])
    err = error_line(run("scripts.base_train", *TINY, expect_ok=False))
    assert err.startswith(f"error: {pkl} cannot be read (") and "retrain it with python -m scripts.tok_train" in err


def test_batch_and_weight_decay_come_from_the_model_not_the_horizon(workspace, capsys):
    """As in the reference: a FLOP budget (or a step count) sets how long to train, never the batch or weight decay,
    so an isoFLOP sweep changes only the steps."""
    from scripts import base_train
    args = [a for a in TINY if not a.startswith("--total-batch-size")] + ["--eval-every=-1", "--model-tag=dial"]

    def dial(*extra):
        base_train.main([*args, *extra])
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("steps: "))
        return [part for part in line.split(" | ") if part.startswith(("batch", "lr scale", "muon wd"))]

    plain, budget = dial("--num-iterations=1"), dial("--num-iterations=1", "--target-flops=1e15")
    assert plain[0].startswith("batch: 65,536 tokens") and len(plain) == 3 and plain == budget


def test_activation_checkpointing_trains_the_same(workspace, capsys, monkeypatch):
    """Recomputing each block in the backward pass changes memory, not the math: the same losses step by step, and
    the same val bpb at the end."""
    from scripts import base_train
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    losses = []
    for extra in ([], ["--activation-checkpointing"]):
        base_train.main([*TINY, "--num-iterations=3", "--eval-every=-1", "--model-tag=ac", *extra])
        out = capsys.readouterr().out
        losses.append([line.split(" | ")[1] for line in out.splitlines() if line.startswith("step ")])
    assert [part.split(":")[0] for part in losses[0]] == ["loss"] * 3 + ["val bpb"] and losses[1] == losses[0]


def test_long_context_flags_are_saved_and_decoded_with(workspace, capsys):
    """--window-long, --window-short and --rotary-base reach the checkpoint, and the model loaded from it (as every
    later stage loads it) attends and rotates with them; bad values are one line."""
    import torch
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from scripts import base_train
    base_train.main([*TINY, "--num-iterations=2", "--eval-every=-1", "--model-tag=long", "--window-pattern=SL",
                     "--window-long=48", "--window-short=16", "--rotary-base=1000000"])
    capsys.readouterr()
    model, tokenizer, meta = load_model("base", torch.device("cpu"), torch.float32, model_tag="long")
    assert (meta["model_config"]["window_long"], meta["model_config"]["window_short"]) == (48, 16)
    assert model.config.rotary_base == 1e6 and model.windows == [16, 48]  # the last layer always gets L
    expected_cos = torch.cos(torch.arange(10 * 64)[:, None] / 1e6 ** (torch.arange(0, 32, 2) / 32))
    assert torch.allclose(model.cos[0, :, 0, :].float(), expected_cos, atol=1e-3)
    prompt = tokenizer.encode("Hello", prepend=tokenizer.get_bos_token_id())
    rows, _ = Engine(model, tokenizer, compile=False).generate_batch(prompt, max_tokens=64 - len(prompt), temperature=0)  # past both windows
    assert rows[0][:len(prompt)] == prompt and len(rows[0]) > len(prompt)
    for flags, message in ((["--rotary-base=1"], "--rotary-base=1 must be above 1"),
                           (["--window-long=16", "--window-short=32"], "--window-short=32 is longer than --window-long=16")):
        with pytest.raises(SystemExit):
            base_train.main([*TINY, *flags])
        assert message in capsys.readouterr().err


def test_a_long_context_stage_starts_from_a_shorter_run(workspace, capsys, monkeypatch):
    """--init-from: the weights, momenta and data position of a run at 32 tokens a row, trained on at 64 with another
    rotary base, as a new run of its own. With the learning rates at 0 the weights stay the source's exactly, and AdamW's
    step count goes on from the source's."""
    import torch
    from nanochat.common import UserError
    from scripts import base_train
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    short = [arg for arg in TINY if not arg.startswith("--max-seq-len")]
    base_train.main([*short, "--max-seq-len=32", "--num-iterations=3", "--eval-every=-1", "--model-tag=short"])
    zero = ["--embedding-lr=0", "--unembedding-lr=0", "--matrix-lr=0", "--scalar-lr=0"]
    base_train.main([*short, "--max-seq-len=64", "--rotary-base=500000", "--num-iterations=1", "--eval-every=-1",
                     "--model-tag=long", "--init-from=short", *zero])
    out = capsys.readouterr().out
    assert "starting from " in out and "(trained at 32 tokens a row; this run: 64)" in out
    assert result(subprocess.CompletedProcess([], 0, out, ""))["init_from"].endswith("short step 3")
    source = torch.load(workspace / "base_checkpoints" / "short" / "model_000003.pt")
    continued = torch.load(workspace / "base_checkpoints" / "long" / "model_000001.pt")
    fixed_lr = {"smear_gate.weight", "smear_lambda", "backout_lambda"}  # their group's lr (0.2) has no flag
    assert all(torch.equal(source[k], continued[k]) for k in source if k not in fixed_lr)
    steps = [s["step"] for s in torch.load(workspace / "base_checkpoints" / "long" / "optim_000001_rank0.pt")["state"].values()
             if "step" in s]
    assert steps and set(steps) == {4}
    meta = json.loads((workspace / "base_checkpoints" / "long" / "meta_000001.json").read_text())
    assert meta["model_config"]["sequence_len"] == 64 and meta["model_config"]["rotary_base"] == 500000
    with pytest.raises(UserError, match="is another model \\(n_layer: saved 2, now 3; .*only --max-seq-len"):
        base_train.main([*short, "--depth=3", "--num-iterations=1", "--init-from=short"])
