"""
Bits per byte: the loss measure that does not depend on the tokenizer. Cross-entropy in nats per token is
summed over targets and divided by the UTF-8 bytes those targets stand for, so a model with a bigger vocabulary
(fewer, longer tokens) is compared fairly. Special tokens (0 bytes) and ignored targets (-1) are left out.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, copies=1):
    """
    Bits per byte over at most `steps` batches of (inputs, targets), fewer when `batches` runs out first (a one-pass
    loader over a small split). Returns (bpb, tokens): the mean, and how many targets it covered, summed across ranks.
    copies: how many ranks read the same batches (a tensor-parallel group), counted once.
    """
    from nanochat.parallel import is_sharded
    together = is_sharded(model) and dist.is_initialized()  # its forward is a collective: stop when any rank runs out
    device = model.get_device()
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # bytes, tokens
    batches = iter(batches)
    for _ in range(steps):
        batch = next(batches, None)
        if together:
            more = torch.tensor(batch is not None, dtype=torch.int32, device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
            batch = batch if more.item() else None
        if batch is None:
            break
        x, y = batch[:2]
        loss = model(x, y, loss_reduction="none").view(-1)  # nats per target
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        total_nats += (loss * (nbytes > 0)).sum()
        counts += torch.stack([nbytes.sum(), valid.sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(counts)
    nbytes, tokens = counts.tolist()
    return (total_nats.item() / (math.log(2) * nbytes) if nbytes > 0 else float("inf")), tokens // copies


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def greedy_samples(engine, tokenizer, max_tokens=16):
    """A quick look at what a base model knows: the fixed prompts, each completed greedily."""
    texts = []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        sequences, _ = engine.generate_batch(tokens, max_tokens=engine.answer_budget(len(tokens), max_tokens),
                                             temperature=0)
        texts.append(tokenizer.decode(sequences[0][1:]))
    return texts
