"""
DeepSeek Sparse Attention (DSA, arXiv 2512.02556) as a sequence mixer: attention layers ("D" in mixer_pattern) whose
queries attend only to the top-k of the keys they may see, as ranked by a lightning indexer

    I_{t,s} = sum_j w_{t,j} ReLU(q^I_{t,j} . k^I_s)    (dsa_indexer_heads heads j of dsa_indexer_dim dims; q^I and w
                                                        from the query token, one k^I shared by the heads per key token)

Everything else is CausalSelfAttention's: q/k/v, rotary, QK-norm, value embeddings, sliding windows and the KV cache.
The top-k is taken among the keys that causality and the window leave, and each query always keeps itself: with
dsa_top_k at least the visible keys a layer is exactly dense attention.

Training, in the paper's two stages (each layer's `stage`, set by the training script through set_stage):
1. "dense" warm-up: attention stays dense; the indexer learns KL(p_t || softmax(I_t)) over the visible keys, p being
   the main attention's distribution summed over heads and L1-normalised;
2. "sparse" (the default, and what the chat stages train in): attention over the top-k; the KL over those keys only.
The indexer reads detached inputs and p comes from detached q and k, so the indexer learns only from its KL and the LM
never does (top-k is not differentiable either). The KL enters in the backward pass (_AttachLoss), with no change to
GPT.forward; the last value stays on the layer for logging (last_indexer_kl). Without gradients (evaluation, decoding)
the path is always the sparse one.

This is a reference path: a boolean mask over the whole (T, T) score matrix into SDPA, which costs what masked dense
attention costs (O(T^2) memory, no speed-up). A sparse kernel that gathers only the k chosen keys (FlashMLA-style) is
what makes DSA fast; this code defines what such a kernel must compute.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import CausalSelfAttention, Linear, apply_rotary_emb, attention, norm, sdpa


def check_sizes(config):
    """A DSA setting that cannot work is one ValueError line naming the flag."""
    head_dim = config.n_embd // config.n_head
    if config.dsa_top_k < 1:
        raise ValueError(f"--dsa-top-k={config.dsa_top_k} must be at least 1 (keys each query attends to)")
    if config.dsa_indexer_heads < 1:
        raise ValueError(f"dsa_indexer_heads={config.dsa_indexer_heads} must be at least 1")
    if config.dsa_indexer_dim % 2 or not 2 <= config.dsa_indexer_dim <= head_dim:
        raise ValueError(f"dsa_indexer_dim={config.dsa_indexer_dim} must be even and at most the head size ({head_dim}): "
                         "the indexer is rotated with the attention's rotary frequencies")


class LightningIndexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer (arXiv 2512.02556): few small heads, ReLU scores, one key per token."""
    fp32_weights = True  # it reads fp32 inputs (see SparseSelfAttention.forward): GPT.cast_for_inference leaves it be

    def __init__(self, config):
        super().__init__()
        check_sizes(config)
        self.n_head, self.head_dim = config.dsa_indexer_heads, config.dsa_indexer_dim
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.head_dim)  # one key per token, shared by the indexer's heads
        self.c_w = Linear(config.n_embd, self.n_head)
        self.stride = (config.n_embd // config.n_head) // self.head_dim

    @torch.no_grad()
    def init_weights(self, n_embd):
        s = 3 ** 0.5 * n_embd ** -0.5
        for w in (self.c_q.weight, self.c_k.weight, self.c_w.weight):
            w.uniform_(-s, s)

    def rotate(self, x, cos, sin):
        # rotary on every indexer dim, so it can learn recency as attention does; every stride-th of the attention's
        # frequencies spans the same range of wavelengths (DeepSeek's indexer rotates a part of its dims)
        cos, sin = cos[..., ::self.stride][..., :self.head_dim // 2], sin[..., ::self.stride][..., :self.head_dim // 2]
        return norm(apply_rotary_emb(x, cos, sin))

    def keys(self, x, cos, sin):
        """(B, T, C) -> the indexer keys k^I (B, T, D_I): what the KV cache keeps for this layer."""
        B, T, _ = x.shape
        return self.rotate(self.c_k(x).view(B, T, 1, self.head_dim), cos, sin).view(B, T, self.head_dim)

    def forward(self, x, keys, cos, sin):
        """I (B, Tq, Tk) for the queries x (B, Tq, C) over the indexer keys (B, Tk, D_I); fp32."""
        B, T, _ = x.shape
        q = self.rotate(self.c_q(x).view(B, T, self.n_head, self.head_dim), cos, sin)
        w = self.c_w(x).float() * self.n_head ** -0.5
        s = F.relu(torch.einsum("bthd,bsd->bths", q, keys).float()) * self.head_dim ** -0.5
        return torch.einsum("bths,bth->bts", s, w)


# -----------------------------------------------------------------------------
# Selection, the sparse attention and the indexer's loss

def visible_keys(Tq, Tk, q_offset, window, device):
    """(1, Tq, Tk) bool: the keys each query may see (causal, within the window), as attention() masks them."""
    q_pos = torch.arange(q_offset, q_offset + Tq, device=device).unsqueeze(1)
    k_pos = torch.arange(Tk, device=device).unsqueeze(0)
    return ((k_pos <= q_pos) & (q_pos - k_pos <= window)).unsqueeze(0)


def top_k_keys(scores, visible, k, q_offset):
    """(B, Tq, Tk) bool: the k best-scored visible keys of each query, always including the query itself."""
    Tq, Tk = scores.shape[-2:]
    q_pos = torch.arange(q_offset, q_offset + Tq, device=scores.device).unsqueeze(1)
    is_self = torch.arange(Tk, device=scores.device) == q_pos
    scores = scores.masked_fill(~visible, -math.inf).masked_fill(is_self, math.inf)
    # ties are common (ReLU's exact zeros): a stable sort over the keys newest-first gives them to the most recent,
    # whatever the number of keys after them, so that decoding with a cache chooses as the full forward does
    chosen = Tk - 1 - scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :k]
    # with fewer than k visible keys the first k also take invisible ones (at -inf): the AND drops them
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True) & visible


def indexer_kl(q, k, scores, keys):
    """
    KL(p_t || softmax(I_t)) over the allowed keys (B, Tq, Tk), averaged over queries: p is the main attention from q
    (B, H, Tq, D) and k (B, Hkv, Tk, D), restricted to those keys, summed over heads and L1-normalised. Pass q and k
    detached: p is a target.
    """
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # GQA: query head h reads key head h // group, as SDPA does
    logits = q.float() @ k.float().transpose(-2, -1) * q.size(-1) ** -0.5  # SDPA's scale
    p = logits.masked_fill(~keys.unsqueeze(1), -math.inf).softmax(dim=-1).mean(dim=1)
    log_q = scores.masked_fill(~keys, -math.inf).log_softmax(dim=-1).masked_fill(~keys, 0.0)
    return (torch.xlogy(p, p) - p * log_q).sum(dim=-1).mean()


class _AttachLoss(torch.autograd.Function):
    """y unchanged; in the backward pass `loss` also gets the gradient `weight`, as if weight * loss had been added to
    the training loss (how MoE auxiliary losses are often attached). Not divided by gradient accumulation or an fp16
    loss scale: it reaches only the indexer's matrices, whose Muon update does not depend on the gradient's scale."""

    @staticmethod
    def forward(ctx, y, loss, weight):
        ctx.weight = weight
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.tensor(ctx.weight, dtype=torch.float32, device=grad.device), None


class SparseSelfAttention(CausalSelfAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.top_k = config.dsa_top_k
        self.indexer = LightningIndexer(config)
        self.stage = "sparse"  # or "dense": the warm-up (training only; see the module docstring)
        self.kl_weight = 1.0  # 0 turns the indexer's loss off
        self.last_kl = None  # the indexer's KL at the last training forward (a detached scalar), for logging

    @torch.no_grad()
    def init_weights(self, n_embd):
        super().init_weights(n_embd)
        self.indexer.init_weights(n_embd)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, ve, cos, sin)
        # the indexer reads detached inputs (it learns from its KL alone), in fp32: its scores make a hard choice, and
        # in bf16 near-ties flipped between cached and full forwards (logits ~9x further apart than attention's in a test)
        x, cos, sin = x.detach().float(), cos.float(), sin.float()
        index_keys = self.indexer.keys(x, cos, sin)  # (B, T, D_I)
        offset = 0
        if kv_cache is not None:  # the indexer keys of every cached token, in the cache's per-layer state
            offset = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)
            state = kv_cache.states.setdefault(self.layer_idx, {})
            if "index_keys" in state:  # cut at pos: tokens the cache took back (a rewind) are dropped
                index_keys = torch.cat([state["index_keys"][:, :offset], index_keys], dim=1)
            state["index_keys"] = index_keys
        train_indexer = self.training and torch.is_grad_enabled() and self.kl_weight > 0
        every_key = self.top_k >= min(window + 1, offset + T)  # no query sees more than k keys: dense is exact
        dense = every_key or (self.training and torch.is_grad_enabled() and self.stage == "dense")
        if not dense or train_indexer:
            scores = self.indexer(x, index_keys, cos, sin)  # (B, T, Tk)
            visible = visible_keys(T, k.size(2), offset, window, x.device)
            keys = visible.expand_as(scores) if dense else top_k_keys(scores, visible, self.top_k, offset)
        if dense:
            y = attention(q, k, v, window, q_offset=offset)
        else:  # the reference path: the selection as a mask over every key (see the module docstring)
            y = sdpa(q, k, v, attn_mask=keys.unsqueeze(1), enable_gqa=q.size(1) != k.size(1))
        if train_indexer:
            kl = indexer_kl(q.detach(), k.detach(), scores, keys)
            self.last_kl = kl.detach()
            y = _AttachLoss.apply(y, kl, self.kl_weight)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


# -----------------------------------------------------------------------------
# What the training scripts call

def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseSelfAttention)]


def set_stage(model, stage):
    """'dense' (the warm-up: dense attention, the indexer learns the full attention) or 'sparse', in every D layer."""
    assert stage in ("dense", "sparse"), stage
    for layer in sparse_layers(model):
        layer.stage = stage


def last_indexer_kl(model):
    """The indexer's KL at the last training forward, averaged over the D layers (None before one, or without D layers)."""
    kls = [layer.last_kl for layer in sparse_layers(model) if layer.last_kl is not None]
    return torch.stack(kls).mean().item() if kls else None
