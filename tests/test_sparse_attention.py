"""DeepSeek sparse attention (nanochat/sparse_attention.py): dense when every key is kept, really top-k otherwise, the
indexer's KL (trains the indexer, never the LM), cached decoding, checkpoints, base_train's flags and a smoke run."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, attention
from nanochat.sparse_attention import (SparseSelfAttention, last_indexer_kl, set_stage, sparse_layers, top_k_keys,
                                       visible_keys)
from test_gpt import tiny_model

T = 48


def tiny(pattern="AD", seed=0, **overrides):
    """3 layers, 4 query and 2 key/value heads of 16 dims, windows of 12 (S) and 48 (L); an indexer of 2 x 8 dims,
    top 6 keys. Perturbed, so that the zero-initialised projections contribute."""
    return tiny_model(seed=seed, **{"sequence_len": T, "n_layer": 3, "window_pattern": "SL", "window_short": 12,
                                    "mixer_pattern": pattern, "dsa_top_k": 6, "dsa_indexer_heads": 2,
                                    "dsa_indexer_dim": 8, **overrides})


def dense_twin(model):
    """The same model with every D layer made plain attention (A), the indexers left out."""
    config = dataclasses.replace(model.config, mixer_pattern=model.config.mixer_pattern.replace("D", "A"))
    with torch.device("meta"):
        twin = GPT(config)
    twin.to_empty(device="cpu")
    twin.init_weights()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".indexer." in k for k in unexpected)
    return twin


def batch(seed=1, rows=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (rows, T), generator=gen), torch.randint(0, 300, (rows, T), generator=gen)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_keeping_every_key_is_dense_attention(stage):
    """With k at least the context: the logits, the loss and every shared weight's gradient of plain attention."""
    model = tiny("AD", dsa_top_k=T)
    twin = dense_twin(model)
    idx, targets = batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), twin.eval()(idx))
    model.train()
    twin.train()
    set_stage(model, stage)
    model(idx, targets).backward()
    twin(idx, targets).backward()
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name  # the indexer still learns its KL
        else:
            assert torch.equal(p.grad, grads[name].grad), name
    # and the sparse path itself, the selection as a mask, is attention when the selection is every visible key
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    for window in (12, T):
        visible = visible_keys(T, T, 0, window, "cpu")
        keys = top_k_keys(torch.randn(2, T, T), visible, T, 0)
        assert torch.equal(keys, visible.expand_as(keys))
        sparse = F.scaled_dot_product_attention(q, k, v, attn_mask=keys.unsqueeze(1), enable_gqa=True)
        assert torch.allclose(sparse, attention(q, k, v, window), atol=1e-6)


def test_top_k_restricts_each_query_to_its_selected_keys():
    """A query's output moves when one of its k selected keys changes, and not at all when an unselected one does."""
    model = tiny("D", n_layer=1, dsa_top_k=6).eval()
    layer, window = model.transformer.h[0].mixer, model.windows[0]
    assert isinstance(layer, SparseSelfAttention) and window == T
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(3))

    def run(x):
        scores = layer.indexer(x, layer.indexer.keys(x, cos, sin), cos, sin)
        keys = top_k_keys(scores, visible_keys(T, T, 0, window, "cpu"), 6, 0)
        return layer(x, None, cos, sin, window, None), keys[0, -1]

    with torch.no_grad():
        y, chosen = run(x)
        assert chosen.sum() == 6 and chosen[-1]  # the last query keeps 6 keys, itself among them
        selected = chosen[:-1].nonzero().flatten()[0].item()
        unselected = (~chosen).nonzero().flatten()[0].item()
        for s, moves in ((selected, True), (unselected, False)):
            x2 = x.clone()
            x2[0, s] += 1e-2 * torch.randn(64, generator=torch.Generator().manual_seed(4))
            y2, chosen2 = run(x2)
            assert torch.equal(chosen2, chosen)  # a small change: the same selection
            assert (y2[0, -1] - y[0, -1]).abs().max() > 1e-6 if moves else torch.equal(y2[0, -1], y[0, -1])
        dense = layer.top_k
        layer.top_k = T
        assert not torch.allclose(layer(x, None, cos, sin, window, None)[0, -1], y[0, -1], atol=1e-4)  # not dense
        layer.top_k = dense


def test_indexer_learns_its_kl_and_the_lm_never_does():
    """In the warm-up the LM's gradients are exactly those of a model with the indexer's loss off, and a few steps on
    the indexer alone bring its KL down; in the sparse stage the KL (over the selected keys) still reaches it."""
    model = tiny("AD").train()
    off = copy.deepcopy(model)
    for layer in sparse_layers(off):
        layer.kl_weight = 0.0
    set_stage(model, "dense"), set_stage(off, "dense")
    idx, targets = batch()
    model(idx, targets).backward()
    off(idx, targets).backward()
    grads = dict(off.named_parameters())
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert grads[name].grad is None and p.grad.abs().sum() > 0, name
        else:
            assert torch.equal(p.grad, grads[name].grad), name
    assert last_indexer_kl(off) is None

    indexer = [p for layer in sparse_layers(model) for p in layer.indexer.parameters()]
    optimizer = torch.optim.AdamW(indexer, lr=1e-2)
    kls = []
    for _ in range(8):
        model.zero_grad(set_to_none=True)
        model(idx, targets).backward()
        kls.append(last_indexer_kl(model))
        optimizer.step()
    assert kls[-1] < 0.7 * kls[0], kls
    set_stage(model, "sparse")
    model.zero_grad(set_to_none=True)
    model(idx, targets).backward()
    assert 0 <= last_indexer_kl(model) and all(p.grad.abs().sum() > 0 for p in indexer)
    # without gradients (evaluation, decoding) the sparse path, whatever the stage
    set_stage(model, "dense")
    with torch.no_grad():
        assert torch.equal(model(idx), model.eval()(idx))


@pytest.mark.parametrize("pattern", ["D", "AD"])
def test_cached_decoding_equals_the_full_forward(pattern, tokenizer):
    model = tiny(pattern).eval()
    idx, _ = batch(seed=5)
    with torch.no_grad():
        full = model(idx)
        assert not torch.allclose(full, dense_twin(model).eval()(idx), atol=1e-3)  # k < T: really sparse
        cache = KVCache.for_model(model, 2, T)
        pieces = [(0, 17), (17, 23), *[(t, t + 1) for t in range(23, T)]]  # a prefill, a chunk, then token by token
        cached = torch.cat([model(idx[:, a:b], kv_cache=cache) for a, b in pieces], dim=1)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max().item()
    assert {tuple(s["index_keys"].shape) for s in cache.states.values()} == {(2, T, 8)}
    # the Engine: one prefill copied into every row, then decoding, as the naive loop without a cache
    model = tiny(pattern, vocab_size=tokenizer.get_vocab_size()).eval()
    prompt = tokenizer.encode("the cat sat on the mat by the river", prepend=tokenizer.get_bos_token_id())
    naive = list(model.generate(prompt, max_tokens=12, temperature=0))
    rows, _ = Engine(model, tokenizer, compile=False).generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0)
    assert all(r[len(prompt):] == naive[:len(r) - len(prompt)] for r in rows)


def test_bf16_decoding_stays_as_close_to_the_full_forward_as_attention():
    """The indexer scores in fp32 whatever the compute dtype: in bf16, near-ties flipped between the cached and the
    full forward, and the logits were ~9x further apart than plain attention's."""
    gaps = {}
    for pattern in ("AA", "AD"):
        fp32 = tiny(pattern)
        with torch.device("meta"):
            model = GPT(fp32.config, compute_dtype=torch.bfloat16)
        model.to_empty(device="cpu")
        model.init_weights()
        model.load_state_dict(fp32.state_dict())
        model.cast_embeddings()
        model.eval()
        idx, _ = batch()
        with torch.no_grad():
            full = model(idx)
            cache = KVCache.for_model(model, 2, T)
            cached = torch.cat([model(idx[:, :20], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache)
                                                                        for t in range(20, T)], dim=1)
        gaps[pattern] = (cached - full).abs().max().item()
    assert gaps["AD"] < 3 * gaps["AA"], gaps


def test_a_checkpoint_round_trips_and_older_ones_load(tmp_path):
    from nanochat import checkpoint_manager as cm
    model = tiny("AD", dsa_top_k=5, dsa_indexer_heads=3)
    cm.save_checkpoint(str(tmp_path), 5, model.state_dict(), None)
    cm.save_meta(str(tmp_path), 5, {"step": 5, "model_config": dataclasses.asdict(model.config)})
    loaded, _ = cm.build_model(str(tmp_path), 5, torch.device("cpu"), torch.float32)
    assert loaded.config == model.config and (loaded.config.dsa_top_k, loaded.config.dsa_indexer_heads) == (5, 3)
    assert all(layer.stage == "sparse" for layer in sparse_layers(loaded))  # what every later stage trains in
    idx, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))
    # a checkpoint from before DSA: no dsa_ fields in its meta, and its model is today's
    old = tiny("A")
    meta = {k: v for k, v in dataclasses.asdict(old.config).items() if not k.startswith("dsa_")}
    cm.save_checkpoint(str(tmp_path), 6, old.state_dict(), None)
    cm.save_meta(str(tmp_path), 6, {"step": 6, "model_config": meta})
    loaded, _ = cm.build_model(str(tmp_path), 6, torch.device("cpu"), torch.float32)
    assert not sparse_layers(loaded)


def test_flops_count_the_top_k_and_the_indexer():
    dense, sparse = tiny("A", dsa_top_k=T), tiny("D", dsa_top_k=T)
    indexer_weights = sum(p.numel() for layer in sparse_layers(sparse) for p in layer.indexer.parameters())
    scoring = 6 * 2 * 8 * (12 + 2 * T)  # H_I x D_I multiply-adds per key in each layer's window (12, 48, 48)
    assert sparse.estimate_flops() == dense.estimate_flops() + 6 * indexer_weights + scoring
    fewer = tiny("D", dsa_top_k=4)
    assert fewer.estimate_flops() == sparse.estimate_flops() - 12 * 64 * ((12 - 4) + 2 * (T - 4))


def test_fsdp_delivers_the_indexer_gradients():
    """FSDP2's hooks on one gloo process (the sharding is trivial, the hooks are not): the KL attached in the backward
    pass reaches the indexer's sharded weights, and every gradient is the unsharded model's."""
    import torch.distributed as dist
    from nanochat.parallel import parallelize
    model = tiny("AD").train()
    reference = copy.deepcopy(model)
    idx, targets = batch()
    reference(idx, targets).backward()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = parallelize(model, "fsdp", 1, torch.device("cpu"))
        sharded(idx, targets).backward()
        grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
    finally:
        dist.destroy_process_group()
    for name, p in reference.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


@pytest.mark.parametrize("flags, message", [
    (["--dsa-top-k=64"], "--dsa-top-k and --dsa-warmup-steps set up sparse attention layers: put D in --mixer-pattern"),
    (["--mixer-pattern=AD", "--dsa-top-k=0"], "--dsa-top-k=0 must be at least 1"),
    (["--mixer-pattern=AD", "--hf-compatible"], "--hf-compatible models attend to the whole context"),
])
def test_bad_dsa_flags_are_one_line(flags, message, capsys):
    from scripts.base_train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--depth=4", *flags])
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_tensor_parallel_is_refused_for_d_layers():
    import torch.distributed as dist
    from nanochat.common import UserError
    from nanochat.gpt import build_model_config
    from nanochat.parallel import check
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="use --parallel fsdp \\(or ddp\\) for D layers"):
            check("tp", 2, 2, build_model_config(4, 256, aspect_ratio=16, head_dim=16, mixer_pattern="AD"))
    finally:
        dist.destroy_process_group()


def test_base_train_warms_up_dense_then_trains_sparse(base_dir, tokenizer, capsys, monkeypatch):
    """20 steps at d2 with an AD pattern, 10 of them the dense warm-up: the loss falls, the indexer's KL is logged at
    every step (its fall is checked in test_indexer_learns_its_kl_and_the_lm_never_does), and the checkpoint holds the
    sparse layers' settings."""
    import json
    from test_base_train import TINY, make_workspace
    from scripts import base_train
    make_workspace(base_dir, tokenizer)
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    base_train.main([*TINY, "--mixer-pattern=AD", "--dsa-top-k=16", "--dsa-warmup-steps=10", "--num-iterations=20",
                     "--eval-every=-1", "--model-tag=dsa"])
    out = capsys.readouterr().out
    steps = [line.split(" | ") for line in out.splitlines() if line.startswith("step ") and "/" in line]
    losses = [float(parts[1].removeprefix("loss: ")) for parts in steps]
    kls = [float(part.removeprefix("indexer kl: ")) for parts in steps for part in parts if part.startswith("indexer kl: ")]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.2, losses
    assert len(kls) == 20 and all(0 < kl < 10 for kl in kls), kls
    assert "a D layer's queries attend to their top 16 keys, after 10 dense warm-up steps" in out
    meta = json.loads((base_dir / "base_checkpoints" / "dsa" / "meta_000020.json").read_text())
    assert meta["model_config"]["mixer_pattern"] == "AD" and meta["model_config"]["dsa_top_k"] == 16
