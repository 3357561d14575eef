"""
Checkpoints: under $NANOCHAT_BASE_DIR/<stage>_checkpoints/<tag>/ each step has
    model_{step:06d}.pt          the model's state_dict (written by rank 0)
    optim_{step:06d}_rank{r}.pt  each rank's optimizer shard (sharded state: every rank writes its own); a sharded
                                 model's run (--parallel fsdp/tp) writes the whole state once, as rank 0
    meta_{step:06d}.json         model config, flags, step, loader states (one per rank), loop state
Every file is written to a temporary name and renamed, and the meta file is written last: a checkpoint exists
only once its meta does, so a process killed mid-save leaves the previous checkpoint as the latest valid one.
"""

import dataclasses
import glob
import json
import os
import re

import torch

from nanochat.common import UserError, get_base_dir, get_compute_dtype, print0
from nanochat.gpt import GPT, GPTConfig

SOURCES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
MAKERS = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}


def _atomic_torch_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, rank=0):
    """Call on every rank (each saves its optimizer shard); wrap in a barrier so meta lands after all shards."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_state is not None:
        _atomic_torch_save(optimizer_state, os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"))
    if rank == 0:
        _atomic_torch_save(model_state, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))


def save_meta(checkpoint_dir, step, meta):
    """Rank 0, after every rank has saved: this file is what makes the checkpoint exist."""
    path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(path + ".tmp", path)


def save_stage(checkpoint_dir, step, model, optimizer, tokenizer, rank, **meta):
    """
    A training stage's save, on every rank: the model and each rank's optimizer shard (none when optimizer is None),
    then, once every rank is done, the meta with what loading checks (the model's config, the tokenizer's
    fingerprint, the compute dtype) and the stage's own entries.
    """
    from nanochat.parallel import full_state_dict, is_sharded
    # sharded (--parallel fsdp/tp): every rank helps gather the whole weights and the whole optimizer state, and
    # rank 0 saves them as one process would: any mode and number of processes can load them
    sharded = is_sharded(model)
    optimizer_state = optimizer.state_dict() if optimizer else None
    if sharded and rank != 0:
        optimizer_state = None
    if sharded and rank == 0:  # one whole state: no other rank's file from an earlier save of this step may remain
        for stale in glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt")):
            if not stale.endswith("_rank0.pt"):
                os.remove(stale)
    save_checkpoint(checkpoint_dir, step, full_state_dict(model) if sharded else model.state_dict(), optimizer_state, rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        save_meta(checkpoint_dir, step, {"step": step, "model_config": dataclasses.asdict(model.config),
                                         "tokenizer": tokenizer.fingerprint(),
                                         "compute_dtype": str(model.compute_dtype).removeprefix("torch."), **meta})


def checkpoint_steps(checkpoint_dir):
    """Steps with a complete checkpoint (a meta file), ascending."""
    steps = [int(m.group(1)) for p in glob.glob(os.path.join(checkpoint_dir, "meta_*.json"))
             if (m := re.fullmatch(r"meta_(\d+)\.json", os.path.basename(p)))]
    return sorted(steps)


def optimizer_shard_count(checkpoint_dir, step):
    """How many processes saved this step's optimizer state (each wrote its own shard)."""
    return len(glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt")))


def _read(path, reader, checkpoint_dir, step_flag):
    """Read one checkpoint file; a missing, damaged or cut-off file is one clear error naming it and what to do."""
    try:
        return reader(path)
    except Exception as e:  # torch.load and json raise many kinds for a truncated file
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        problem = "is missing" if isinstance(e, FileNotFoundError) else f"cannot be read ({reason}): it is damaged or incomplete"
        raise UserError(f"{path} {problem}; pick an earlier step with {step_flag} "
                        f"(saved: {', '.join(map(str, checkpoint_steps(checkpoint_dir)))}) or retrain") from None


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0, world_size=1, step_flag="--step"):
    """(model state, optimizer state, meta). The optimizer state is this rank's shard, or, when the checkpoint was
    saved by another number of processes, the list of all shards (MuonAdamW.load_state_dict reshards them)."""
    steps = checkpoint_steps(checkpoint_dir)
    if step not in steps:
        raise UserError(f"{checkpoint_dir} has no step {step}: pick one with {step_flag} "
                        f"(saved: {', '.join(map(str, steps)) or 'none'})")
    read = lambda name, reader: _read(os.path.join(checkpoint_dir, name), reader, checkpoint_dir, step_flag)
    torch_load = lambda path: torch.load(path, map_location=device)
    meta = read(f"meta_{step:06d}.json", _read_json)
    model_state = read(f"model_{step:06d}.pt", torch_load)
    for name, value in ((f"meta_{step:06d}.json", meta), (f"model_{step:06d}.pt", model_state)):
        if not isinstance(value, dict):
            raise UserError(f"{os.path.join(checkpoint_dir, name)} holds a {type(value).__name__}, not a checkpoint's "
                            f"{'meta' if name.startswith('meta') else 'weights'}: pick another step with {step_flag} or retrain")
    meta.setdefault("step", step)
    optimizer_state = None
    if load_optimizer:
        saved_by = optimizer_shard_count(checkpoint_dir, step)
        if saved_by == 0:
            raise UserError(f"{checkpoint_dir} step {step} has no optimizer state (no optim_{step:06d}_rank*.pt): "
                            f"it cannot be resumed exactly; pick another step with {step_flag}")
        if saved_by == world_size:
            optimizer_state = read(f"optim_{step:06d}_rank{rank}.pt", torch_load)
        else:  # every shard, for MuonAdamW.load_state_dict to put together and cut for this run's size
            cpu_load = lambda path: torch.load(path, map_location="cpu")
            optimizer_state = [read(f"optim_{step:06d}_rank{r}.pt", cpu_load) for r in range(saved_by)]
    return model_state, optimizer_state, meta


def load_momenta(optimizer, source_dir, source_step, device, rank, world_size, otherwise="start the optimizer fresh with "
                 "--load-optimizer=0"):
    """Start from the source's optimizer state (its momenta; this run's learning rates stay) where it can be had;
    otherwise: what the error for an unreadable state suggests."""
    saved_by = optimizer_shard_count(source_dir, source_step)
    if saved_by == 0:
        print0("the source has no optimizer state: starting the optimizer fresh")
        return
    if optimizer.sharded:  # the whole state (or every rank's shard), in host memory: each rank cuts its own pieces
        rank, world_size, device = 0, 1, "cpu"
    elif saved_by != world_size:
        print0(f"the source's optimizer state was saved by {saved_by} processes, this run has {world_size}: resharding it")
    try:
        _, optim_state, _ = load_checkpoint(source_dir, source_step, device, load_optimizer=True, rank=rank,
                                            world_size=world_size)
    except UserError as e:
        raise UserError(f"{e}; or {otherwise}") from None
    fresh = [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(optim_state)
    for g, (lr, initial) in zip(optimizer.param_groups, fresh):
        g["lr"], g["initial_lr"] = lr, initial


def check_tokenizer(meta, tokenizer, checkpoint_dir):
    """The tokenizer on disk must be the one the checkpoint was trained with: same size is not enough."""
    from nanochat.tokenizer import tokenizer_dir
    saved = meta.get("tokenizer")  # checkpoints from before fingerprints carry none: only the size can be checked
    if saved is not None and saved != tokenizer.fingerprint():
        raise UserError(f"the tokenizer in {tokenizer_dir()} (fingerprint {tokenizer.fingerprint()}) is not the one "
                        f"{checkpoint_dir} was trained with ({saved}): restore that tokenizer, or retrain the model")
    vocab_size = meta["model_config"]["vocab_size"]
    if tokenizer.get_vocab_size() != vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but {checkpoint_dir} was trained with "
                        f"{vocab_size}: the tokenizer was retrained since; restore it or retrain the model")


def our_keys(model_state):
    """State dict keys as this code names them: without torch.compile's '_orig_mod.' prefix, and with the reference's
    'attn.' (karpathy/nanochat names its blocks' attention so) as 'mixer.', the seam every sequence mixer sits in.
    So a model trained by the reference loads and chats here."""
    return {re.sub(r"^(transformer\.h\.\d+\.)attn\.", r"\1mixer.", k.removeprefix("_orig_mod.")): v
            for k, v in model_state.items()}


def build_model(checkpoint_dir, step, device, compute_dtype, phase="eval"):
    """A GPT with the checkpoint's weights; phase 'train' or 'eval' sets the module mode."""
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    try:
        config = GPTConfig(**meta["model_config"])
        with torch.device("meta"):
            model = GPT(config, compute_dtype=compute_dtype)
        model.to_empty(device=device)
        model.init_weights()  # buffers (rotary tables) and the embedding dtypes; the weights are overwritten next
        model.load_state_dict(our_keys(model_state), strict=True, assign=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a meta or state dict from some other model
        reason = " ".join(str(e).split())[:240] or type(e).__name__
        raise UserError(f"{checkpoint_dir} step {step} does not describe a model this code can build ({reason}): "
                        "retrain it, or load it with the nanochat version that wrote it") from None
    model.cast_embeddings()  # the saved embeddings carry the dtype of the run that saved them
    if phase == "eval":
        model.cast_for_inference()
    model.train(phase == "train")
    return model, meta


def checkpoints_root(source):
    if source not in SOURCES:
        raise UserError(f"unknown checkpoint source {source!r}: use one of {', '.join(SOURCES)}")
    return os.path.join(get_base_dir(), SOURCES[source])


def largest_tag(tags):
    """The deepest d<N> tag (d26 over d20 over d8; other names rank below them, by name): the default tag."""
    depth = lambda t: int(t[1:]) if re.fullmatch(r"d\d+", t) else -1
    return max(tags, key=lambda t: (depth(t), t))


def find_checkpoint(source, model_tag=None, step=None):
    """(checkpoint_dir, step): the largest d<N> tag and its last step unless given; one clear error otherwise."""
    root = checkpoints_root(source)
    how = f"run python -m {MAKERS[source]} first"
    tags = sorted(os.listdir(root)) if os.path.isdir(root) else []
    tags = [t for t in tags if checkpoint_steps(os.path.join(root, t))]
    if not tags:
        raise UserError(f"no {source} checkpoints in {root}: {how}")
    if model_tag is None:
        model_tag = largest_tag(tags)
    elif model_tag not in tags:
        raise UserError(f"no {source} checkpoint tagged {model_tag!r} in {root} (found: {', '.join(tags)})")
    checkpoint_dir = os.path.join(root, model_tag)
    steps = checkpoint_steps(checkpoint_dir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{checkpoint_dir} has no step {step} (found: {', '.join(map(str, steps))})")
    return checkpoint_dir, step


def load_model(source, device, compute_dtype=None, phase="eval", model_tag=None, step=None):
    """Load a model and its tokenizer from base|mid|sft|rl checkpoints. Returns (model, tokenizer, meta).
    compute_dtype: by default the one get_compute_dtype chooses for the device."""
    from nanochat.tokenizer import get_tokenizer
    if compute_dtype is None:
        compute_dtype = get_compute_dtype(torch.device(device).type)[0]
    checkpoint_dir, step = find_checkpoint(source, model_tag, step)
    model, meta = build_model(checkpoint_dir, step, device, compute_dtype, phase)
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, checkpoint_dir)
    return model, tokenizer, meta
