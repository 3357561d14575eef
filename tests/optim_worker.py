"""
Three optimizer steps of a tiny model on fixed data, then MuonAdamW alone on uneven matrix counts; saves the
resulting weights of both, and every rank's optimizer state of the first. Run plainly (1 process, the two
micro-batches accumulated) or under torchrun with 2 processes (one micro-batch each, gradients synced by MuonAdamW).
"""

import sys

import torch

from nanochat.common import compute_cleanup, compute_init


def uneven_run(steps=3):
    """MuonAdamW alone on matrices of three shapes, 5, 2 and 1 of them (with 2 ranks: rank 1 owns 2 of 5 plus a
    zero pad, and none of 1), and a vector. Every rank sees the same gradients, multiples of 1/64, so their sum and
    its division by the world size are exact: every world size must give the same bits."""
    from nanochat.optimizers import MuonAdamW
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 16)] * 5 + [(16, 8)] * 2 + [(8, 8), (4096,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    muon = dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.1)
    groups = [dict(params=params[:5], **muon), dict(params=params[5:7], **muon), dict(params=params[7:8], **muon)]
    optimizer = MuonAdamW(groups + [dict(kind="adamw", params=params[8:], lr=0.01, betas=(0.8, 0.95), eps=1e-10,
                                         weight_decay=0.01)])
    for _ in range(steps):
        for p in params:
            p.grad = torch.randint(-64, 65, p.shape, generator=gen) / 64
        optimizer.step()
    return [p.detach() for p in params]


def model_run(ddp, rank):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = model.setup_optimizer(weight_decay=0.1)
    data = torch.randint(0, 300, (3, 2, 4, 33), generator=torch.Generator().manual_seed(1))  # step, micro-batch, B, T+1
    for step in range(3):
        micro_batches = [rank] if ddp else [0, 1]
        for m in micro_batches:
            x, y = data[step, m, :, :-1], data[step, m, :, 1:]
            (model(x, y) / len(micro_batches)).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    muon_state = [s["momentum_buffer"].shape[0] for s in optimizer.state.values() if "momentum_buffer" in s]
    adam_rows = optimizer.state[model.lm_head.weight]["exp_avg"].shape[0]
    print(f"rank {rank}: muon matrices owned {sum(muon_state)}, lm_head adam rows {adam_rows}", flush=True)
    return model.state_dict(), optimizer.state_dict()


if __name__ == "__main__":
    ddp, rank = compute_init("cpu")[:2]
    model_state, optimizer_state = model_run(ddp, rank)
    optimizer_states = [optimizer_state]
    if ddp:
        import torch.distributed as dist
        optimizer_states = [None] * dist.get_world_size()
        dist.all_gather_object(optimizer_states, optimizer_state)
    result = dict(model=model_state, optimizer=optimizer_states, uneven=uneven_run())
    if rank == 0:
        torch.save(result, sys.argv[1])
    compute_cleanup()
