"""
Bits per byte: the loss measure that does not depend on the tokenizer. Cross-entropy in nats per token is
summed over targets and divided by the UTF-8 bytes those targets stand for, so a model with a bigger vocabulary
(fewer, longer tokens) is compared fairly. Special tokens (0 bytes) and ignored targets (-1) are left out.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Mean bits per byte over `steps` batches of (inputs, targets), summed across ranks."""
    total_nats = torch.zeros((), dtype=torch.float32, device=model.get_device())
    total_bytes = torch.zeros((), dtype=torch.int64, device=model.get_device())
    for _ in range(steps):
        x, y, *_ = next(batches)
        loss = model(x, y, loss_reduction="none").view(-1)  # nats per target
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        total_nats += (loss * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    nbytes = total_bytes.item()
    return total_nats.item() / (math.log(2) * nbytes) if nbytes > 0 else float("inf")
