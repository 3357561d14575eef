"""Export to transformers as a user does it: train with --hf-compatible, export, load the folder with transformers'
own Auto classes, and hold its logits, greedy generation and tokenizer to ours."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat import checkpoint_manager as cm
from nanochat.common import UserError
from scripts import base_train, chat_sft, export_hf
from test_base_train import TINY, make_workspace
from test_gpt import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A model trained 3 steps with --hf-compatible and finetuned 2, and its export: (our model and tokenizer,
    transformers' model and tokenizer, the folder)."""
    transformers = pytest.importorskip("transformers")
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("hf")
    mp.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
    mp.setenv("NANOCHAT_DTYPE", "float32")
    try:
        make_workspace(root / "base", tokenizer)
        base_train.main([*TINY, "--hf-compatible", "--num-iterations=3", "--eval-every=-1"])
        chat_sft.main(["--source=base", "--data=offline", "--num-iterations=2", "--eval-tokens=256"])
        export_hf.main(["--out", str(root / "out")])  # -i sft by default
        model, ours, _ = cm.load_model("sft", "cpu", torch.float32)
    finally:
        mp.undo()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(root / "out").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(root / "out")
    return model, ours, hf_model, hf_tokenizer, root / "out"


def test_training_keeps_only_what_transformers_has(exported):
    model = exported[0]
    assert model.config.hf_compatible and set(model.windows) == {model.config.sequence_len}
    assert len(model.value_embeds) == 0 and export_hf.unsupported_features(model) == []
    # five optimizer steps (with weight decay) left the frozen terms exactly where they do nothing
    assert torch.equal(model.resid_lambdas, torch.ones_like(model.resid_lambdas))
    assert not model.x0_lambdas.any() and model.smear_lambda.item() == 0 and model.backout_lambda.item() == 0
    assert model.transformer.h[0].mixer.c_proj.weight.abs().sum() > 0  # while the weights did train


def test_transformers_gives_our_logits_and_greedy_tokens(exported):
    model, tokenizer, hf_model, _, out = exported
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    assert json.loads((out / "config.json").read_text())["model_type"] == "nanochat"
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() < 1e-5

    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "the river and the stone"}]})
    generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    expected = list(model.generate(prompt, 16, temperature=0.0))
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    end = next((i + 1 for i, t in enumerate(expected) if t in stops), len(expected))  # generate stops at an end token
    assert generated == expected[:end] and len(generated) > 0


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.one_of(  # pieces the split pattern treats specially, and any text at all
    st.lists(st.sampled_from([*"ab riverstone ÜCAFé'123\n\t.,!", "  ", "'ll", "'S", "\r\n", "日本", "🙂"]), max_size=30).map("".join),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20)))
def test_the_tokenizer_gives_our_ids(exported, text):
    _, tokenizer, _, hf_tokenizer, _ = exported
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text


def test_the_chat_template_renders_our_conversations(exported):
    _, tokenizer, _, hf_tokenizer, _ = exported
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello 42"}, {"role": "user", "content": "and again?"}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids == tokenizer.render_for_completion({"messages": messages})
    for name in ("<|bos|>", "<|user_start|>", "<|assistant_end|>", "<|python_start|>", "<|output_end|>"):
        assert hf_tokenizer.convert_tokens_to_ids(name) == tokenizer.encode_special(name)


def test_a_model_with_other_features_is_refused_in_one_line(base_dir, tokenizer):
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    checkpoint_dir = base_dir / "chatsft_checkpoints" / "d4"
    cm.save_checkpoint(str(checkpoint_dir), 1, model.state_dict(), None)
    cm.save_meta(str(checkpoint_dir), 1, {"step": 1, "model_config": dataclasses.asdict(model.config)})
    tokenizer.save(str(base_dir / "tokenizer"))
    proc = subprocess.run([sys.executable, "-m", "scripts.export_hf", "--out", str(base_dir / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: this model uses what transformers' NanoChat model lacks: sliding windows "
                                  "(--window-pattern=SSSL), value embeddings, QK sharpening (x1.2), smear, backout, "
                                  "per-layer residual scalars;")
    assert proc.stderr.strip().endswith("--hf-compatible (and finetuned from one) export")
    assert not (base_dir / "out").exists()


def test_an_out_that_cannot_be_a_folder_is_one_line(exported, tmp_path):
    model, tokenizer = exported[:2]
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match=r"--out=.*taken cannot be a folder to write to \(File exists\): pick another"):
        export_hf.export(model, tokenizer, str(tmp_path / "taken"))


def test_hf_compatible_refuses_windows_and_mamba(capsys):
    for flag in ("--window-pattern=SSSL", "--mixer-pattern=AM"):
        with pytest.raises(SystemExit):
            base_train.parse_args([*TINY, "--hf-compatible", flag])
        assert "--hf-compatible models attend to the whole context in every layer" in capsys.readouterr().err
