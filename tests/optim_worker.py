"""
Three optimizer steps of a tiny model on fixed data; saves the resulting weights. Run plainly (1 process, the two
micro-batches accumulated) or under torchrun with 2 processes (one micro-batch each, gradients synced by MuonAdamW).
"""

import sys

import torch

from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import GPT, GPTConfig

ddp, rank, _, world_size, device = compute_init("cpu")
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
if rank == 0:
    torch.save(model.state_dict(), sys.argv[1])
muon_state = [s["momentum_buffer"].shape[0] for s in optimizer.state.values() if "momentum_buffer" in s]
adam_rows = optimizer.state[model.lm_head.weight]["exp_avg"].shape[0]
print(f"rank {rank}: muon matrices owned {sum(muon_state)}, lm_head adam rows {adam_rows}", flush=True)
compute_cleanup()
