import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.common import UserError
from test_gpt import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(checkpoint_dir, step, model, optimizer=None):
    cm.save_checkpoint(str(checkpoint_dir), step, model.state_dict(), optimizer.state_dict() if optimizer else None)
    cm.save_meta(str(checkpoint_dir), step, {"step": step, "model_config": dataclasses.asdict(model.config)})


def test_round_trip_and_discovery(base_dir, tokenizer):
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    optimizer = model.setup_optimizer()
    root = base_dir / "base_checkpoints"
    save(root / "d4", 5, model, optimizer)
    save(root / "d4", 10, model, optimizer)
    save(root / "d2", 20, tiny_model(n_layer=2, vocab_size=tokenizer.get_vocab_size()))
    tokenizer.save(str(base_dir / "tokenizer"))

    assert cm.find_checkpoint("base") == (str(root / "d4"), 10)  # the largest depth, its last step
    assert cm.find_checkpoint("base", model_tag="d2") == (str(root / "d2"), 20)
    loaded, loaded_tokenizer, meta = cm.load_model("base", "cpu", torch.float32, step=5)
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert meta["step"] == 5 and not loaded.training
    _, optim_state, _ = cm.load_checkpoint(str(root / "d4"), 10, "cpu", load_optimizer=True)
    fresh = tiny_model(vocab_size=tokenizer.get_vocab_size()).setup_optimizer()
    fresh.load_state_dict(optim_state)
    assert len(fresh.param_groups) == len(optimizer.param_groups)


def test_missing_checkpoints_say_what_to_run(base_dir):
    with pytest.raises(UserError, match="no sft checkpoints in .*chatsft_checkpoints: run python -m scripts.chat_sft first"):
        cm.find_checkpoint("sft")
    with pytest.raises(UserError, match="unknown checkpoint source 'mid2'"):
        cm.find_checkpoint("mid2")
    save(base_dir / "base_checkpoints" / "d4", 3, tiny_model())
    with pytest.raises(UserError, match="has no step 7 \\(found: 3\\)"):
        cm.find_checkpoint("base", step=7)
    with pytest.raises(UserError, match="no base checkpoint tagged 'd9'"):
        cm.find_checkpoint("base", model_tag="d9")


def test_damaged_files_are_one_clear_line(base_dir, tokenizer):
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    checkpoint_dir = base_dir / "base_checkpoints" / "d4"
    for step in (1, 2, 3):
        save(checkpoint_dir, step, model, model.setup_optimizer())
    tokenizer.save(str(base_dir / "tokenizer"))
    for name in ("model_000003.pt", "meta_000002.json", "optim_000001_rank0.pt"):  # cut off halfway, as a full disk does
        path = checkpoint_dir / name
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    advice = r"it is damaged or incomplete; pick an earlier step with --step \(saved: 1, 2, 3\) or retrain"
    with pytest.raises(UserError, match=r"model_000003\.pt cannot be read \(.*\): " + advice):
        cm.load_model("base", "cpu", torch.float32)  # the latest
    with pytest.raises(UserError, match=r"meta_000002\.json cannot be read \(.*\): " + advice):
        cm.load_model("base", "cpu", torch.float32, step=2)
    with pytest.raises(UserError, match=r"optim_000001_rank0\.pt cannot be read"):
        cm.load_checkpoint(str(checkpoint_dir), 1, "cpu", load_optimizer=True)
    cm.load_model("base", "cpu", torch.float32, step=1)  # the intact one still loads
    with pytest.raises(UserError, match=r"has no step 7: pick one with --resume-from-step \(saved: 1, 2, 3\)"):
        cm.load_checkpoint(str(checkpoint_dir), 7, "cpu", step_flag="--resume-from-step")
    pkl = base_dir / "tokenizer" / "tokenizer.pkl"
    pkl.write_bytes(pkl.read_bytes()[:100])
    with pytest.raises(UserError, match=r"tokenizer\.pkl cannot be read .*: it is damaged or incomplete; retrain it with "
                                        r"python -m scripts\.tok_train"):
        cm.load_model("base", "cpu", torch.float32, step=1)


def test_foreign_objects_and_missing_optimizer_state_are_one_line(base_dir, tokenizer):
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    checkpoint_dir = base_dir / "base_checkpoints" / "d4"
    save(checkpoint_dir, 1, model)  # no optimizer
    save(checkpoint_dir, 2, model)
    (checkpoint_dir / "meta_000001.json").write_text('{"model_config": %s}' % json.dumps(dataclasses.asdict(model.config)))
    tokenizer.save(str(base_dir / "tokenizer"))
    assert cm.load_model("base", "cpu", torch.float32, step=1)[2]["step"] == 1  # a meta without its step still loads
    torch.save([1, 2], checkpoint_dir / "model_000002.pt")
    with pytest.raises(UserError, match=r"model_000002\.pt holds a list, not a checkpoint's weights: pick another step"):
        cm.load_model("base", "cpu", torch.float32)
    with pytest.raises(UserError, match=r"step 1 has no optimizer state \(no optim_000001_rank\*\.pt\): it cannot be "
                                        r"resumed exactly; pick another step with --resume-from-step"):
        cm.load_checkpoint(str(checkpoint_dir), 1, "cpu", load_optimizer=True, step_flag="--resume-from-step")


def test_a_retrained_tokenizer_of_the_same_size_is_refused(base_dir, tokenizer):
    from conftest import make_docs
    from nanochat.tokenizer import RustBPETokenizer
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    checkpoint_dir = base_dir / "base_checkpoints" / "d4"
    cm.save_checkpoint(str(checkpoint_dir), 1, model.state_dict(), None)
    cm.save_meta(str(checkpoint_dir), 1, {"step": 1, "model_config": dataclasses.asdict(model.config),
                                          "tokenizer": tokenizer.fingerprint()})
    tokenizer.save(str(base_dir / "tokenizer"))
    cm.load_model("base", "cpu", torch.float32)
    other = RustBPETokenizer.train_from_iterator(iter(make_docs(400, seed=2)), tokenizer.get_vocab_size())
    assert other.get_vocab_size() == tokenizer.get_vocab_size() and other.fingerprint() != tokenizer.fingerprint()
    other.save(str(base_dir / "tokenizer"))
    with pytest.raises(UserError, match=rf"\(fingerprint {other.fingerprint()}\) is not the one .*d4 was trained with "
                                        rf"\({tokenizer.fingerprint()}\): restore that tokenizer, or retrain the model"):
        cm.load_model("base", "cpu", torch.float32)


def test_a_checkpoint_in_the_references_layout_loads(base_dir, tokenizer, monkeypatch):
    """karpathy/nanochat names attention 'attn.' (ours: 'mixer.'), saves compiled models' keys with '_orig_mod.' and
    has no mixer_pattern in its config: its models load, with the same logits, and chat here."""
    model = tiny_model(vocab_size=tokenizer.get_vocab_size()).eval()
    state = {"_orig_mod." + k.replace(".mixer.", ".attn."): v for k, v in model.state_dict().items()}
    assert any(".attn.c_q." in k for k in state)
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "mixer_pattern"}
    checkpoint_dir = base_dir / "chatsft_checkpoints" / "d4"
    cm.save_checkpoint(str(checkpoint_dir), 1, state, None)
    cm.save_meta(str(checkpoint_dir), 1, {"step": 1, "model_config": config})
    tokenizer.save(str(base_dir / "tokenizer"))
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    from nanochat.common import get_compute_dtype
    get_compute_dtype.cache_clear()
    loaded, _, _ = cm.load_model("sft", "cpu")  # the dtype defaults to the chosen one, as in the reference
    get_compute_dtype.cache_clear()
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 24))
    with torch.no_grad():
        assert loaded.compute_dtype == torch.float32 and torch.equal(loaded(idx), model(idx))


def test_a_foreign_state_dict_is_one_clear_line(base_dir, tokenizer):
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    checkpoint_dir = base_dir / "base_checkpoints" / "d4"
    state = {k.replace("lm_head", "head"): v for k, v in model.state_dict().items()}
    cm.save_checkpoint(str(checkpoint_dir), 1, state, None)
    cm.save_meta(str(checkpoint_dir), 1, {"step": 1, "model_config": dataclasses.asdict(model.config)})
    tokenizer.save(str(base_dir / "tokenizer"))
    with pytest.raises(UserError, match=r"d4 step 1 does not describe a model this code can build \(.*lm_head"):
        cm.load_model("base", "cpu", torch.float32)


KILLER = """
import os, signal, sys, torch
from nanochat import checkpoint_manager as cm
from test_gpt import tiny_model
model = tiny_model()
victim = sys.argv[2]
real_replace = os.replace
def replace(src, dst):
    if os.path.basename(dst) == victim:  # die after writing the temporary file, before it becomes real
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
with torch.no_grad():
    model.lm_head.weight.add_(1.0)  # step 2 differs from step 1
cm.save_checkpoint(sys.argv[1], 2, model.state_dict(), None)
cm.save_meta(sys.argv[1], 2, {"step": 2, "model_config": {}})
"""


@pytest.mark.parametrize("victim", ["model_000002.pt", "meta_000002.json"])
def test_a_save_killed_midway_leaves_the_previous_checkpoint(base_dir, tokenizer, victim):
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    checkpoint_dir = base_dir / "base_checkpoints" / "d4"
    save(checkpoint_dir, 1, model)
    tokenizer.save(str(base_dir / "tokenizer"))
    proc = subprocess.run([sys.executable, "-c", KILLER, str(checkpoint_dir), victim], cwd=os.path.join(REPO, "tests"),
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # SIGKILL
    assert cm.checkpoint_steps(str(checkpoint_dir)) == [1]
    assert cm.find_checkpoint("base") == (str(checkpoint_dir), 1)
    loaded, _, _ = cm.load_model("base", "cpu", torch.float32)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
