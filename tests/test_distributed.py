"""Two CPU processes under torchrun with gloo: the real distributed path the GPU scripts take with NCCL."""

import json
import os
import subprocess
import sys

from conftest import make_docs
from nanochat import dataset
from nanochat.tokenizer import tokenizer_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_gloo_init_and_disjoint_loading(tmp_path, tokenizer):
    tokenizer.save(tokenizer_dir())
    data = tmp_path / "shards"
    data.mkdir()
    docs = make_docs(300, seed=11)
    dataset.write_shard(docs[:280], str(data / dataset.shard_name(0)))
    dataset.write_shard(docs[280:], str(data / dataset.shard_name(1)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tests.dist_worker", str(data)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints its result
    result = json.loads(lines[0])
    assert result["world_size"] == 2 and result["all_reduce"] == 3.0
    rank0, rank1 = result["per_rank"]
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["markers"] and rank1["markers"] and not set(rank0["markers"]) & set(rank1["markers"])
    assert rank0["dtype"] == rank1["dtype"] == "torch.bfloat16"  # rank 1 asked for float32: rank 0 decides
    assert rank0["reason"] == "NANOCHAT_DTYPE=bfloat16" and rank1["reason"] == "NANOCHAT_DTYPE=bfloat16 (rank 0's choice)"
    assert "device: cpu | world size: 2" in proc.stdout
