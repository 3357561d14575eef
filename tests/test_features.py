"""
The code-model features beyond the mixers, each against its promise: mHC (nanochat/mhc.py) is the plain residual at
n = 1 and mixes by doubly stochastic matrices; Engram (nanochat/engram.py) starts silent and remembers n-grams; MTP
(nanochat/mtp.py) respects the loss mask, is the plain model at lambda = 0, and drafts for speculative decoding with
exactly the plain model's greedy output. Causality and cached decoding for all of them: tests/test_causality.py.
"""

import pytest
import torch

from nanochat.engine import Engine
from nanochat.mhc import sinkhorn
from test_gpt import tiny_model

SMALL = {"sequence_len": 64, "vocab_size": 300, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 64}


def build(seed=0, **overrides):
    return tiny_model(seed=seed, **{**SMALL, **overrides})


def with_weights_of(model, **overrides):
    """A model with overrides, holding model's weights (its own extra parts as initialised)."""
    other = build(seed=1, **overrides)
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    return other


def test_sinkhorn_gives_doubly_stochastic_matrices():
    m = sinkhorn(2 * torch.eye(4) + 0.5 * torch.randn(100, 4, 4, generator=torch.Generator().manual_seed(0)))  # as trained
    assert torch.allclose(m.sum(-1), torch.ones(100, 4), atol=1e-3) and torch.allclose(m.sum(-2), torch.ones(100, 4), atol=1e-6)
    assert (m >= 0).all()


def test_mhc_with_one_stream_is_the_plain_residual_exactly():
    plain = build()
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(with_weights_of(plain, mhc_streams=1)(idx), plain(idx))


def test_mhc_streams_start_as_the_plain_residual_and_then_differ():
    """With the dynamic part at zero and uniform reads, the streams' mean is the plain residual for any n; training
    moves the coefficients, and the streams then carry more than their mean."""
    plain = build()
    model = with_weights_of(plain, mhc_streams=3)
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in model.transformer.h:
            for hc in block.hc.values():
                hc.alpha.zero_()
                hc.bias[:3].zero_()
        assert torch.allclose(model(idx), plain(idx), atol=1e-5)
    optimizer = model.setup_optimizer()
    for _ in range(3):
        model(idx, idx).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    assert all(hc.alpha.abs().sum() > 0 for block in model.transformer.h for hc in block.hc.values())


def test_engram_starts_silent_and_its_memory_is_an_ngram_lookup():
    plain = build()
    model = with_weights_of(plain, engram_layers="0,-1", engram_heads=2, engram_rows=101)
    for block in model.transformer.h:  # as initialised: the memory's value projection is zero
        if block.engram is not None:
            block.engram.c_v.weight.data.zero_()
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))
    engram = model.transformer.h[0].engram
    assert engram.sizes == [101, 103, 107, 109]  # one prime per (order, head) table
    ids = torch.tensor([[5, 7, 9, 1, 7, 9, 2, 7, 9]])  # "7 9" three times; "5 7 9" and "1 7 9" differ
    e = engram.lookup(torch.cat([torch.full((1, 2), engram.pad), ids], dim=1))
    bigram, trigram = e[..., :e.size(-1) // 2], e[..., e.size(-1) // 2:]
    assert torch.equal(bigram[0, 2], bigram[0, 5]) and torch.equal(bigram[0, 5], bigram[0, 8])
    assert not torch.equal(trigram[0, 2], trigram[0, 5])
    assert [b.engram is not None for b in model.transformer.h] == [True, False, True]


def test_engram_layers_are_checked():
    for layers, message in (("0,x", "comma-separated layer numbers"), ("3", "must lie in 0..2")):
        with pytest.raises(ValueError, match=message):
            build(engram_layers=layers)


def sft_like_targets(idx):
    """Targets as finetuning makes them: the next tokens, -1 over the 'user' stretches."""
    targets = torch.roll(idx, -1, dims=1)
    targets[:, :10], targets[:, 30:40], targets[:, -1] = -1, -1, -1
    return targets


def test_mtp_respects_the_loss_mask_and_is_the_plain_model_at_lambda_zero():
    plain = build()
    model = with_weights_of(plain, mtp_depth=2)
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    targets = sft_like_targets(idx)
    model.mtp_weight = 0.0
    assert torch.equal(model(idx, targets), plain(idx, targets))
    model.mtp_weight = 0.3
    loss = model(idx, targets)
    assert torch.isfinite(loss) and torch.allclose(loss, plain(idx, targets) + 0.3 * model.mtp_loss)
    # each module's loss is over the positions whose target (k+1 further on) is supervised, and only those
    h = model.hidden(idx)
    expected, hk = 0.0, h
    for k in range(2):
        n = 64 - (k + 1)
        hk = model.mtp.step(k, model, hk[:, :n], idx[:, k + 1:], model.cos[:, :n], model.sin[:, :n])
        target = targets[:, k + 1:]
        keep = target >= 0
        expected += torch.nn.functional.cross_entropy(model.head(hk)[keep], target[keep])
    assert torch.allclose(model.mtp_loss, expected / 2)
    assert model(idx, torch.full_like(idx, -1)).item() == 0.0  # nothing supervised: 0, not NaN
    model(idx, targets).backward()
    assert model.mtp.proj[1].weight.grad.abs().sum() > 0


def test_mtp_modules_see_no_further_than_the_next_token():
    model = build(mtp_depth=1)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 300, (1, 64), generator=gen)
    with torch.no_grad():
        def drafts(ids):
            return model.mtp.step(0, model, model.hidden(ids)[:, :63], ids[:, 1:], model.cos[:, :63], model.sin[:, :63])
        base = drafts(idx)
        changed = idx.clone()
        changed[:, 31:] = torch.randint(0, 300, (1, 33), generator=gen)
        # position i's module reads tokens up to i + 1: positions 0..29 cannot see a change from 31 on
        assert torch.allclose(drafts(changed)[:, :30], base[:, :30], atol=1e-5)
        assert not torch.allclose(drafts(changed)[:, 30], base[:, 30], atol=1e-3)


def trained_mtp_model(tokenizer, steps=60):
    """A tiny MTP model trained on a repeating phrase: its drafts hit often, but not always."""
    model = build(vocab_size=tokenizer.get_vocab_size(), mtp_depth=1, sequence_len=128)
    phrase = tokenizer.encode("the river runs to the sea and the sea runs to the sky; ")
    row = ([tokenizer.get_bos_token_id()] + phrase * 20)[:129]
    data = torch.tensor([row])
    optimizer = model.setup_optimizer()
    for _ in range(steps):
        model(data[:, :-1], data[:, 1:]).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return model.eval(), phrase


def test_speculative_decoding_gives_plain_greedy_output_and_counts_its_drafts(tokenizer):
    trained, phrase = trained_mtp_model(tokenizer)
    untrained = build(vocab_size=tokenizer.get_vocab_size(), mtp_depth=1, sequence_len=128).eval()
    bos = tokenizer.get_bos_token_id()
    prompts = ([bos, *phrase[:5]], [bos, *tokenizer.encode("sky sea")])
    for model in (trained, untrained):
        engine = Engine(model, tokenizer, speculative=True)
        for prompt in prompts:
            plain = [c[0][0] for c in Engine(model, tokenizer, compile=False).generate(prompt, max_tokens=60, temperature=0)]
            assert [c[0][0] for c in engine.generate(prompt, max_tokens=60, temperature=0)] == plain
        if model is trained:
            assert engine.drafts["accepted"] > 0.8 * engine.drafts["proposed"]  # the phrase is learnt: most drafts hit
        else:
            assert engine.drafts["accepted"] < engine.drafts["proposed"]  # misses are taken back
    # sampling draws every token from the main model too (a different stream of draws, the same distribution)
    assert len([c for c in engine.generate(prompts[0], max_tokens=30, temperature=1.0, seed=1)]) == 30
    with pytest.raises(ValueError, match="this model has none: train one with base_train --mtp-depth=1"):
        Engine(build(vocab_size=tokenizer.get_vocab_size()), tokenizer, speculative=True)


# -----------------------------------------------------------------------------
# As users run them: base_train's flags, the checkpoint, the chat stages, chat_cli and chat_web

SMOKE = {
    "mhc": (["--mhc-streams=2"], {"mhc_streams": 2}),
    "engram": (["--engram-layers=0,-1", "--engram-rows=211"], {"engram_layers": "0,-1", "engram_rows": 211}),
    "mtp": (["--mtp-depth=1", "--mtp-lambda=0.5"], {"mtp_depth": 1, "mtp_lambda": 0.5}),
}


@pytest.mark.parametrize("feature", SMOKE)
def test_each_feature_trains_at_d2_and_its_checkpoint_keeps_it(feature, base_dir, tokenizer, capsys, monkeypatch):
    from nanochat.checkpoint_manager import load_model
    from scripts import base_train
    from test_base_train import TINY, make_workspace
    make_workspace(base_dir, tokenizer)
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    flags, fields = SMOKE[feature]
    base_train.main([*TINY, "--num-iterations=20", "--eval-every=-1", f"--model-tag={feature}", *flags])
    out = capsys.readouterr().out
    losses = [float(line.split(" | ")[1].removeprefix("loss: ")) for line in out.splitlines()
              if line.startswith("step ") and " | loss: " in line]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.3, losses  # the smoothed loss, from ln(400) ~ 6
    if feature == "mtp":
        assert "| mtp loss: " in out
    model, _, meta = load_model("base", torch.device("cpu"), torch.float32, model_tag=feature)
    assert all(getattr(model.config, k) == v for k, v in fields.items())
    saved = torch.load(base_dir / "base_checkpoints" / feature / "model_000020.pt")
    assert all(torch.equal(model.state_dict()[k].float(), v.float()) for k, v in saved.items())


def test_features_together_through_sft_chat_cli_and_chat_web(base_dir, tokenizer, capsys, monkeypatch):
    """Engram, mHC and MTP in one model: finetuned (MTP's loss under the conversation mask), then answering in the
    terminal and over HTTP with --speculative."""
    import json
    from scripts import base_train
    from test_base_train import TINY, make_workspace
    from test_chat_cli import run_cli
    from test_chat_pipeline import run
    from test_chat_web import post, start_server
    make_workspace(base_dir, tokenizer)
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    base_train.main([*TINY, "--num-iterations=3", "--eval-every=-1", "--model-tag=d2", "--mhc-streams=2",
                     "--engram-layers=1", "--engram-rows=211", "--mtp-depth=1"])
    capsys.readouterr()
    sft = run(base_dir, "scripts.chat_sft", "--source=base", "--data=offline", "--num-iterations=2", "--eval-tokens=512",
              "--device-batch-size=2", "--max-seq-len=64")
    assert sft["train_loss"] == sft["train_loss"]  # not NaN: the masked targets never reach an embedding
    proc = run_cli(base_dir, "-i", "sft", "-p", "hello", "-t", "0", "-m", "12", "--speculative")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["drafts"] > 0 and 0 <= result["drafts_accepted"] <= result["drafts"]
    server, url = start_server(base_dir, "--speculative")
    try:
        status, body = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 8, "temperature": 0})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] is not None
    finally:
        server.terminate()
        server.communicate(timeout=30)
    # a model without MTP modules cannot draft: one line
    base_train.main([*TINY, "--num-iterations=1", "--eval-every=-1", "--model-tag=plain"])
    proc = run_cli(base_dir, "-i", "base", "-g", "plain", "-p", "hello", "--speculative")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: --speculative: speculative decoding drafts with the model's MTP modules, and this model has none: "
        "train one with base_train --mtp-depth=1")
