"""
Run by tests/test_parallel.py under torchrun with 4 gloo processes. For each --parallel mode (fsdp over 4, tp over
4, fsdp+tp as 2 x 2, this last one with activation checkpointing): a tiny fp32 model trains 3 steps; what it saved
after step 2 (weights, the whole optimizer state) is loaded into a freshly sharded copy, which trains step 3 again. One process computes the same
3 steps on the whole batch first, before the process group exists. Rank 0 prints one JSON line: per mode, the
largest differences from the one-process run (step 1's gradients; step 1's weights and whole optimizer state given
the same gradients; the losses; the weights after 3 steps), resumed vs uninterrupted, and whether greedy decoding
through the Engine (KV cache on this rank's heads) gives the same tokens.
"""

import copy
import json

import torch
import torch.distributed as dist

from torch.distributed.tensor import DTensor, distribute_tensor

from nanochat.gpt import GPT, build_model_config
from nanochat.parallel import data_split, full_state_dict, parallelize

CONFIG = build_model_config(4, 256, aspect_ratio=16, head_dim=16, max_seq_len=32, window_pattern="SL")  # 4 heads, 64 wide
ROWS = 4


def fresh_model(state=None):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(CONFIG)
    model.to_empty(device="cpu")
    model.init_weights()
    # projections start at zero, which makes some gradients vanish exactly (the value embeddings', backout's) and
    # leaves AdamW normalising rounding noise: give them small weights, as a model has after a few steps
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in model.transformer.h:
            for w in (block.mixer.c_proj.weight, block.mlp.c_proj.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
    if state is not None:
        model.load_state_dict(state)
    return model


def train(model, optimizer, batches, rows=slice(None), keep_grads=False):
    losses = []
    for x, y in batches:
        loss = model(x[rows], y[rows])
        loss.backward()
        optimizer.step()
        if not keep_grads:
            model.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def make_optimizer(model):
    return model.setup_optimizer(weight_decay=0.1)


def greedy(model, tokens=8):
    from nanochat.engine import Engine

    class Bytes:  # the Engine needs only these of a tokenizer here
        def get_bos_token_id(self):
            return 0

        def encode_special(self, name):
            return None

    with torch.no_grad():
        rows, _ = Engine(model, Bytes()).generate_batch([1, 2, 3, 4, 5], num_samples=1, max_tokens=tokens, temperature=0.0)
    return rows[0]


def uneven_evaluation(model, batches, rows, rank, tp):
    """Bits per byte where rank 0 runs out of batches first (a one-pass loader over a small split): every forward
    pass of a sharded model is a collective, so all ranks must stop with it. Returns the targets covered."""
    from nanochat.loss_eval import evaluate_bpb
    own = [(x[rows], y[rows]) for x, y in batches[:1 if rank == 0 else 3]]
    _, tokens = evaluate_bpb(model, own, 5, torch.ones(CONFIG.vocab_size, dtype=torch.int32), copies=tp)
    return tokens


def gathered_grads(model):
    return {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for name, p in model.named_parameters()}


def largest_difference(a, b):
    """Over two state_dicts, of a model or of an optimizer's "state" (keyed alike)."""
    if all(torch.is_tensor(v) for v in a.values()):
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return max(largest_difference({k: v for k, v in a[i].items() if torch.is_tensor(v)},
                                  {k: v for k, v in b[i].items() if torch.is_tensor(v)}) for i in a)


def main():
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, CONFIG.vocab_size, (3, ROWS, CONFIG.sequence_len + 1), generator=gen)
    batches = [(d[:, :-1], d[:, 1:]) for d in data]

    reference = fresh_model()
    ref_optimizer = make_optimizer(reference)
    ref_losses = train(reference, ref_optimizer, batches[:1], keep_grads=True)
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    reference.zero_grad(set_to_none=True)
    ref_weights, ref_state = copy.deepcopy((full_state_dict(reference), ref_optimizer.state_dict()))
    ref_losses += train(reference, ref_optimizer, batches[1:])
    ref_tokens = greedy(reference.eval())

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for mode, tp in (("fsdp", 1), ("tp", 4), ("fsdp+tp", 2)):
        share, shares = data_split(mode, tp, rank, world)
        rows = slice(share * ROWS // shares, (share + 1) * ROWS // shares)
        model = parallelize(fresh_model(), mode, tp, torch.device("cpu"))
        model.activation_checkpointing = mode == "fsdp+tp"
        optimizer = make_optimizer(model)
        # step 1 in two halves: the gradients equal one process's (up to the order of the sums); then, given exactly
        # one process's gradients, the optimizer's step equals its step
        x, y = batches[0]
        losses = [model(x[rows], y[rows])]
        losses[0].backward()
        gradients = largest_difference(gathered_grads(model), ref_grads)
        for name, p in model.named_parameters():
            g = ref_grads[name]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g.clone()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        weights, whole = copy.deepcopy((full_state_dict(model), optimizer.state_dict()))  # whole: a checkpoint's
        same_keys = ({i: sorted(s) for i, s in ref_state["state"].items()} ==
                     {i: sorted(s) for i, s in whole["state"].items()})
        step1 = {"gradients": gradients, "weights": largest_difference(weights, ref_weights),
                 "optimizer_state": largest_difference(whole["state"], ref_state["state"])}
        losses += train(model, optimizer, batches[1:2], rows)
        saved_weights, saved_state = copy.deepcopy((full_state_dict(model), optimizer.state_dict()))
        losses += train(model, optimizer, batches[2:], rows)
        # resume from step 2: a new sharded model from the saved weights, the whole optimizer state cut into pieces
        resumed = parallelize(fresh_model(saved_weights), mode, tp, torch.device("cpu"))
        resumed_optimizer = make_optimizer(resumed)
        resumed_optimizer.load_state_dict(saved_state)
        train(resumed, resumed_optimizer, batches[2:], rows)
        # each rank's loss is over its rows: average over the ranks (tp ranks hold the same rows)
        loss_sums = torch.stack([loss.detach() for loss in losses]) / world
        dist.all_reduce(loss_sums)
        results[mode] = {
            "step1": step1,
            "optimizer_state_keys_match": same_keys,
            "losses": (loss_sums - torch.stack(ref_losses)).abs().max().item(),
            "resumed_vs_uninterrupted": largest_difference(full_state_dict(resumed), full_state_dict(model)),
            "after_3_steps": largest_difference(full_state_dict(model), full_state_dict(reference)),
            "greedy_tokens_match": greedy(model.eval()) == ref_tokens,
            "uneven_evaluation_tokens": uneven_evaluation(model, batches, rows, rank, tp),
        }
    if rank == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
