"""Mamba-2 layers (nanochat/mamba.py) and hybrid models: the scan against the recurrence, decoding against the full forward."""

import dataclasses

import pytest
import torch

from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, GPTConfig, window_sizes
from nanochat.mamba import ssd_scan, ssd_step

OPTIONS = {"mamba2": {}, "trapezoidal": {"mamba3_trapezoidal": True}, "rope": {"mamba3_rope": True},
           "bc_norm": {"mamba3_bc_norm": True},
           "all": {"mamba3_trapezoidal": True, "mamba3_rope": True, "mamba3_bc_norm": True}}


def tiny_hybrid(pattern="AAM", seed=0, **overrides):
    config = GPTConfig(**{"sequence_len": 256, "vocab_size": 300, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                          "window_pattern": "SL", "mixer_pattern": pattern, "mamba_d_state": 16, "mamba_headdim": 16,
                          "mamba_chunk": 16, **overrides})
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # the zero-initialised projections must contribute for the comparisons to mean anything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("chunk, length", [(1, 7), (4, 16), (8, 37), (64, 37)])
def test_chunked_scan_equals_the_recurrence(chunk, length):
    torch.manual_seed(chunk)
    b, H, P, N = 2, 3, 4, 5
    x, B, C = torch.randn(b, length, H, P), torch.randn(b, length, N), torch.randn(b, length, N)  # the scan runs in fp32
    dt, A = torch.rand(b, length, H) * 0.5 + 0.01, -torch.rand(H) * 4 - 0.1
    h0 = torch.randn(b, H, P, N)
    y, final = ssd_scan(x, dt, A, B, C, chunk, initial_state=h0)
    h, ys = h0.float(), []
    for t in range(length):
        y_t, h = ssd_step(h, x[:, t].float(), dt[:, t], A, B[:, t], C[:, t])
        ys.append(y_t)
    assert torch.allclose(y, torch.stack(ys, dim=1), atol=1e-4)
    assert torch.allclose(final, h, atol=1e-4)


@pytest.mark.parametrize("pattern, option", [("M", option) for option in OPTIONS] + [("AAM", "mamba2"), ("AAM", "all")])
def test_prefill_and_decode_equal_the_full_forward(pattern, option):
    model = tiny_hybrid(pattern, **OPTIONS[option])
    torch.manual_seed(1)
    idx = torch.randint(0, 300, (2, 60))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=2, seq_len=60)
        pieces = [model(idx[:, :21], kv_cache=cache)]  # prefill: not a multiple of the chunk
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(21, 40)]  # one token at a time
        pieces.append(model(idx[:, 40:], kv_cache=cache))  # a chunk over a cached state
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)
    n_mamba = pattern.count("M") * 3 // len(pattern)
    assert len(cache.states) == n_mamba and len(cache.k) == 3 - n_mamba  # no keys and values for Mamba layers


def test_the_decode_state_does_not_grow_with_the_context():
    model = tiny_hybrid("M", mamba3_trapezoidal=True, mamba3_rope=True)
    with torch.no_grad():
        cache = KVCache.for_model(model, batch_size=1, seq_len=200)
        model(torch.randint(0, 300, (1, 10)), kv_cache=cache)
        sizes = {layer: {k: t.shape for k, t in state.items()} for layer, state in cache.states.items()}
        model(torch.randint(0, 300, (1, 150)), kv_cache=cache)
        assert {layer: {k: t.shape for k, t in state.items()} for layer, state in cache.states.items()} == sizes
        assert all(state["ssm"].dtype == torch.float32 for state in cache.states.values())


def test_engine_greedy_equals_naive_generation_on_a_hybrid(tokenizer):
    model = tiny_hybrid("AAM", mamba3_trapezoidal=True, vocab_size=tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("the cat sat", prepend=tokenizer.get_bos_token_id())
    naive = list(model.generate(prompt, max_tokens=12, temperature=0))
    sequences, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=0)
    assert all(s[len(prompt):] == naive[:len(s) - len(prompt)] for s in sequences)  # every row, after the copied prefill


def test_pure_attention_pattern_is_todays_model():
    from test_gpt import tiny_model
    today = tiny_model()
    explicit = tiny_model(mixer_pattern="A", mamba_d_state=8, mamba3_rope=True)  # Mamba settings without M: unused
    assert [n for n, _ in today.named_parameters()] == [n for n, _ in explicit.named_parameters()]
    idx = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        assert torch.equal(today(idx), explicit(idx))


def test_windows_and_value_embeddings_belong_to_attention_layers():
    config = GPTConfig(sequence_len=1024, n_layer=6, mixer_pattern="AAM", window_pattern="S")
    assert window_sizes(config) == [256, 256, None, 256, 1024, None]  # the last attention layer sees everything
    model = tiny_hybrid("AAM", n_layer=6)
    assert sorted(map(int, model.value_embeds)) == [1, 4]  # alternating over the attention layers 0, 1, 3, 4
    assert sorted(map(int, tiny_hybrid("AM", n_layer=4).value_embeds)) == [2]  # the last attention layer, at any depth


def test_muon_gets_only_matrices_and_every_parameter_has_a_group():
    model = tiny_hybrid("AM", **OPTIONS["all"])
    model.train()
    optimizer = model.setup_optimizer()
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    assert all(p.ndim == 2 for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"])
    mamba = model.transformer.h[1].mixer
    adamw = {id(p) for g in optimizer.param_groups if g["kind"] == "adamw" for p in g["params"]}
    assert {id(p) for p in (mamba.conv_weight, mamba.conv_bias, mamba.A_log, mamba.dt_bias, mamba.D, mamba.B_bias)} <= adamw
    loss = model(torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32)))
    loss.backward()
    optimizer.step()  # a step runs, with every kind of parameter


def test_a_hybrid_checkpoint_round_trips(tmp_path):
    from nanochat import checkpoint_manager as cm
    model = tiny_hybrid("AAM", n_layer=3, **OPTIONS["all"])
    cm.save_checkpoint(str(tmp_path), 5, model.state_dict(), None)
    cm.save_meta(str(tmp_path), 5, {"step": 5, "model_config": dataclasses.asdict(model.config)})
    loaded, _ = cm.build_model(str(tmp_path), 5, torch.device("cpu"), torch.float32)
    assert loaded.config == model.config and loaded.config.mixer_pattern == "AAM"
    idx = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("flags, message", [
    (["--mixer-pattern=AXM"], "--mixer-pattern='AXM' must be a string of A (attention) and M (Mamba), like AAM"),
    (["--mixer-pattern=AM", "--mamba-headdim=48"], "--mamba-headdim=48 must divide the Mamba width"),
    (["--mixer-pattern=M", "--mamba3-rope", "--mamba-d-state=15"], "--mamba-d-state=15 must be even"),
])
def test_bad_mixer_flags_are_one_line(flags, message, capsys):
    from scripts.base_train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--depth=4", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
