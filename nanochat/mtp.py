"""
Multi-token prediction (DeepSeek-V3, arXiv 2412.19437, section 2.2).

D modules run after the main model, in a chain. Module k (k = 1..D) predicts the token k+1 places after the next one:
    h'_i = M_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k}))]      h^0: the main model's final hidden states
    h^k = Block_k(h'),  P(t_{i+k+1}) = Head(h^k_i)
with the embedding and the head shared with the main model. The loss is the mean of the modules' cross-entropies,
weighted by lambda (V3: 0.3, then 0.1 for the last third of training; base_train's schedule).
The token fed to module k is read from the input ids, t_{i+k} = idx[i+k], never from the targets: in finetuning the
targets are -1 where the loss is masked, and the fork this replaces embedded those (an index error). Masked targets
are left out of every module's loss, as they are of the main one.

At inference the first module drafts one token ahead for self-speculative decoding (Engine(speculative=True)): it
keeps its own KV cache over the positions whose next token is known.
"""

import dataclasses

import torch
import torch.nn as nn

from nanochat.engine import rotary


class MTP(nn.Module):
    def __init__(self, config, padded_vocab):
        super().__init__()
        self.sequence_len, self.padded_vocab = config.sequence_len, padded_vocab
        from nanochat.gpt import Block, Linear  # gpt.py builds this module
        C = config.n_embd
        # each module's block is a plain attention block: full window, no Engram, no mHC
        plain = dataclasses.replace(config, mhc_streams=0, engram_layers="")
        self.proj = nn.ModuleList([Linear(2 * C, C) for _ in range(config.mtp_depth)])
        self.blocks = nn.ModuleList([Block(plain, config.n_layer + k, "A") for k in range(config.mtp_depth)])

    @torch.no_grad()
    def init_weights(self, n_embd):
        s = 3 ** 0.5 * (2 * n_embd) ** -0.5
        for proj, block in zip(self.proj, self.blocks):
            proj.weight.uniform_(-s, s)
            block.init_weights(n_embd)

    def step(self, k, model, h, next_ids, cos, sin, kv_cache=None):
        """Module k (0-based) on hidden states h (B, T, C) and the tokens after them (B, T): its hidden states."""
        from nanochat.gpt import norm
        emb = norm(model.transformer.wte(next_ids).to(h.dtype))
        x = self.proj[k](torch.cat([norm(h), emb], dim=-1))
        window = model.config.sequence_len if kv_cache is not None else h.size(1)  # every earlier position
        return norm(self.blocks[k](x, next_ids, None, cos, sin, window, kv_cache))

    def loss(self, model, h, idx, targets):
        """The modules' mean cross-entropy; h (B, T, C): the main model's final hidden states."""
        from nanochat.gpt import mean_loss
        T, total = idx.size(1), 0.0
        for k in range(len(self.blocks)):
            n = T - (k + 1)  # positions whose token k+1 places after the next is in the row
            h = self.step(k, model, h[:, :n], idx[:, k + 1:], model.cos[:, :n], model.sin[:, :n])
            target = targets[:, k + 1:]
            total = total + mean_loss(model.token_losses(h, target), target)
        return total / len(self.blocks)

    def draft(self, model, h, next_ids, kv_cache):
        """Decoding: module 0 over new positions (hidden states h, their next tokens) -> logits for the token after
        the last next token, (B, V). kv_cache: the module's own, at the same positions as the main model's."""
        x = self.step(0, model, h, next_ids, *rotary(kv_cache, model.cos, model.sin, h.size(1)), kv_cache)
        kv_cache.advance(h.size(1))
        return model.head(x[:, -1])

    def flops_per_token(self):
        """Training FLOPs beyond the matmul weights (counted with every Linear): each module's attention and its use
        of the shared head."""
        C = self.proj[0].out_features
        return len(self.blocks) * (12 * C * self.sequence_len + 6 * C * self.padded_vocab)
