"""
Inference: the KV cache the model reads and writes while generating.
"""

import torch


class KVCache:
    """
    Keys and values of every layer, (n_layers, B, H_kv, T_max, D), written in place as tokens arrive.
    pos counts the tokens already cached (the same for every row); prev_embedding holds the last token's
    embedding for the model's smear.
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.prev_embedding = None

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        c = model.config
        return cls(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, model.get_device(), model.compute_dtype)

    def reset(self):
        self.pos = 0
        self.prev_embedding = None

    def insert(self, layer, k, v):
        """Store this step's (B, H_kv, T, D) keys and values; return everything cached so far for the layer."""
        end = self.pos + k.size(2)
        if end > self.k.size(3):
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.k.size(3)}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n):
        self.pos += n
