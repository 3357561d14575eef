import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, attention, build_model_config, window_sizes


def tiny_model(seed=0, perturb=True, **overrides):
    """A small real model; perturbed so the zero-initialised projections and smear actually contribute."""
    config = GPTConfig(**{"sequence_len": 1024, "vocab_size": 300, "n_layer": 4, "n_head": 4, "n_kv_head": 2,
                          "n_embd": 64, "window_pattern": "SSSL", **overrides})
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # an hf_compatible model's frozen scalars stay where they do nothing
                    p.add_(torch.randn_like(p) * 0.05)
            if model.smear_lambda.requires_grad:
                model.smear_lambda.fill_(0.7)
    return model


def expected_total(depth, vocab=32768):
    """Parameter count from the architecture's formula."""
    d = -(-depth * 64 // 128) * 128
    heads = d // 128
    ve_layers = sum(1 for i in range(depth) if i % 2 == (depth - 1) % 2)
    return (2 * vocab * d  # wte + lm_head
            + depth * 12 * d * d  # q, k, v, proj (4 d^2) + MLP (8 d^2)
            + ve_layers * (vocab * d + 12 * heads)  # value embeddings + their gates
            + 24 + 2 * depth + 2)  # smear gate, resid and x0 lambdas, smear and backout lambdas


@pytest.mark.parametrize("depth, total", [(12, 286_261_730), (20, 896_533_746), (24, 1_384_122_122)])
def test_parameter_counts_match_formula_and_reference(depth, total):
    with torch.device("meta"):  # no memory needed, even for d24
        model = GPT(build_model_config(depth, 32768))
    counts = model.num_scaling_params()
    assert counts["total"] == total == expected_total(depth)
    assert model.config.n_embd == -(-depth * 64 // 128) * 128 and model.config.n_head == model.config.n_embd // 128


def test_reference_table_at_other_depths():
    for depth, total_m in [(6, 73.5), (16, 536.9), (26, 1681.8)]:  # the reference lists d26 as 1.682B
        with torch.device("meta"):
            model = GPT(build_model_config(depth, 32768))
        assert round(model.num_scaling_params()["total"] / 1e6, 1) == total_m
    with torch.device("meta"):
        d20 = GPT(build_model_config(20, 32768))
    assert f"{d20.estimate_flops():.2e}" == "2.89e+09"  # FLOPs per token, as the reference computes


def test_windows_follow_the_pattern_and_the_last_layer_is_long():
    config = build_model_config(24, 32768)
    sizes = window_sizes(config)
    assert [i for i, w in enumerate(sizes) if w == 2048] == [3, 7, 11, 15, 19, 23]
    assert set(sizes) == {512, 2048}
    with pytest.raises(ValueError, match="string of S and L"):
        window_sizes(GPTConfig(window_pattern="SXL"))
    with pytest.raises(ValueError, match="mixer pattern"):
        GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, mixer_pattern="Q"))


def naive_attention(q, k, v, window, offset=0):
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = q @ k.mT / q.size(-1) ** 0.5
    q_pos = torch.arange(offset, offset + q.size(2))[:, None]
    k_pos = torch.arange(k.size(2))[None]
    allowed = (k_pos <= q_pos) & (q_pos - k_pos <= window)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("window", [1, 7, 64, 500])
def test_windowed_attention_equals_naive_masking(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 96, 16), torch.randn(2, 2, 96, 16), torch.randn(2, 2, 96, 16)
    assert torch.allclose(attention(q, k, v, window), naive_attention(q, k, v, window), atol=1e-5)
    # fewer queries than keys (the KV-cache case): the mask must align bottom-right
    assert torch.allclose(attention(q[:, :, 80:], k, v, window, q_offset=80),
                          naive_attention(q[:, :, 80:], k, v, window, offset=80), atol=1e-5)
    # one query (decoding): the window is sliced out of the cache instead of masked
    for t in (0, 5, 60, 95):
        assert torch.allclose(attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], window, q_offset=t),
                              naive_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], window, offset=t), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_cross_entropy_matches_the_plain_formula(dtype):
    """Compiled training's one-pass loss: the same losses and logit gradients as cross-entropy of softcap(logits),
    masked targets (-1) included."""
    import torch.nn.functional as F
    from nanochat.gpt import _SoftcapCrossEntropy, softcap
    torch.manual_seed(0)
    logits = (torch.randn(64, 300) * 20).to(dtype).requires_grad_()  # beyond the cap, where its slope matters
    targets = torch.randint(0, 300, (64,))
    targets[::5] = -1
    weights = torch.rand(64)  # a different gradient for every row
    (_SoftcapCrossEntropy.apply(logits, targets) * weights).sum().backward()
    ours, logits.grad = logits.grad, None
    plain = F.cross_entropy(softcap(logits.float()), targets, ignore_index=-1, reduction="none")
    assert torch.allclose(_SoftcapCrossEntropy.apply(logits, targets), plain, atol=1e-5)
    (plain * weights).sum().backward()
    assert torch.allclose(ours.float(), logits.grad.float(), rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-7)
    assert ours[::5].abs().max() == 0


def test_compiled_model_uses_flex_attention_and_matches_eager(monkeypatch):
    """
    The GPU path: with prepared block masks, the compiled model routes short windows through FlexAttention.
    Checked here on CPU (forward only: CPU FlexAttention has no backward) against the eager explicit-mask path.
    """
    import nanochat.gpt as gpt
    from torch.nn.attention import flex_attention as fa
    calls = []
    real = fa.flex_attention
    monkeypatch.setattr(fa, "flex_attention", lambda *a, **k: (calls.append(k["block_mask"]), real(*a, **k))[1])
    model = tiny_model(sequence_len=512)  # windows 128, 128, 128, 512
    model.prepare_flex_attention(256)  # rows shorter than the context, as SFT's --max-seq-len can make them
    idx = torch.randint(0, 300, (2, 256))
    with torch.no_grad():
        eager = model(idx)
        compiled = torch.compile(model, dynamic=False)(idx)
    gpt._block_masks.clear()
    assert len(calls) == 3  # the three windowed layers
    assert torch.allclose(compiled, eager, atol=1e-4)


@pytest.mark.parametrize("overrides, windows", [({}, [256, 256, 256, 1024]),
                                               ({"window_long": 100, "window_short": 40, "rotary_base": 1e6}, [40, 40, 40, 100])])
def test_kv_cache_decoding_equals_the_full_forward(overrides, windows):
    model = tiny_model(**overrides)
    assert model.windows == windows  # the test crosses the short window (and, with window_long, the long one)
    torch.manual_seed(3)
    idx = torch.randint(0, 300, (2, 300))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=2, seq_len=300)
        pieces = [model(idx[:, :200], kv_cache=cache)]  # prefill
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(200, 260)]  # one token at a time
        pieces.append(model(idx[:, 260:], kv_cache=cache))  # a chunk
    assert cache.pos == 300
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)


def test_init_constants_and_embedding_dtype():
    model = tiny_model(perturb=False)
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.backout_lambda.item() == pytest.approx(0.2) and model.smear_lambda.item() == 0
    for block in model.transformer.h:
        assert not block.mixer.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    assert sorted(model.value_embeds) == ["1", "3"]  # alternating, including the last layer
    with torch.device("meta"):
        bf16 = GPT(model.config, compute_dtype=torch.bfloat16)
    bf16.to_empty(device="cpu")
    bf16.init_weights()
    assert bf16.transformer.wte.weight.dtype == torch.bfloat16 and bf16.lm_head.weight.dtype == torch.float32
    assert bf16(torch.zeros(1, 8, dtype=torch.long)).dtype == torch.float32  # logits in fp32


def test_cast_for_inference_keeps_the_outputs_and_the_fp32_indexer():
    """A model loaded for inference holds its matmul weights in the compute dtype: the same logits, bit for bit (Linear
    rounded the fp32 masters to it on every call), and a sparse layer's indexer, which computes in fp32, stays fp32."""
    source = tiny_model(mixer_pattern="AD", dsa_indexer_dim=8)
    with torch.device("meta"):
        model = GPT(source.config, compute_dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(source.state_dict())
    model.cast_embeddings()
    idx = torch.randint(0, 300, (2, 24))
    with MatmulCount() as unjoined:
        before = model(idx)
    model.cast_for_inference()
    assert model.lm_head.weight.dtype == model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert model.transformer.h[1].mixer.indexer.c_q.weight.dtype == torch.float32
    with MatmulCount() as joined:
        assert torch.equal(model(idx), before)
    # q, k and v in one matmul per attention layer, their weights views of one matrix (no second copy)
    assert joined.calls == unjoined.calls - 2 * model.config.n_layer
    for block in model.transformer.h:
        assert block.mixer.c_v.weight.untyped_storage().data_ptr() == block.mixer.qkv_weight.untyped_storage().data_ptr()


class MatmulCount(TorchDispatchMode):
    def __enter__(self):
        self.calls = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
        return func(*args, **(kwargs or {}))


def test_logits_are_soft_capped_and_loss_ignores_minus_one():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
        idx = torch.randint(0, 300, (1, 16))
        assert model(idx).abs().max() <= 15
        targets = idx.clone()
        targets[0, :8] = -1
        per_token = model(idx, targets, loss_reduction="none")
        assert (per_token[:8] == 0).all() and torch.isclose(model(idx, targets), per_token[8:].mean())


def test_tiny_model_overfits_a_batch():
    model = tiny_model(perturb=False, n_layer=2, sequence_len=32)
    optimizer = model.setup_optimizer(embedding_lr=0.05, unembedding_lr=0.01, matrix_lr=0.02)
    torch.manual_seed(0)
    x = torch.randint(0, 300, (4, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(60):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 5 and losses[-1] < 0.5 * losses[0]


def test_fp8_linear_tracks_the_bf16_one():
    """fp8 training matmuls (run here through torch._scaled_mm's CPU kernel) stay close to the exact ones."""
    from nanochat.gpt import Linear, enable_fp8
    torch.manual_seed(0)
    exact, fp8 = Linear(256, 128), Linear(256, 128)
    fp8.load_state_dict(exact.state_dict())
    holder = torch.nn.Sequential(fp8, Linear(24, 1))
    assert enable_fp8(holder) == 1 and fp8.fp8 and not holder[1].fp8  # too small to qualify
    x = torch.randn(4, 32, 256, dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = exact(x1), fp8(x2)
    assert y2.shape == y1.shape and y2.dtype == torch.bfloat16
    cosine = lambda a, b: torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
    assert cosine(y1, y2) > 0.99
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert cosine(x1.grad, x2.grad) > 0.99 and cosine(exact.weight.grad, fp8.weight.grad) > 0.99
    assert fp8.weight.grad.dtype == torch.float32
    fp8.eval()  # evaluation and sampling use the exact path
    assert torch.equal(fp8(x), exact(x))


@pytest.mark.parametrize("mixers", ["A", "AM"])
def test_activation_checkpointing_gives_the_same_gradients(mixers):
    model = tiny_model(mixer_pattern=mixers, mamba_headdim=16, mamba_d_state=16, mamba_chunk=8)
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    grads, calls, mlp = [], [], model.transformer.h[1].mlp
    mlp.forward = lambda x, forward=mlp.forward: calls.append(1) or forward(x)  # (a recompute fires no hooks)
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        calls.clear()
        model(idx, targets=idx.roll(-1, 1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert len(calls) == (2 if on else 1)  # with it on, the backward pass ran the block again
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)
