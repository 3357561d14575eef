"""
The guard every model feature must pass: what comes after position t never changes the logits at positions <= t.
FEATURES names each architecture option and combination as GPTConfig overrides of one tiny model; a new feature adds
its entries here. (Cached decoding against the full forward, the Engine's side of the same promise, is checked per
mixer in tests/test_gpt.py and tests/test_mamba.py.)
"""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig

MAMBA3 = {"mamba3_trapezoidal": True, "mamba3_rope": True, "mamba3_bc_norm": True}
FEATURES = {
    "attention, short and long windows": {},
    "attention, full windows only": {"window_pattern": "L"},
    "hf_compatible": {"hf_compatible": True, "window_pattern": "L"},
    "grouped-query attention": {"n_kv_head": 1},
    "hybrid AAM": {"mixer_pattern": "AAM"},
    "Mamba only, Mamba-3 options": {"mixer_pattern": "M", **MAMBA3},
    "hybrid MA, Mamba-3 options, short windows": {"mixer_pattern": "MA", "window_pattern": "S", **MAMBA3},
    "long context: windows of 20 and 8 tokens, rotary base 1e6": {"window_long": 20, "window_short": 8, "rotary_base": 1e6},
}
T = 48


def tiny(overrides):
    """4 layers, windows of 12 (S) and 48 (L) tokens, every zero-initialised weight given a value, fp32."""
    config = GPTConfig(**{"sequence_len": T, "vocab_size": 300, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                          "window_pattern": "SSSL", "mamba_d_state": 16, "mamba_headdim": 16, "mamba_chunk": 16,
                          **overrides})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # hf_compatible's frozen scalars stay where they do nothing
                p.add_(torch.randn_like(p) * 0.05)
        if model.smear_lambda.requires_grad:
            model.smear_lambda.fill_(0.7)  # the smear looks at the previous token: make it matter
    return model


@pytest.mark.parametrize("feature", FEATURES)
def test_later_tokens_never_change_earlier_logits(feature):
    model = tiny(FEATURES[feature])
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (2, T), generator=gen)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, 11, 12, 30, T - 2):  # around the short window's edge (12), the first and the last positions
            changed = idx.clone()
            changed[:, t + 1:] = torch.randint(0, 300, (2, T - t - 1), generator=gen)
            logits = model(changed)
            assert torch.allclose(logits[:, :t + 1], base[:, :t + 1], atol=1e-5), (feature, t)
            assert not torch.allclose(logits[:, t + 1:], base[:, t + 1:], atol=1e-3), (feature, t)  # the change is seen
        # the training forward: the loss at each position depends on the past and its own target only
        targets = torch.randint(0, 300, (2, T), generator=gen)
        losses = model(idx, targets, loss_reduction="none").view(2, T)
        changed = idx.clone()
        changed[:, 20:] = (changed[:, 20:] + 1) % 300
        later = model(changed, targets, loss_reduction="none").view(2, T)
        assert torch.allclose(losses[:, :20], later[:, :20], atol=1e-5), feature
