"""
The GPT model. Notable choices (the reasons, measured at d12-d24, are in the reference's experiment log):
- parameter-free RMSNorm after the embedding, before every sub-block and before the head; no biases, no dropout
- rotary embeddings (base 100k by default, rotate-half), then QK-norm, then q and k sharpened by 1.2
- ReLU² MLP at 4x width; grouped-query attention (n_kv_head); untied embedding and head
- gated value embeddings (ResFormer) on alternating attention layers, always including the last
- per-layer residual and x0 scalars (modded-nanogpt), smear (the previous token's embedding mixed in), backout
- sliding-window attention by pattern ("SSSL": 3 short, 1 long; the last attention layer is always long)
- the sequence mixer by pattern: attention (A), Mamba-2 (M, nanochat/mamba.py) or DeepSeek sparse attention (D,
  nanochat/sparse_attention.py), e.g. "AAM"; every block keeps its MLP
- logits soft-capped at 15, in fp32
- off by default, each in its own file: Engram n-gram memory before the mixer at chosen layers (nanochat/engram.py),
  mHC's n residual streams around every sub-layer (nanochat/mhc.py), multi-token prediction modules that add to the
  training loss and draft tokens for self-speculative decoding (nanochat/mtp.py)
- hf_compatible: only what transformers' NanoChat model has (scripts/export_hf.py): no value embeddings, no 1.2
  sharpening, and the residual/x0 scalars, smear and backout frozen where they do nothing
Weights are fp32 masters; compute runs in the dtype passed in (bf16 where the hardware has it), by casting
inside our Linear rather than through autocast. A model loaded for inference keeps its matmul weights in the compute
dtype instead (cast_for_inference).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from nanochat.engine import recent, rotary
from nanochat.engram import Engram, engram_layers
from nanochat.mamba import Mamba2, scan_flops
from nanochat.mhc import HyperConnection, collapse, expand
from nanochat.mtp import MTP


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over attention layers; S = a quarter of the context, L = all of it
    mixer_pattern: str = "A"  # tiled over layers: which sequence mixer each block uses (A = attention, M = Mamba-2,
    # D = DeepSeek sparse attention)
    # Mamba layers (nanochat/mamba.py): state size N, head size P, inner width = expand x n_embd, scan chunk length
    mamba_d_state: int = 64
    mamba_headdim: int = 64
    mamba_expand: int = 2
    mamba_chunk: int = 64
    mamba3_trapezoidal: bool = False
    mamba3_rope: bool = False
    mamba3_bc_norm: bool = False
    hf_compatible: bool = False  # see the module docstring; base_train --hf-compatible also makes every window L
    # long context: tokens an L and an S window cover (0: the whole context, and a quarter of it rounded up to 128),
    # and the rotary embeddings' base (larger bases turn more slowly, for positions far apart)
    window_long: int = 0
    window_short: int = 0
    rotary_base: float = 100_000.0
    # sparse attention (D layers, nanochat/sparse_attention.py): keys per query, and the lightning indexer's heads and
    # head size (the paper's 2048 keys; 4 x 32 indexer dims here, small next to a layer's q and k)
    dsa_top_k: int = 2048
    dsa_indexer_heads: int = 4
    dsa_indexer_dim: int = 32
    # Engram (nanochat/engram.py): layers with the memory ("0,3"; "" = none), hash heads per n-gram order, memory
    # width (0: n_embd / 2) and rows per table (0: 2 x vocab_size, each rounded up to its own prime)
    engram_layers: str = ""
    engram_heads: int = 4
    engram_dim: int = 0
    engram_rows: int = 0
    mhc_streams: int = 0  # mHC (nanochat/mhc.py): residual streams; 0 = off, 1 = the same as off (its identity case)
    # multi-token prediction (nanochat/mtp.py): extra modules, each predicting one token further, and their loss weight
    mtp_depth: int = 0
    mtp_lambda: float = 0.3


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no learnable gain


def softcap(logits):
    """
    15 tanh(logits / 15), written as a sigmoid: the same values, and a CPU computes them faster (over a 4096
    vocabulary, the softcap and cross-entropy's forward and backward took 57 ms instead of 80 ms, d4 on 2 cores).
    """
    return 30 * torch.sigmoid(logits * (2 / 15)) - 15


class _SoftcapCrossEntropy(torch.autograd.Function):
    """
    Each row's cross-entropy of its soft-capped logits, (N, V) raw logits in the compute dtype and (N,) targets -> (N,)
    fp32 losses (0 where the target is -1). What compiled training runs: each direction is one pass over the raw
    logits, with the soft-capped ones computed in registers and never stored. Autograd through the plain formula
    stores them in fp32 (twice the raw logits' bytes in bf16) and reads them back. The soft cap keeps every logit
    within 15 of 0, so the exponentials' sum needs no running maximum. At d4 on 2 Xeon cores (4096 rows of 4096
    logits) the two passes take 13 and 19 ms, against 28 and 23 for inductor's code from the plain formula.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.exp(softcap(logits.float())).sum(-1).log()
        target_logit = softcap(logits.gather(-1, targets.clamp(min=0)[:, None]).float())[:, 0]
        ctx.save_for_backward(logits, targets, lse)
        return torch.where(targets >= 0, lse - target_logit, 0)

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        s = torch.sigmoid(logits.float() * (2 / 15))
        probs = torch.exp(30 * s - 15 - lse[:, None])
        # int32 positions: comparing them takes half the vector registers int64 would
        is_target = torch.arange(logits.size(-1), dtype=torch.int32, device=logits.device) == targets.int()[:, None]
        grad = torch.where(targets >= 0, grad, 0)[:, None]
        slope = 4 * s * (1 - s)  # the soft cap's derivative
        return (grad * (probs - is_target.float()) * slope).to(logits.dtype), None


def mean_loss(losses, targets):
    """The mean over supervised targets; a batch without any (all masked, in finetuning) gives 0, not NaN."""
    return losses.sum() / (targets >= 0).sum().clamp(min=1)


def _to_fp8(t, dtype):
    """Per-tensor scaling into an fp8 format's range; returns the fp8 tensor and the scale that undoes it."""
    fp8_max = torch.finfo(dtype).max
    scale = fp8_max / t.detach().abs().max().float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype), scale.reciprocal()


class _Float8Matmul(torch.autograd.Function):
    """x @ w.T with both operands in fp8 (e4m3), and the gradient in e5m2 (more range) for the backward matmuls."""

    @staticmethod
    def forward(ctx, x, w):
        x8, x_inv = _to_fp8(x, torch.float8_e4m3fn)
        w8, w_inv = _to_fp8(w, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.w_dtype = w.dtype
        # _scaled_mm wants its second operand column-major: w8.t() of a row-major w8 is
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = _to_fp8(grad, torch.float8_e5m2)
        column_major = lambda t: t.t().contiguous().t()
        grad_x = torch._scaled_mm(g8, column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=grad.dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), column_major(x8), scale_a=g_inv, scale_b=x_inv, out_dtype=ctx.w_dtype)
        return grad_x, grad_w


class Linear(nn.Linear):
    """
    A bias-free Linear whose fp32 master weight is cast to the input's dtype: our replacement for autocast.
    With fp8 = True (see enable_fp8) its training matmuls run in fp8 on tensor cores; evaluation stays in bf16.
    """

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = False

    def forward(self, x):
        if self.fp8 and self.training and torch.is_grad_enabled():
            return _Float8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype))


def enable_fp8(model):
    """
    Train the big matmuls in fp8 (tensorwise scaling): on d26 the reference measured 630K -> 740K tok/s on 8xH100
    (1.17x) with ~9 GB less memory. Only layers whose sizes are multiples of 16 and at least 128 qualify (fp8 kernels
    need the alignment; small layers gain nothing). Returns how many layers were switched.
    """
    eligible = [m for m in model.modules() if isinstance(m, Linear) and m.in_features % 16 == 0
                and m.out_features % 16 == 0 and min(m.in_features, m.out_features) >= 128]
    for m in eligible:
        m.fp8 = True
    return len(eligible)


def apply_rotary_emb(x, cos, sin):
    """Rotate-half RoPE on (B, T, H, D); rotates by -theta, the transpose of the textbook form, to the same effect."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


ATTENTION = "AD"  # the mixers that are attention, dense or sparse: they get windows, value embeddings, k/v cache slots


def has_ve(config, layer_idx):
    """Value embeddings on alternating attention layers, always including the last of them."""
    if config.hf_compatible:
        return False
    attention = [i for i, kind in enumerate(mixer_kinds(config)) if kind in ATTENTION]
    return layer_idx in attention and attention.index(layer_idx) % 2 == (len(attention) - 1) % 2


def window_sizes(config):
    """
    Per layer, how many past tokens a query may attend to: L = the whole context, S = a quarter, rounded up to 128
    (or config.window_long and window_short tokens). The pattern tiles over the attention layers; the last of them
    always gets L; other mixers get None.
    """
    long_window = config.window_long or config.sequence_len
    short_window = config.window_short or -(-config.sequence_len // 4 // 128) * 128
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window pattern {config.window_pattern!r} must be a string of S and L")
    attention = [i for i, kind in enumerate(mixer_kinds(config)) if kind in ATTENTION]
    sizes = [None] * config.n_layer
    for j, i in enumerate(attention):
        sizes[i] = long_window if pattern[j % len(pattern)] == "L" or j == len(attention) - 1 else short_window
    return sizes


def mixer_kinds(config):
    pattern = config.mixer_pattern.upper()
    if not pattern or set(pattern) - set(MIXERS):
        raise ValueError(f"mixer pattern {config.mixer_pattern!r} must be a string of {''.join(MIXERS)}")
    return [pattern[i % len(pattern)] for i in range(config.n_layer)]


# -----------------------------------------------------------------------------
# Attention

# (T, window, device) -> FlexAttention BlockMask, built eagerly by GPT.prepare_flex_attention before torch.compile
_block_masks = {}


def build_block_mask(T, window, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_window_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
    _block_masks[(T, window, device)] = create_block_mask(sliding_window_causal, B=None, H=None, Q_LEN=T, KV_LEN=T,
                                                          device=device)


def sdpa(q, k, v, **kwargs):
    """
    F.scaled_dot_product_attention, with cuDNN's kernels kept for compiled steps with gradients on (training) on a GPU.
    On Hopper torch tries cuDNN first. For training's fixed shapes it is the fastest (d20 rows on an H200, forward and
    backward: 2.8 ms, flash 4.9 ms), but it builds a plan for every new shape, and inference's shapes change with
    each prompt (naive decoding at d4 on the H200, a new length every token, ran at 4.6 tokens/s). Elsewhere,
    compiled evaluation included, SDPA gets flash, memory-efficient or math. The backend flags are process-wide:
    threads decoding at once may briefly see each other's setting, which costs speed, never correctness.
    """
    if q.is_cuda and not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attention(q, k, v, window, q_offset=0):
    """
    Causal attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D), where query i sits at position q_offset + i
    and key j at position j; each query sees keys no further back than `window`.
    """
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if q_offset == 0 and Tq == Tk:
        if window >= Tq:  # plain causal: SDPA's fused kernels
            return sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        # Compiled, with a prepared block mask: FlexAttention skips the blocks outside the window (what makes short
        # windows cheap on a GPU). Eager FlexAttention is slow, and on CPU it has no backward: explicit mask there.
        block_mask = _block_masks.get((Tq, window, q.device)) if torch.compiler.is_compiling() else None
        if block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if Tq == 1:  # decoding one token: the keys it may see are one contiguous slice, so no mask at all
        start = max(0, q_offset - window)
        return sdpa(q, k[:, :, start:q_offset + 1], v[:, :, start:q_offset + 1], enable_gqa=gqa)
    # An explicit mask for windows and for prefill over the KV cache. (SDPA's is_causal aligns the triangle top-left,
    # which is wrong when there are fewer queries than keys.)
    q_pos = torch.arange(q_offset, q_offset + Tq, device=q.device).unsqueeze(1)
    k_pos = torch.arange(Tk, device=q.device).unsqueeze(0)
    mask = (k_pos <= q_pos) & (q_pos - k_pos <= window)
    return sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = Linear(12, self.n_kv_head) if has_ve(config, layer_idx) else None
        self.qk_gain = 1.0 if config.hf_compatible else 1.2
        self.register_buffer("qkv_weight", None, persistent=False)  # join_qkv's (q | k | v) matrix, for inference

    @torch.no_grad()
    def init_weights(self, n_embd):
        s = 3 ** 0.5 * n_embd ** -0.5  # uniform in (-s, s) has std 1/sqrt(n_embd)
        for w in (self.c_q.weight, self.c_k.weight, self.c_v.weight):
            w.uniform_(-s, s)
        self.c_proj.weight.zero_()  # each block starts as the identity
        if self.ve_gate is not None:
            self.ve_gate.weight.uniform_(0, 0.02)

    def qkv(self, x, ve, cos, sin):
        """(B, T, C) -> q (B, H, T, D), k and v (B, H_kv, T, D): projected, value-embedded, rotated and normed."""
        B, T, _ = x.shape
        if self.qkv_weight is None:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        else:
            q, k, v = F.linear(x, self.qkv_weight.to(x.dtype)).split([w.size(0) for w in self.qkv_weights()], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: mix in a per-token value embedding through a per-head gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :12]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * self.qk_gain, norm(k) * self.qk_gain  # QK-norm, then sharper attention than 1/sqrt(d) alone
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def qkv_weights(self):
        return self.c_q.weight, self.c_k.weight, self.c_v.weight

    def join_qkv(self):
        """
        For a model nothing will train (GPT.cast_for_inference): c_q, c_k and c_v's weights become views of one
        (q | k | v) matrix, and qkv multiplies by it in one call, with the same results. A decoding step on a CPU pays
        per matmul call (~20 us for a bf16 one of a row through oneDNN, whatever its size): d4 decoded 1.18-1.25x
        faster at batch 1 in bf16, 1.12-1.14x in fp32. Training keeps three matrices, which Muon orthogonalises one by
        one.
        """
        joined = torch.cat(self.qkv_weights()).detach()
        for w, piece in zip(self.qkv_weights(), joined.split([w.size(0) for w in self.qkv_weights()])):
            w.data = piece
        self.qkv_weight = joined

    def forward(self, x, ve, cos, sin, window, kv_cache):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, ve, cos, sin)
        y = attention(q, k, v, window) if kv_cache is None else kv_cache.attend(self.layer_idx, q, k, v, window)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    @torch.no_grad()
    def init_weights(self, n_embd):
        s = 3 ** 0.5 * n_embd ** -0.5
        self.c_fc.weight.uniform_(-0.4 * s, 0.4 * s)
        self.c_proj.weight.zero_()

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


def sparse_attention(config, layer_idx):
    from nanochat.sparse_attention import SparseSelfAttention  # a CausalSelfAttention subclass: imported once it exists
    return SparseSelfAttention(config, layer_idx)


MIXERS = {"A": CausalSelfAttention, "M": Mamba2, "D": sparse_attention}


class Block(nn.Module):
    def __init__(self, config, layer_idx, kind):
        super().__init__()
        self.engram = Engram(config, layer_idx) if layer_idx in engram_layers(config) else None
        self.mixer = MIXERS[kind](config, layer_idx)
        self.mlp = MLP(config)
        branches = (["engram"] if self.engram is not None else []) + ["mixer", "mlp"]
        self.hc = nn.ModuleDict({name: HyperConnection(config, 3 * layer_idx + j) for j, name in enumerate(branches)}
                                ) if config.mhc_streams else None

    @torch.no_grad()
    def init_weights(self, n_embd):
        for part in (self.engram, self.mixer, self.mlp, *(self.hc or {}).values()):
            if part is not None:
                part.init_weights(n_embd)

    def forward(self, x, idx, ve, cos, sin, window, kv_cache):
        if self.engram is not None:  # n-gram memory, before the mixer
            x = self.residual("engram", x, lambda h: self.engram(h, idx, kv_cache))
        x = self.residual("mixer", x, lambda h: self.mixer(norm(h), ve, cos, sin, window, kv_cache))
        return self.residual("mlp", x, lambda h: self.mlp(norm(h)))

    def residual(self, name, x, branch):
        """x + branch(x); with mHC, the streams x (B, T, n, C) mixed around the branch by its hyper-connection."""
        return x + branch(x) if self.hc is None else self.hc[name](x, branch)


# -----------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, config, compute_dtype=torch.float32, pad_vocab_size_to=64):
        """
        Build on the meta device, then to_empty(device) and init_weights(): values set here are placeholders.
        The vocabulary is padded to a multiple of 64 for the embedding and head; logits are cropped back.
        """
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.windows = window_sizes(config)
        padded_vocab = -(-config.vocab_size // pad_vocab_size_to) * pad_vocab_size_to
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(padded_vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i, kind) for i, kind in enumerate(mixer_kinds(config))]),
        })
        self.lm_head = Linear(config.n_embd, padded_vocab)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(padded_vocab, kv_dim)
                                           for i in range(config.n_layer) if has_ve(config, i)})
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(24, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.mtp = MTP(config, padded_vocab) if config.mtp_depth else None
        self.mtp_weight = config.mtp_lambda  # the training scripts' schedule changes it
        self.mtp_loss = None  # the modules' last training loss, unweighted (None until one is computed)
        # rotary tables for 10x the training context, so generation can run past it
        cos, sin = self._rotary_tables(10 * config.sequence_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.activation_checkpointing = False  # the training scripts' --activation-checkpointing (see forward)
        if config.hf_compatible:  # frozen (init_weights sets them to 1, 0, 0, 0): each term is then exactly a no-op
            for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda, self.backout_lambda):
                p.requires_grad_(False)

    def _rotary_tables(self, seq_len, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / self.config.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        cos, sin = freqs.cos().to(self.compute_dtype), freqs.sin().to(self.compute_dtype)
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self):
        n_layer, n_embd = self.config.n_layer, self.config.n_embd
        self.transformer.wte.weight.normal_(0, 0.8)
        self.lm_head.weight.normal_(0, 0.001)
        for block in self.transformer.h:
            block.init_weights(n_embd)
        if self.mtp is not None:
            self.mtp.init_weights(n_embd)
        s = 3 ** 0.5 * n_embd ** -0.5
        for ve in self.value_embeds.values():
            ve.weight.uniform_(-s, s)
        depth_frac = torch.arange(n_layer, dtype=torch.float32) / max(n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        self.smear_gate.weight.uniform_(0, 0.02)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        if self.config.hf_compatible:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.zero_()
            self.backout_lambda.zero_()
        self.cos, self.sin = self._rotary_tables(10 * self.config.sequence_len, device=self.cos.device)
        self.cast_embeddings()

    def cast_embeddings(self):
        """Embeddings are stored in the compute dtype to save memory (not fp16: GradScaler cannot unscale fp16 grads)."""
        dtype = torch.float32 if self.compute_dtype == torch.float16 else self.compute_dtype
        self.transformer.wte.to(dtype)
        self.value_embeds.to(dtype)

    def cast_for_inference(self):
        """For a model nothing will train: its matmul weights in the compute dtype rather than fp32 masters rounded to it on
        every call, and each attention layer's q, k and v weights joined into one matrix (join_qkv). The outputs are the
        same; each decoding step reads half the bytes (in bf16) in fewer calls. Modules that compute in fp32 whatever
        the compute dtype say so (fp32_weights) and keep theirs."""
        keep = {m for part in self.modules() if getattr(part, "fp32_weights", False) for m in part.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in keep:
                m.to(self.compute_dtype)
        for m in self.modules():
            if isinstance(m, CausalSelfAttention) and m not in keep:
                m.join_qkv()  # one matmul for q, k and v

    def get_device(self):
        return self.transformer.wte.weight.device

    def prepare_flex_attention(self, T=None):
        """Build the block masks for training on T-token rows (default: the context); call before torch.compile."""
        T = T or self.config.sequence_len
        for window in set(self.windows) - {None}:
            if window < T:
                build_block_mask(T, window, self.get_device())

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        h = self.hidden(idx, kv_cache)
        if targets is None:
            return self.head(h)
        losses = self.token_losses(h, targets)
        if loss_reduction == "none":
            return losses
        loss = mean_loss(losses, targets)
        if self.mtp is not None and self.mtp_weight:  # training: the modules' loss joins the main one, weighted
            self.mtp_loss = self.mtp.loss(self, h, idx, targets)
            loss = loss + self.mtp_weight * self.mtp_loss
        return loss

    def hidden(self, idx, kv_cache=None):
        """(B, T) token ids -> the final hidden states (B, T, C), normalised: what the head (and MTP) read."""
        B, T = idx.shape
        cos, sin = rotary(kv_cache, self.cos, self.sin, T)

        x = self.smear(norm(self.transformer.wte(idx).to(self.compute_dtype)), kv_cache)
        if self.config.mhc_streams:
            x = expand(x, self.config.mhc_streams)  # (B, T, n, C): n residual streams

        x0, x_backout = x, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            if self.activation_checkpointing and torch.is_grad_enabled():
                # keep only the block's input: its insides are recomputed in the backward pass (memory for compute)
                x = checkpoint(block, x, idx, ve, cos, sin, self.windows[i], kv_cache, use_reentrant=False)
            else:
                x = block(x, idx, ve, cos, sin, self.windows[i], kv_cache)
            if i == self.config.n_layer // 2:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)
        x = x - self.backout_lambda.to(x.dtype) * x_backout
        return norm(collapse(x) if self.config.mhc_streams else x)

    def smear(self, x, kv_cache):
        """
        Mix each token's embedding with the previous token's, through a learned, input-dependent gate. A whole
        sequence (training, evaluation) takes the reference's form, the first position left as it is; decoding takes
        the previous embedding from the cache. The values are the same, but compiled in bf16 the two forms round
        differently, and the reference's trained better (README, "On an Intel Xeon with AMX").
        """
        if kv_cache is None:
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        prev = torch.cat([recent(kv_cache, "embedding", x, keep=1), x[:, :-1]], dim=1)  # before the first token: 0
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :24]))
        return x + gate * prev

    def head(self, h):
        """Hidden states -> fp32 logits over the vocabulary (the padding cropped), soft-capped at 15."""
        return softcap(self.lm_head(h)[..., :self.config.vocab_size].float())

    def token_losses(self, h, targets):
        """Hidden states (B, T, C) and the tokens that follow (B, T) -> each position's cross-entropy (B * T,), fp32;
        0 where the target is -1 (masked). Compiled, through _SoftcapCrossEntropy: eager, its passes would be slower."""
        if torch.compiler.is_compiling():
            logits = self.lm_head(h)[..., :self.config.vocab_size]
            return _SoftcapCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        logits = self.head(h)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none")

    # -------------------------------------------------------------------------
    # Sizes and costs

    def num_scaling_params(self):
        """Parameter counts by kind; transformer matrices + lm_head are what the scaling laws count (Engram's tables,
        looked up rather than multiplied, and the MTP modules, dropped at inference, are counted apart)."""
        tables = sum(m.weight.numel() for m in self.transformer.h.modules() if isinstance(m, nn.Embedding))
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()) - tables,
            "scalars": sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_lambda,
                                                self.backout_lambda, self.smear_gate.weight)),
            **({"engram_tables": tables} if tables else {}),
            **({"mtp": sum(p.numel() for p in self.mtp.parameters())} if self.mtp is not None else {}),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is missing from the counts"
        return counts

    def num_matmul_params(self):
        """Weights of every matmul (our Linear and anything derived from nn.Linear, e.g. an FP8 Linear)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def num_params_by_mixer(self):
        """Block parameters by kind: attention, Mamba and MLP."""
        counts = {}
        for block in self.transformer.h:
            kind = "attention" if isinstance(block.mixer, CausalSelfAttention) else "mamba"
            counts[kind] = counts.get(kind, 0) + sum(p.numel() for p in block.mixer.parameters())
            counts["mlp"] = counts.get("mlp", 0) + sum(p.numel() for p in block.mlp.parameters())
        return counts

    def estimate_flops(self):
        """
        Training FLOPs per token (forward + backward, 3x the forward): 6 per matmul weight, plus attention within
        each window (a sparse layer's top-k keys, and its indexer's scoring), plus each Mamba layer's conv and scan.
        """
        T, hd = self.config.sequence_len, self.config.n_embd  # n_head * head_dim
        kinds = mixer_kinds(self.config)
        attention = sum(12 * hd * min(w, T) for w, kind in zip(self.windows, kinds) if kind == "A")
        top_k, indexer = self.config.dsa_top_k, self.config.dsa_indexer_heads * self.config.dsa_indexer_dim
        attention += sum(12 * hd * min(w, T, top_k) + 6 * indexer * min(w, T) for w, kind in zip(self.windows, kinds)
                         if kind == "D")
        mamba = 3 * scan_flops(self.config) * sum(w is None for w in self.windows)
        extras = sum(m.flops_per_token() for m in self.modules() if hasattr(m, "flops_per_token"))  # Engram, mHC, MTP
        return 6 * self.num_matmul_params() + attention + mamba + extras

    # -------------------------------------------------------------------------

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """
        AdamW for embeddings, head and scalars (their lrs scaled by (d/768)^-0.5); Muon for every Linear's weight in
        the blocks (and the MTP modules). Engram's tables are embeddings: AdamW as the value embeddings. The rest of
        the blocks is no matrix to orthogonalise (Mamba's conv kernels, A_log, dt bias, D and B/C biases; Engram's
        conv; mHC's coefficients): AdamW, at 0.02 x scalar_lr, no decay.
        """
        from nanochat.optimizers import MuonAdamW
        dscale = (self.config.n_embd / 768) ** -0.5
        adam = dict(kind="adamw", eps=1e-10)
        groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * dscale, betas=(0.8, 0.96), weight_decay=0.01, **adam),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * dscale, betas=(0.8, 0.995), weight_decay=0.001, **adam),
            dict(params=list(self.value_embeds.parameters()), lr=0.5 * embedding_lr * dscale, betas=(0.8, 0.995), weight_decay=0.01, **adam),
            dict(params=[self.resid_lambdas], lr=0.01 * scalar_lr, betas=(0.8, 0.95), weight_decay=0.05, **adam),
            dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0, **adam),
            dict(params=[self.smear_gate.weight, self.smear_lambda, self.backout_lambda], lr=0.2, betas=(0.8, 0.95), weight_decay=0.0, **adam),
        ]
        blocks = [self.transformer.h] + ([self.mtp] if self.mtp is not None else [])
        params = [p for b in blocks for p in b.parameters()]
        matrices = {id(m.weight) for b in blocks for m in b.modules() if isinstance(m, nn.Linear)}
        tables = {id(m.weight) for m in self.transformer.h.modules() if isinstance(m, nn.Embedding)}
        if tables:
            groups.append(dict(params=[p for p in params if id(p) in tables], lr=0.5 * embedding_lr * dscale,
                               betas=(0.8, 0.995), weight_decay=0.01, **adam))
        others = [p for p in params if id(p) not in matrices | tables]
        if others:
            groups.append(dict(params=others, lr=0.02 * scalar_lr, betas=(0.9, 0.95), weight_decay=0.0, **adam))
        by_shape = {}
        for p in params:
            if id(p) in matrices:
                by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape in sorted(by_shape):
            groups.append(dict(kind="muon", params=by_shape[shape], lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.9,
                               weight_decay=weight_decay))
        for g in groups:
            g["initial_lr"] = g["lr"]  # schedules multiply this
        return MuonAdamW(groups, ortho_dtype=torch.bfloat16 if self.compute_dtype == torch.bfloat16 else torch.float32)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 sampling without a KV cache: a reference for the Engine, and for quick samples. It samples
        as the Engine does (top_k 0 or None = the whole vocabulary), so the same seed gives the same tokens."""
        from nanochat.engine import sample_next_token  # one sampler for both
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids[:, -self.config.sequence_len:])[:, -1, :]
            next_id = sample_next_token(logits, rng, temperature, top_k)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()


def build_model_config(depth, vocab_size, aspect_ratio=64, head_dim=128, max_seq_len=2048, window_pattern="SSSL",
                       mixer_pattern="A", hf_compatible=False, **mamba):
    """
    The depth dial: width = depth * aspect_ratio rounded up to a whole number of heads of head_dim. mamba: other
    GPTConfig fields (mamba_d_state=..., mamba3_rope=..., rotary_base=...), where the defaults are not wanted.
    """
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                     n_embd=model_dim, window_pattern=window_pattern, mixer_pattern=mixer_pattern, hf_compatible=hf_compatible,
                     **mamba)
