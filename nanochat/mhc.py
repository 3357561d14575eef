"""
Manifold-constrained hyper-connections (mHC, DeepSeek, arXiv 2512.24880; after Hyper-Connections, arXiv 2409.19606).

The residual stream widens to n parallel streams, x of shape (B, T, n, C). Around each sub-layer F (the mixer, the
MLP, Engram) three small matrices, computed per token from that token's streams, decide how it reads and writes:
    x <- H_res x + H_post^T F(H_pre x)
H_res (n x n) is projected onto the doubly stochastic matrices (Sinkhorn-Knopp), which keeps the streams' mixing
norm-preserving: it was the unconstrained mixing of plain hyper-connections that made deep runs unstable.

Two deliberate differences from the paper, both so that n = 1 is exactly the plain residual x + F(x):
- H_pre is a softmax over the streams (the paper: a sigmoid each), so F reads a convex combination of them;
- H_post is n times a softmax (the paper: twice a sigmoid each), so F's output is spread with weights summing to n.
With the dynamic part at zero and H_pre uniform, the streams' mean then evolves exactly as the plain residual does,
for every n (a doubly stochastic H_res keeps the mean). The fork this replaces pooled the coefficients over the whole
sequence, so every position saw the future; here they come from each token's own streams only.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

SINKHORN_ITERS = 20


def sinkhorn(logits, iters=SINKHORN_ITERS):
    """(..., n, n) logits -> doubly stochastic matrices: exp, then rows and columns normalised in turn."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


class HyperConnection(nn.Module):
    """One sub-layer's connection to the n streams. forward(x, branch) with x (B, T, n, C) and branch: (B, T, C) -> same."""

    def __init__(self, config, position):
        super().__init__()
        n, C = config.mhc_streams, config.n_embd
        self.n, self.position = n, position  # position: which stream this sub-layer writes to most at the start
        self.phi = nn.Parameter(torch.empty(n * n + 2 * n, n * C))  # from the token's normalised streams to the logits
        self.alpha = nn.Parameter(torch.empty(3))  # how much the token's own streams move pre, post and res
        self.bias = nn.Parameter(torch.empty(n * n + 2 * n))  # the static part: pre | post | res

    @torch.no_grad()
    def init_weights(self, n_embd):
        n = self.n
        self.phi.normal_(0, (n * n_embd) ** -0.5)
        self.alpha.fill_(0.01)  # the paper's small start for the dynamic part
        self.bias.zero_()
        # Streams that all start equal and are all written alike would stay equal (every gradient that could tell them
        # apart is zero): each sub-layer starts writing mostly to one stream, in turn, and H_res starts near identity.
        self.bias[n + self.position % n] = 2.0
        self.bias[2 * n:].view(n, n).diagonal().fill_(2.0)  # ~0.7 on the diagonal; Sinkhorn converges fast

    def forward(self, x, branch):
        B, T, n, C = x.shape
        logits = F.linear(F.rms_norm(x.reshape(B, T, n * C), (n * C,)), self.phi.to(x.dtype)).float()
        alpha = self.alpha.float()
        dynamic = torch.cat([alpha[0] * logits[..., :n], alpha[1] * logits[..., n:2 * n], alpha[2] * logits[..., 2 * n:]], -1)
        coeffs = dynamic + self.bias.float()
        pre = torch.softmax(coeffs[..., :n], dim=-1).to(x.dtype)  # (B, T, n)
        post = (n * torch.softmax(coeffs[..., n:2 * n], dim=-1)).to(x.dtype)
        res = sinkhorn(coeffs[..., 2 * n:].view(B, T, n, n)).to(x.dtype)  # res[i, j]: how much stream j feeds stream i
        y = branch(torch.einsum("btn,btnc->btc", pre, x))
        return torch.einsum("btij,btjc->btic", res, x) + post.unsqueeze(-1) * y.unsqueeze(2)

    def flops_per_token(self):
        """Training FLOPs (3x the forward) of the coefficients and the mixing; Sinkhorn's few n x n steps are left out."""
        n, nC = self.n, self.phi.size(1)
        return 3 * (2 * nC * self.phi.size(0) + 2 * nC * (2 + n))


def expand(x, n):
    """(B, T, C) -> (B, T, n, C): every stream starts as the embedding."""
    return x.unsqueeze(2).expand(-1, -1, n, -1).contiguous()


def collapse(x):
    """(B, T, n, C) -> (B, T, C): the streams' mean (a doubly stochastic mixing keeps it as the plain residual would)."""
    return x.mean(dim=2)
