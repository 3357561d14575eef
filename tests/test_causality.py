"""
The guard every model feature must pass: what comes after position t never changes the logits at positions <= t, and
decoding through the KV cache (the Engine's way) gives the logits of the full forward. FEATURES names each
architecture option and combination as GPTConfig overrides of one tiny model; a new feature adds its entries here.
"""

import pytest
import torch

from nanochat.engine import KVCache
from test_gpt import tiny_model

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
    "mHC, 1 stream (the plain residual)": {"mhc_streams": 1},
    "mHC, 3 streams": {"mhc_streams": 3},
    "Engram at layers 0 and 2": {"engram_layers": "0,2", "engram_heads": 2, "engram_rows": 97},
    "MTP, 2 modules (the logits; the drafts in tests/test_mtp.py)": {"mtp_depth": 2},
    "Engram, mHC and MTP on a hybrid AAM": {"mixer_pattern": "AAM", "engram_layers": "1,-1", "engram_rows": 97,
                                            "mhc_streams": 2, "mtp_depth": 1},
    "sparse attention AD, top 6 keys in windows of 12 and 48": {"mixer_pattern": "AD", "window_short": 12, "dsa_top_k": 6,
                                                                "dsa_indexer_heads": 2, "dsa_indexer_dim": 8},
    "sparse attention only, one key/value head, top 4": {"mixer_pattern": "D", "n_kv_head": 1, "dsa_top_k": 4,
                                                         "dsa_indexer_heads": 2, "dsa_indexer_dim": 8},
}
T = 48


def tiny(overrides):
    """4 layers, windows of 12 (S) and 48 (L) tokens, every zero-initialised weight given a value, fp32."""
    return tiny_model(**{"sequence_len": T, "window_short": 12, "mamba_d_state": 16, "mamba_headdim": 16,
                         "mamba_chunk": 16, **overrides})


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


@pytest.mark.parametrize("feature", FEATURES)
def test_cached_decoding_equals_the_full_forward(feature):
    """A prefill, a chunk of 5 over the cache, then one token at a time: the logits of one forward over the whole row."""
    model = tiny(FEATURES[feature])
    idx = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, 2, T)
        pieces = [(0, 20), (20, 25), *[(t, t + 1) for t in range(25, T)]]
        cached = torch.cat([model(idx[:, a:b], kv_cache=cache) for a, b in pieces], dim=1)
    assert torch.allclose(cached, full, atol=1e-4), (feature, (cached - full).abs().max().item())
