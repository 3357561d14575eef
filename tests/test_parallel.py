"""--parallel fsdp | tp | fsdp+tp (nanochat/parallel.py) on 4 gloo processes against one process, and its checks."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from nanochat.common import UserError
from nanochat.gpt import build_model_config
from nanochat.parallel import check, data_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def modes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                          "-m", "tests.parallel_worker"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["fsdp", "tp", "fsdp+tp"])
def test_a_sharded_step_equals_one_process_step(modes, mode):
    """Gradients equal up to the order of the sums; given the same gradients the update is exactly one process's:
    Muon orthogonalises whole matrices, AdamW is elementwise."""
    result = modes[mode]
    assert result["step1"]["gradients"] < 1e-6
    assert result["step1"]["weights"] < 1e-5
    assert result["step1"]["optimizer_state"] < 1e-5
    assert result["optimizer_state_keys_match"]  # the whole state is laid out as one process's: any run can load it


@pytest.mark.parametrize("mode", ["fsdp", "tp", "fsdp+tp"])
def test_sharded_training_resumes_exactly_and_follows_one_process(modes, mode):
    result = modes[mode]
    assert result["resumed_vs_uninterrupted"] == 0.0
    assert result["losses"] < 1e-5
    # Muon's row equalisation and AdamW's first steps magnify rounding differences in small gradients: close, not equal
    assert result["after_3_steps"] < 1e-2
    assert result["greedy_tokens_match"]  # the Engine's KV cache holds this rank's heads under tp
    assert result["uneven_evaluation_tokens"] == 4 * 32  # one batch of every rank's rows: all stopped with rank 0


def test_tp_ranks_of_a_group_read_the_same_rows():
    assert [data_split("fsdp+tp", 2, r, 8) for r in range(8)] == [(r // 2, 4) for r in range(8)]
    assert [data_split("tp", 4, r, 4) for r in range(4)] == [(0, 1)] * 4
    assert [data_split("fsdp", 1, r, 4) for r in range(4)] == [(r, 4) for r in range(4)]


def test_checks_name_what_to_change():
    config = build_model_config(4, 256, aspect_ratio=16, head_dim=16)  # 4 heads
    with pytest.raises(UserError, match="launch with torchrun"):  # plain python: no processes to shard over
        check("fsdp", 0, 1, config)
    assert check("ddp", 0, 1, config) == 1
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # as torchrun would (sizes below are given)
    try:
        checks_under_torchrun(config)
    finally:
        dist.destroy_process_group()


def checks_under_torchrun(config):
    assert check("fsdp", 0, 8, config) == 1
    assert check("tp", 0, 4, config) == 4  # --tp 0: every process
    assert check("fsdp+tp", 2, 8, config) == 2
    cases = [("fsdp", 2, 8, config, "needs --parallel tp"),
             ("fsdp+tp", 3, 8, config, "must divide the number of processes"),
             ("tp", 2, 4, config, "splits the model over every process"),
             ("fsdp+tp", 4, 4, config, "leaves no ranks to shard"),
             ("tp", 8, 8, config, "must divide the heads"),
             ("tp", 2, 2, build_model_config(4, 256, aspect_ratio=16, head_dim=16, mixer_pattern="AM"), "Mamba")]
    for mode, tp, world, cfg, message in cases:
        with pytest.raises(UserError, match=message):
            check(mode, tp, world, cfg)
