"""Run by test_distributed.py under torchrun: gloo init from torchrun's environment, the compute dtype rank 0 chose,
a collective, the loader's sharding."""

import os
import re
import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init, get_compute_dtype, print_result
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.tokenizer import get_tokenizer

# the ranks disagree about the dtype on purpose: rank 0's choice must win everywhere
os.environ["NANOCHAT_DTYPE"] = "bfloat16" if os.environ["RANK"] == "0" else "float32"
ddp, rank, local_rank, world_size, device = compute_init("cpu")
assert ddp and dist.get_backend() == "gloo"
dtype, reason = get_compute_dtype("cpu")
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)

tokenizer = get_tokenizer()
loader = tokenizing_distributed_data_loader(tokenizer, 4, 32, "train", data_dir=sys.argv[1], buffer_size=20)
x, y, state = next(loader)
markers = sorted(set(re.findall(r"doc(\d{5})", tokenizer.decode(x.flatten().tolist()))))
gathered = [None] * world_size
dist.all_gather_object(gathered, {"rank": state["rank"], "markers": markers, "dtype": str(dtype), "reason": reason})
loader.close()
print_result("dist_check", world_size=world_size, all_reduce=total.item(), per_rank=gathered)
compute_cleanup()
