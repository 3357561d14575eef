"""
How a training run spreads the model over its processes (--parallel):
- ddp: every rank holds the whole model; MuonAdamW averages the gradients and shards its own state (ZeRO-2).
- fsdp: FSDP2's fully_shard on every block, on each embedding and at the root. Parameters, gradients and optimizer
  state are all sharded (ZeRO-3): a block's weights are gathered whole only for its forward and backward.
- tp: tensor parallelism over --tp ranks (DTensor). q, k, v, c_fc, the value embeddings and their gates are split by
  output (column-wise), each block's two projections by input (row-wise: one all-reduce each). Each rank then runs
  its share of the heads and of the MLP. The rest is replicated, and the ranks of a tp group read the same rows.
- fsdp+tp: a 2-D mesh, (data, tp): tensor parallel inside each group of --tp ranks, FSDP across the groups.
Under every mode Muon stays exactly Muon: the optimizer gathers sharded matrices whole to orthogonalise them
(nanochat/optimizers.py). Checkpoints are written whole, so any mode and number of processes can resume them.
"""

import torch
from torch.distributed.tensor import DTensor

from nanochat.common import UserError

MODES = ("ddp", "fsdp", "tp", "fsdp+tp")


def split_by_tp(name):
    """Whether tensor parallelism splits the parameter `name` (the blocks' weights, the value embeddings)."""
    return name.startswith(("transformer.h.", "value_embeds."))


def data_split(mode, tp, rank, world_size):
    """(which share of the data this rank reads, how many shares): the ranks of one tp group read the same rows."""
    if "tp" in mode:
        return rank // tp, world_size // tp
    return rank, world_size


def check(mode, tp, world_size, config, planned=False):
    """The tensor-parallel size for this run (--tp 0: every process), or one line saying what to change. planned:
    a run being sized, not this one (dev/bench_memory.py), so no processes need to be there."""
    if mode != "ddp" and not planned and not torch.distributed.is_initialized():
        raise UserError(f"--parallel {mode} shards the model over processes: launch with torchrun (even one process), "
                        "or train plainly with --parallel ddp")
    if mode != "ddp" and (config.engram_layers or config.mhc_streams or config.mtp_depth):
        raise UserError(f"--parallel {mode} is not wired for Engram, mHC or MTP (their sharding is untested): "
                        "train them with --parallel ddp")
    if "tp" not in mode:
        if tp not in (0, 1):
            raise UserError(f"--tp={tp} needs --parallel tp or fsdp+tp")
        return 1
    tp = tp or world_size
    if tp < 1 or world_size % tp:
        raise UserError(f"--tp={tp} must divide the number of processes ({world_size})")
    if mode == "tp" and tp != world_size:
        raise UserError(f"--parallel tp splits the model over every process ({world_size}), not --tp={tp}: drop --tp, "
                        "or shard across groups of --tp ranks with --parallel fsdp+tp")
    if mode == "fsdp+tp" and world_size == tp:
        raise UserError(f"--parallel fsdp+tp with --tp={tp} on {world_size} processes leaves no ranks to shard "
                        "over: use --parallel tp, or a smaller --tp")
    if "M" in config.mixer_pattern.upper():
        raise UserError("--parallel tp splits attention heads, and Mamba layers have no such split here: use "
                        "--parallel fsdp (or ddp) for hybrids")
    if "D" in config.mixer_pattern.upper():
        raise UserError("--parallel tp splits attention heads, and a sparse attention layer's indexer (D) scores with "
                        "all of them: use --parallel fsdp (or ddp) for D layers")
    if config.n_head % tp or config.n_kv_head % tp:
        raise UserError(f"--tp={tp} must divide the heads ({config.n_head} query, {config.n_kv_head} key/value): "
                        "pick another --tp or --head-dim")
    return tp


def parallelize(model, mode, tp, device):
    """Shard a GPT in place for mode on device (its weights are on the CPU or already there); returns it."""
    if mode == "ddp":
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    world_size = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world_size // tp, tp), mesh_dim_names=("data", "tp"))
    if "tp" in mode:
        _tensor_parallel(model, mesh["tp"])
    if "fsdp" in mode:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # blocks of matrices are gathered already cast to the compute dtype (what our Linear casts them to anyway),
        # and gradients reduced in fp32. Otherwise autograd would keep each Linear's cast copy until the backward
        # pass, a whole compute-dtype copy of every block per rank; this way FSDP frees the gathered weights
        # after each block. Mamba's fp32 parameters (decays, biases) are gathered as they are.
        cast = MixedPrecisionPolicy(param_dtype=model.compute_dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            matrices = all(p.ndim == 2 for p in block.parameters())
            fully_shard(block, mesh=mesh["data"], mp_policy=cast if matrices else MixedPrecisionPolicy())
        for module in [model.transformer.wte, *model.value_embeds.values()]:
            fully_shard(module, mesh=mesh["data"])
        fully_shard(model, mesh=mesh["data"])
    model.to(device)  # the buffers (rotary tables), and under tp the replicated weights
    if "tp" in mode:
        # what tensor parallelism leaves whole (embedding, head, scalars) gets the same gradient on every rank of a
        # tp group, up to the order of a GPU kernel's atomic adds (the embedding's backward): the optimizer averages
        # it over the group, so the copies cannot drift apart
        for name, p in model.named_parameters():
            if not split_by_tp(name):
                p.tp_group = mesh["tp"].get_group()
    return model


def _tensor_parallel(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    tp = mesh.size()
    for block in model.transformer.h:
        plan = {"mixer.c_q": ColwiseParallel(), "mixer.c_k": ColwiseParallel(), "mixer.c_v": ColwiseParallel(),
                "mixer.c_proj": RowwiseParallel(), "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
        if block.mixer.ve_gate is not None:
            plan["mixer.ve_gate"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
        block.mixer.n_head //= tp  # the heads this rank computes (the KV cache sizes itself from these too)
        block.mixer.n_kv_head //= tp
    for embedding in model.value_embeds.values():  # split by head, as the values they are added to
        parallelize_module(embedding, mesh, ColwiseParallel())


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model):
    """The model's state_dict with whole tensors on the CPU (a collective when sharded: call on every rank)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in model.state_dict().items()}

