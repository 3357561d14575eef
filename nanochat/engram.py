"""
Engram: conditional memory by hashed n-gram lookup (DeepSeek, arXiv 2601.07372; deepseek-ai/Engram's demo).

At the chosen layers, before the sequence mixer, each position looks up the n-grams that end at it (n = 2 and 3) in
hashed embedding tables, K hash heads per order:
    z = (XOR_j  x_{t-j} * m_j) mod P        (m_j random odd multipliers per layer, order and head; P a prime per table)
    e_t = concat over n and heads of E_{n,k}[z]                               (B, T, d_mem)
A context gate decides how much of it the current hidden state h_t wants:
    k = W_K e, v = W_V e, s = RMSNorm(h).RMSNorm(k)/sqrt(C), alpha = sigmoid(sign(s) sqrt|s|)
and a short depthwise causal conv (kernel 4, dilation 3 = the largest n) lets neighbouring lookups combine:
    Y = alpha v + SiLU(conv(RMSNorm(alpha v)))
Lookups depend on token ids only, so a GPU could prefetch them; here they are plain embedding reads. The paper's
tokenizer compression (canonical ids before hashing) is left out: nanochat's tokenizer has no such map.
The fork this replaces had no table at all (moving averages of the hidden state); this is the paper's memory.
"""

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.engine import recent

ORDERS = (2, 3)
KERNEL, DILATION = 4, max(ORDERS)
CONV_REACH = (KERNEL - 1) * DILATION  # how many earlier positions the conv reads


def engram_layers(config):
    """The layer indices listed in config.engram_layers ("0,3", negative counts from the end; "" = none)."""
    if not config.engram_layers.strip():
        return []
    try:
        layers = [int(s) for s in config.engram_layers.split(",")]
    except ValueError:
        raise ValueError(f"engram layers {config.engram_layers!r} must be comma-separated layer numbers") from None
    if any(not -config.n_layer <= i < config.n_layer for i in layers):
        raise ValueError(f"engram layers {config.engram_layers!r} must lie in 0..{config.n_layer - 1} (or count back from -1)")
    return sorted({i % config.n_layer for i in layers})


def _is_prime(p):
    return p > 1 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def table_sizes(rows, count):
    """count distinct primes from rows up: a prime modulus spreads the hashes over every row."""
    sizes, p = [], rows
    while len(sizes) < count:
        if _is_prime(p):
            sizes.append(p)
        p += 1
    return sizes


class Engram(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, C = layer_idx, config.n_embd
        heads = config.engram_heads
        d_mem = config.engram_dim or C // 2
        if d_mem % (len(ORDERS) * heads):
            raise ValueError(f"engram dim {d_mem} must split evenly over {len(ORDERS)} orders x {heads} heads")
        self.pad = config.vocab_size  # the id hashed in for positions before the first token
        self.orders = [n for n in ORDERS for _ in range(heads)]  # one table per order and hash head
        self.sizes = table_sizes(config.engram_rows or 2 * config.vocab_size, len(self.orders))
        self.tables = nn.ModuleList([nn.Embedding(p, d_mem // len(self.sizes)) for p in self.sizes])
        # the hash multipliers: fixed odd numbers below 2^31, a function of the layer only (ids < 2^17, so no overflow)
        rng = random.Random(1000 + layer_idx)  # plain Python: models are built on the meta device
        self.multipliers = [[rng.getrandbits(30) | 1 for _ in range(max(ORDERS))] for _ in self.sizes]
        self.c_k = nn.Linear(d_mem, C, bias=False)
        self.c_v = nn.Linear(d_mem, C, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(C, 1, KERNEL))

    @torch.no_grad()
    def init_weights(self, n_embd):
        s = 3 ** 0.5 * self.c_k.in_features ** -0.5
        for table in self.tables:
            table.weight.normal_(0, 1)
        self.c_k.weight.uniform_(-s, s)
        self.c_v.weight.zero_()  # the memory starts silent, as every block's output projection does
        self.conv_weight.uniform_(-KERNEL ** -0.5, KERNEL ** -0.5)

    def lookup(self, ids):
        """ids (B, T + 2): the two tokens before the T positions, then theirs -> e (B, T, d_mem)."""
        T = ids.size(1) - (max(ORDERS) - 1)
        out = []
        for table, size, mult, order in zip(self.tables, self.sizes, self.multipliers, self.orders):
            z = torch.zeros_like(ids[:, :T])
            for j in range(order):  # token t - j sits at offset (max order - 1) - j
                start = max(ORDERS) - 1 - j
                z = z ^ (ids[:, start:start + T] * mult[j])
            out.append(table(z % size))
        return torch.cat(out, dim=-1)

    def forward(self, h, idx, kv_cache):
        """h (B, T, C): the residual stream; idx (B, T): the tokens. Decoding takes the earlier tokens' ids and conv
        inputs from the cache, so it equals the full forward."""
        ids = torch.cat([recent(kv_cache, (self.layer_idx, "engram ids"), idx, max(ORDERS) - 1, self.pad), idx], dim=1)
        e = self.lookup(ids).to(h.dtype)
        k, v = F.linear(e, self.c_k.weight.to(h.dtype)), F.linear(e, self.c_v.weight.to(h.dtype))
        s = (F.rms_norm(h, (h.size(-1),)) * F.rms_norm(k, (k.size(-1),))).sum(-1, keepdim=True) / h.size(-1) ** 0.5
        v = torch.sigmoid(s.sign() * s.abs().sqrt()) * v
        u = F.rms_norm(v, (v.size(-1),))
        u = torch.cat([recent(kv_cache, (self.layer_idx, "engram conv"), u, CONV_REACH), u], dim=1).transpose(1, 2)
        conv = F.conv1d(u, self.conv_weight.to(u.dtype), dilation=DILATION, groups=u.size(1)).transpose(1, 2)
        return v + F.silu(conv)

    def flops_per_token(self):
        """The conv's training FLOPs (c_k and c_v are counted with every Linear)."""
        return 3 * 2 * KERNEL * self.conv_weight.size(0)
