"""
Mamba-2 (SSD, arXiv 2405.21060) as a sequence mixer beside attention, in plain PyTorch: it trains, prefills and
decodes on any device. A block with mixer "M" (config.mixer_pattern) runs

    in_proj -> z, xBC, dt  |  causal depthwise conv over xBC, SiLU  |  x, B, C = xBC
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t   (per head: x (P), B and C (N), A < 0)
    norm(y * silu(z))  |  out_proj

Training and prefill use the chunked scan (quadratic inside chunks of mamba_chunk tokens, a recurrence across
them), which also returns the final state; decoding steps the recurrence one token at a time. The decode state of a
layer is its last 3 conv inputs and h (fp32): constant size, however long the context.

Options from Mamba-3 (arXiv 2603.15569), each exact in both forms:
- mamba3_bc_norm: RMSNorm on B and C plus a learned bias (the SSM's QK-norm);
- mamba3_rope: B and C rotated by data-dependent angles, theta_t = sum of dt over time times RoPE frequencies, so
  C_t . B_s sees the rotation accumulated between s and t (a complex-valued state in real form);
- mamba3_trapezoidal: h_t = a_t h_{t-1} + (1 - l_t) dt_t a_t x_{t-1} B_{t-1}^T + l_t dt_t x_t B_t^T with a learned
  l_t = sigmoid(.): the trapezoid rule instead of Euler's, computed in parallel as two scans that share the decay.
On CUDA, mamba_ssm's Triton scan is used when it imports (kernels="auto"); it is never needed and never imported
on a CPU.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

D_CONV = 4  # the causal conv's width, as in Mamba-2


def sizes(config):
    """(inner width, heads, conv channels) of a Mamba layer; a size that does not fit is one ValueError line."""
    d_inner = config.mamba_expand * config.n_embd
    if config.mamba_expand < 1 or config.mamba_d_state < 1 or config.mamba_chunk < 1 or config.mamba_headdim < 1:
        raise ValueError("Mamba sizes (--mamba-expand, --mamba-d-state, --mamba-headdim, --mamba-chunk) must be at least 1")
    if d_inner % config.mamba_headdim:
        raise ValueError(f"--mamba-headdim={config.mamba_headdim} must divide the Mamba width "
                         f"(--mamba-expand={config.mamba_expand} x {config.n_embd} = {d_inner})")
    if config.mamba3_rope and config.mamba_d_state % 2:
        raise ValueError(f"--mamba3-rope turns pairs of state dimensions: --mamba-d-state={config.mamba_d_state} must be even")
    return d_inner, d_inner // config.mamba_headdim, d_inner + 2 * config.mamba_d_state


def scan_flops(config):
    """Forward FLOPs per token of one layer outside its two projections (conv, the chunked scan's products)."""
    d_inner, heads, conv_dim = sizes(config)
    n, l = config.mamba_d_state, config.mamba_chunk
    scan = 2 * l * n + 2 * l * d_inner + 4 * d_inner * n  # C.B inside the chunk, mixing x, states in and out
    return 2 * conv_dim * D_CONV + scan * (2 if config.mamba3_trapezoidal else 1)


# -----------------------------------------------------------------------------
# The scan

def segsum(a):
    """a (..., T) -> (..., T, T): S[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal (exp -> 0)."""
    T = a.size(-1)
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    s = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~below, 0).cumsum(dim=-2)
    return s.masked_fill(~(below | torch.eye(T, dtype=torch.bool, device=a.device)), -math.inf)


def ssd_scan(x, dt, A, B, C, chunk, initial_state=None):
    """
    The chunked SSD scan, in fp32. x (b, L, H, P), dt (b, L, H) > 0, A (H) < 0, B and C (b, L, N); initial_state
    (b, H, P, N) or None. Returns y (b, L, H, P) and the state after the last token, as the recurrence would.
    """
    b, L, H, P = x.shape
    N = B.size(-1)
    X = (x * dt.unsqueeze(-1)).float()
    Ad = (dt * A).float()  # log-decay per step
    B, C = B.float(), C.float()
    pad = -L % chunk  # padded steps decay by exp(0) = 1 and add nothing: the final state is unchanged
    if pad:
        X, Ad, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (X, Ad, B, C))
    c = X.size(1) // chunk
    X, B, C = X.view(b, c, chunk, H, P), B.view(b, c, chunk, N), C.view(b, c, chunk, N)
    Ad = Ad.view(b, c, chunk, H).permute(0, 3, 1, 2)  # (b, H, c, l)
    A_cum = Ad.cumsum(dim=-1)
    # 1) inside each chunk: causal "attention" C_i . B_j, decayed from j to i
    weights = torch.einsum("bcln,bcsn->bcls", C, B).unsqueeze(1) * torch.exp(segsum(Ad))  # (b, H, c, l, s)
    y = torch.einsum("bhcls,bcshp->bclhp", weights, X)
    # 2) each chunk's own contribution to the state at its end
    to_end = torch.exp(A_cum[..., -1:] - A_cum).permute(0, 2, 3, 1).unsqueeze(-1)  # (b, c, l, H, 1)
    states = torch.einsum("bcln,bclhp->bchpn", B, X * to_end)
    # 3) across chunks: the state entering each chunk, and the final one
    if initial_state is None:
        initial_state = X.new_zeros(b, H, P, N)
    states = torch.cat([initial_state.float().unsqueeze(1), states], dim=1)  # (b, c+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    # 4) what the entering state contributes inside each chunk
    from_start = torch.exp(A_cum).permute(0, 2, 3, 1).unsqueeze(-1)  # (b, c, l, H, 1)
    y = y + torch.einsum("bcln,bchpn->bclhp", C, states[:, :-1]) * from_start
    return y.reshape(b, c * chunk, H, P)[:, :L], states[:, -1]


def ssd_step(h, x, dt, A, B, C):
    """One step of the recurrence: h (b, H, P, N) fp32, x (b, H, P), dt (b, H), B and C (b, N). Returns (y, h)."""
    h = h * torch.exp(dt * A)[..., None, None] + (x * dt.unsqueeze(-1)).float().unsqueeze(-1) * B.float()[:, None, None, :]
    return torch.einsum("bhpn,bn->bhp", h, C.float()), h


_kernel = None


def cuda_scan():
    """mamba_ssm's fused Triton scan, or None where it does not import (always None on a CPU: never imported there)."""
    global _kernel
    if _kernel is None:
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
            _kernel = torch.compiler.disable(mamba_chunk_scan_combined)  # a Triton op: dynamo cannot trace it
        except Exception:  # not installed, no triton, no CUDA build: the PyTorch scan does the same math
            _kernel = False
    return _kernel or None


def use_kernels(model, mode):
    """--mamba-kernels: 'auto' takes mamba_ssm's scan on CUDA when it imports, 'torch' never. Returns the scan used."""
    layers = [m for m in model.modules() if isinstance(m, Mamba2)]
    for layer in layers:
        layer.kernels = mode
    if not layers:
        return None
    on_cuda = layers[0].in_proj.weight.is_cuda
    return "mamba_ssm" if mode == "auto" and on_cuda and cuda_scan() else "torch"


# -----------------------------------------------------------------------------
# The mixer

def rotate(x, angles):
    """Rotate pairs (first half, second half) of x (..., N) by angles (..., N/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Mamba2(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        from nanochat.gpt import Linear
        self.layer_idx, self.config = layer_idx, config
        self.d_inner, self.n_heads, self.conv_dim = sizes(config)
        self.headdim, self.d_state, self.chunk = config.mamba_headdim, config.mamba_d_state, config.mamba_chunk
        self.trapezoidal, self.rope, self.bc_norm = config.mamba3_trapezoidal, config.mamba3_rope, config.mamba3_bc_norm
        # one projection to z (the gate), xBC (through the conv), dt per head, and the trapezoid's l per head
        self.in_proj = Linear(config.n_embd, self.d_inner + self.conv_dim + self.n_heads * (2 if self.trapezoidal else 1))
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, 1, D_CONV))  # depthwise, as nn.Conv1d keeps it
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        if self.bc_norm:
            self.B_bias = nn.Parameter(torch.empty(self.d_state))
            self.C_bias = nn.Parameter(torch.empty(self.d_state))
        if self.rope:  # RoPE frequencies over the state's pairs
            self.register_buffer("inv_freq", torch.empty(self.d_state // 2), persistent=False)
        self.out_proj = Linear(self.d_inner, config.n_embd)
        self.kernels = "auto"

    @torch.no_grad()
    def init_weights(self, n_embd):
        """Mamba-2's initialisation, here rather than in __init__ so that it survives building on the meta device."""
        s = 3 ** 0.5 * n_embd ** -0.5
        self.in_proj.weight.uniform_(-s, s)
        self.out_proj.weight.zero_()  # the block starts as the identity, like attention's c_proj
        bound = D_CONV ** -0.5  # PyTorch's own conv init: fan-in of a depthwise kernel is its width
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.uniform_(-bound, bound)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())  # decay rates A = -exp(A_log) in [-16, -1]
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt, log-uniform in [1e-3, 0.1]
        self.D.fill_(1.0)
        if self.bc_norm:
            self.B_bias.fill_(1.0)
            self.C_bias.fill_(1.0)
        if self.rope:
            self.inv_freq.copy_(1.0 / 10_000 ** (torch.arange(0, self.d_state, 2, dtype=torch.float32) / self.d_state))

    def empty_state(self, batch, device):
        state = {"conv": torch.zeros(batch, self.conv_dim, D_CONV - 1, device=device),
                 "ssm": torch.zeros(batch, self.n_heads, self.headdim, self.d_state, device=device)}
        if self.rope:
            state["angle"] = torch.zeros(batch, self.d_state // 2, device=device)
        if self.trapezoidal:
            state["prev_x"] = torch.zeros(batch, 1, self.n_heads, self.headdim, device=device)
            state["prev_B"] = torch.zeros(batch, 1, self.d_state, device=device)
        return state

    def scan(self, x, dt, A, B, C, initial_state):
        kernel = self.kernels == "auto" and x.is_cuda and cuda_scan()
        if kernel:
            y, final = kernel(x, dt, A, B.unsqueeze(2), C.unsqueeze(2), self.chunk, initial_states=initial_state,
                              return_final_states=True)
            return y, final.float()
        return ssd_scan(x, dt, A, B, C, self.chunk, initial_state)

    def forward(self, x, ve, cos, sin, window, cache):
        """x (b, T, C) -> (b, T, C). ve, cos, sin and window are attention's; cache holds this layer's state."""
        b, T, _ = x.shape
        state = None
        if cache is not None:
            state = cache.states.get(self.layer_idx) or self.empty_state(b, x.device)
        z, xBC, dt, trap = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads,
                                                  self.n_heads if self.trapezoidal else 0], dim=-1)
        # causal depthwise conv over time, continuing from the last inputs of the cache (zeros at the start)
        xBC = xBC.transpose(1, 2)
        history = state["conv"].to(xBC.dtype) if state else xBC.new_zeros(b, self.conv_dim, D_CONV - 1)
        xBC = torch.cat([history, xBC], dim=-1)
        new_conv = xBC[..., -(D_CONV - 1):].float()
        xBC = F.silu(F.conv1d(xBC, self.conv_weight.to(xBC.dtype), self.conv_bias.to(xBC.dtype),
                              groups=self.conv_dim)).transpose(1, 2)
        xs, B, C = xBC.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        xs = xs.reshape(b, T, self.n_heads, self.headdim)
        dt = F.softplus(dt.float() + self.dt_bias)  # (b, T, H), fp32
        A = -torch.exp(self.A_log.float())
        if self.bc_norm:
            B = F.rms_norm(B.float(), (self.d_state,)) + self.B_bias
            C = F.rms_norm(C.float(), (self.d_state,)) + self.C_bias
        new_state = {"conv": new_conv}
        if self.rope:  # the angle advances by the step's mean dt: a data-dependent clock
            start = state["angle"] if state else dt.new_zeros(b, self.d_state // 2)
            angles = start.unsqueeze(1) + dt.mean(dim=-1).cumsum(dim=1).unsqueeze(-1) * self.inv_freq  # (b, T, N/2)
            B, C = rotate(B.float(), angles), rotate(C.float(), angles)
            new_state["angle"] = angles[:, -1] % (2 * math.pi)
        h0 = state["ssm"] if state else None
        if self.trapezoidal:
            lam = torch.sigmoid(trap.float())  # (b, T, H)
            prev_x = torch.cat([state["prev_x"].to(xs.dtype) if state else xs.new_zeros(b, 1, self.n_heads, self.headdim),
                                xs[:, :-1]], dim=1)
            prev_B = torch.cat([state["prev_B"] if state else B.new_zeros(b, 1, self.d_state), B[:, :-1].float()], dim=1)
            # h_t = a_t h_{t-1} + l_t dt_t x_t B_t + (1 - l_t) dt_t a_t x_{t-1} B_{t-1}: both terms decay alike,
            # so they are two scans over the same dt whose states (and outputs) add up
            y1, h1 = self.step_or_scan(xs * lam.unsqueeze(-1), dt, A, B, C, h0)
            y2, h2 = self.step_or_scan(prev_x * ((1 - lam) * torch.exp(dt * A)).unsqueeze(-1), dt, A, prev_B, C,
                                       None if h0 is None else torch.zeros_like(h0))
            y, h = y1 + y2, h1 + h2
            new_state["prev_x"], new_state["prev_B"] = xs[:, -1:].float(), B[:, -1:].float()
        else:
            y, h = self.step_or_scan(xs, dt, A, B, C, h0)
        new_state["ssm"] = h
        if cache is not None:
            cache.states[self.layer_idx] = new_state
        y = y.to(x.dtype) + self.D.to(x.dtype)[:, None] * xs
        y = y.reshape(b, T, self.d_inner)
        return self.out_proj(F.rms_norm(y * F.silu(z), (self.d_inner,)))

    def step_or_scan(self, x, dt, A, B, C, h0):
        """One token over a cached state: the recurrence; otherwise the chunked scan."""
        if x.size(1) == 1 and h0 is not None:
            y, h = ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
            return y.unsqueeze(1), h
        return self.scan(x, dt, A, B, C, h0)
