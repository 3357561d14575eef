"""The chat stages end to end, offline, as a user runs them: base -> mid -> sft -> rl -> eval, each a real process
reading the checkpoint the previous one wrote."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.dataloader import conversation_batches
from tasks.spellingbee import SpellingBee
from test_gpt import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(base_dir, module, *args, expect_ok=True, **env):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) if expect_ok else proc.stderr


def save_tiny_base(base_dir, tokenizer):
    """A tiny base checkpoint (with its optimizer state) and the tokenizer, as base_train leaves them."""
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    optimizer = model.setup_optimizer()
    base = base_dir / "base_checkpoints" / "d4"
    cm.save_checkpoint(str(base), 10, model.state_dict(), optimizer.state_dict())
    cm.save_meta(str(base), 10, {"step": 10, "model_config": dataclasses.asdict(model.config), "max_seq_len": 128,
                                 "device_batch_size": 4, "total_batch_size": 512,
                                 "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02}})
    tokenizer.save(str(base_dir / "tokenizer"))
    torch.save(torch.tensor(tokenizer.token_bytes(), dtype=torch.int32), base_dir / "tokenizer" / "token_bytes.pt")


def test_mid_sft_rl_eval_offline(base_dir, tokenizer):
    save_tiny_base(base_dir, tokenizer)

    # without the hub (HF_HUB_OFFLINE=1 says so at once), the hub mixture fails in one line that names the way out
    err = run(base_dir, "scripts.mid_train", "--num-iterations=3", expect_ok=False, HF_HUB_OFFLINE="1")
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: cannot load HuggingFaceTB/smol-smoltalk")
    assert err.strip().endswith("or train on data that needs no network with --data=offline")
    mid = run(base_dir, "scripts.mid_train", "--data=offline", "--num-iterations=3")  # default --eval-tokens: one pass
    assert mid["stage"] == "mid_train" and mid["step"] == 3 and mid["checkpoint_dir"].endswith("mid_checkpoints/d4")
    assert 0 < mid["val_tokens"] < 600 * 128  # the offline val set: 600 conversations, each cut to a 128-token row
    sft = run(base_dir, "scripts.chat_sft", "--data=offline", "--num-iterations=3", "--eval-tokens=512",
              "--activation-checkpointing")
    assert sft["stage"] == "chat_sft" and sft["checkpoint_dir"].endswith("chatsft_checkpoints/d4")
    assert sft["train_loss"] == sft["train_loss"]  # not NaN
    rl = run(base_dir, "scripts.chat_rl", "--data=offline", "--num-steps=2", "--activation-checkpointing", "--examples-per-step=2", "--num-samples=2",
             "--device-batch-size=2", "--max-new-tokens=16", "--eval-every=2", "--eval-examples=2")
    assert rl["stage"] == "chat_rl" and rl["steps"] == 2 and len(rl["pass_at_k"]) == 2
    assert cm.checkpoint_steps(rl["checkpoint_dir"]) == [2]
    result = run(base_dir, "scripts.chat_eval", "-i", "rl", "-a", "SpellingBee|SyntheticMath|HumanEval", "-x", "2", "-m", "16")
    assert set(result["results"]) == {"SpellingBee", "SyntheticMath", "HumanEval"} and result["chatcore"] is None
    assert all(0 <= v <= 1 for v in result["results"].values())


def test_rag_sft_rl_and_eval_on_an_offline_knowledge_base(base_dir, tokenizer):
    """RAG=1 of runs/runcpu.sh in miniature: the synthetic set, its index, RAG SFT, multi-hop RL and chat_eval."""
    from dev import gen_rag_data
    from scripts import rag_index
    save_tiny_base(base_dir, tokenizer)
    gen_rag_data.main(["--entities", "90", "--train", "60", "--test", "12"])
    data = base_dir / "task_data" / "rag" / "synthetic"
    rag_index.main(["--kb", "synthetic", str(data / "corpus.jsonl"), "--no-dense", "--questions", str(data / "test.jsonl")])
    rag = ["--kb=synthetic", "--passages=2"]
    sft = run(base_dir, "scripts.chat_sft", "--source=base", "--data=offline", "--num-iterations=2", "--eval-tokens=512",
              "--max-seq-len=256", "--device-batch-size=2", *rag)
    assert sft["kb"] == "synthetic" and sft["train_loss"] == sft["train_loss"]
    rl = run(base_dir, "scripts.chat_rl", "--num-steps=1", "--examples-per-step=2", "--num-samples=2", "--device-batch-size=2",
             "--max-new-tokens=16", "--eval-every=1", "--eval-examples=2", *rag)
    assert rl["kb"] == "synthetic" and rl["data"] == "synthetic" and rl["steps"] == 1
    assert 0 <= rl["mean_reward"] <= 1 and rl["searches_per_answer"] >= 0
    result = run(base_dir, "scripts.chat_eval", "-i", "rl", "-a", "RAG-closed|RAG-search", "-x", "2", "-m", "8", *rag)
    assert list(result["results"]) == [f"RAG-{mode}{hops}" for mode in ("closed", "search")
                                       for hops in (" 1-hop", " multi-hop", "")]
    assert all(0 <= v <= 1 for v in result["results"].values()) and result["kb"] == "synthetic"
    from nanochat.common import UserError
    from scripts import chat_eval
    with pytest.raises(UserError, match=r"^RAG mode context searches a knowledge base and none was given: pass --kb NAME"):
        chat_eval.main(["-i", "rl", "-a", "RAG-context", "--device-type=cpu"])


def test_finetuning_batches_mask_all_but_the_assistant(tokenizer):
    task = SpellingBee(40)
    x, y, info = next(conversation_batches(tokenizer, task, B=4, T=48, buffer_size=10))
    assert x.shape == y.shape == (4, 48) and 0 < info["progress"] <= 1
    assert (x[:, 0] == tokenizer.get_bos_token_id()).all()
    supervised = y[y >= 0]
    assert len(supervised) > 0 and tokenizer.get_bos_token_id() not in supervised.tolist()
    # conversations longer than a row are truncated to fit it: rows hold text, not only padding (the reference's
    # render truncated at 2048 whatever the row, so with a small --max-seq-len nothing fit and the loss was NaN)
    x, y, _ = next(conversation_batches(tokenizer, task, B=2, T=8, buffer_size=4))
    assert ((x != tokenizer.get_bos_token_id()).sum(dim=1) >= 6).all()
    # midtraining's loss, as the reference's: every token of the same rows, user turns included; padding never
    x, y, _ = next(conversation_batches(tokenizer, task, B=4, T=48, buffer_size=10))
    _, y_all, _ = next(conversation_batches(tokenizer, task, B=4, T=48, buffer_size=10, all_tokens=True))
    user_start = tokenizer.encode_special("<|user_start|>")
    assert user_start not in supervised.tolist() and user_start in y_all.flatten().tolist()
    assert (y_all[y >= 0] == y[y >= 0]).all() and (y_all >= 0).sum() > (y >= 0).sum()
    padded = (x[:, 1:] == tokenizer.get_bos_token_id()) & (x[:, :-1] == tokenizer.get_bos_token_id())
    assert (y_all[:, :-1][padded] == -1).all()


def test_midtraining_defaults_are_the_references():
    """Oct 2025's mid_train: every token, fresh optimizer, lrs 0.2/0.004/0.02 x 1.0, constant then linear to 0 over 20%."""
    from scripts.chat_sft import parse_args
    mid, sft = parse_args([], "mid"), parse_args([], "sft")
    assert (mid.loss_tokens, mid.load_optimizer, mid.init_lr_frac, mid.warmup_ratio, mid.warmdown_ratio, mid.final_lr_frac) \
        == ("all", 0, 1.0, 0.0, 0.2, 0.0)
    assert (mid.embedding_lr, mid.unembedding_lr, mid.matrix_lr) == (0.2, 0.004, 0.02)
    assert (sft.loss_tokens, sft.load_optimizer, sft.init_lr_frac, sft.warmdown_ratio, sft.matrix_lr) == ("assistant", 1, 0.8, 0.5, None)


def test_a_fully_masked_micro_batch_gives_zero_loss_not_nan():
    model = tiny_model()
    x = torch.randint(0, 300, (2, 16))
    loss = model(x, torch.full_like(x, -1))
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("flag, message", [
    ("--max-seq-len=0", "--max-seq-len=0 must be at least 1"),
    ("--total-batch-size=-512", "--total-batch-size=-512 must be at least 1"),
    ("--matrix-lr=nan", "--matrix-lr=nan must be a number >= 0"),
    ("--model-tag-out=a/b", "--model-tag-out='a/b' must be a plain folder name"),
])
def test_finetuning_flags_are_checked_before_any_work(flag, message):
    from nanochat.common import UserError
    from scripts.chat_sft import parse_args
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args([flag], "sft")


def test_finetuning_needs_a_step(capsys):
    from scripts.chat_sft import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--num-iterations=0"], "sft")
    assert "--num-iterations must be at least 1, or -1 for one epoch of the mixture" in capsys.readouterr().err
