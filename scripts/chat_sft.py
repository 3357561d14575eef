"""
Finetune on conversations: supervised finetuning (this script) and midtraining (scripts/mid_train.py, the same
loop with its own mixture and the reference's midtraining settings). SFT's loss covers only what the assistant
writes, with the source's learning rates and momenta; midtraining, as the reference's did, trains on every token
from a fresh optimizer at fixed learning rates, constant then down to 0 over the last 20%. Batch size and
sequence length are inherited from the source checkpoint unless given.

    python -m scripts.chat_sft                                   # SFT from the latest mid checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft1
    python -m scripts.chat_sft --data=offline --num-iterations=100   # without the hub: synthetic and packaged data
    python -m scripts.chat_sft --kb=synthetic --max-seq-len=1024     # plus RAG: search the base, answer from passages
"""

import os
import time

from nanochat.common import (Flags, UserError, check_folder_name, check_minimums, compute_cleanup, compute_init, get_base_dir, get_compute_dtype, init_wandb,
                             print0, print_result, run_cli)
from nanochat.retrieval import add_kb_flags, open_kb
from tasks.common import TaskMixture

IDENTITY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev", "identity_conversations.jsonl")
STAGES = {  # stage -> (default source, checkpoint folder, wandb project)
    "mid": ("base", "mid_checkpoints", "nanochat-mid"),
    "sft": ("mid", "chatsft_checkpoints", "nanochat-sft"),
}


def rag_tasks(args, kb):
    """RAG SFT on knowledge base kb: (train, val) tasks that search it hop after hop, and answer from passages placed
    before the question (single-shot), over the --rag-data questions."""
    from tasks.rag import RAGQA, settings
    common = settings(args, kb)
    return ([RAGQA(split="train", mode="search", **common), RAGQA(split="train", mode="context", **common)],
            [RAGQA(split="test", mode="search", **common)])


def mixtures(stage, data, rag=([], [])):
    """(train, val) TaskMixtures. 'hub' is the reference's data; 'offline' needs no network at all. rag: rag_tasks()."""
    train, val = _mixture_tasks(stage, data)
    return TaskMixture(train + rag[0]), TaskMixture(val + rag[1])


def _mixture_tasks(stage, data):
    """The stage's (train, val) task lists for --data."""
    from tasks.customjson import CustomJSON
    from tasks.gsm8k import GSM8K, SyntheticMath
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    if data == "offline":
        identity = CustomJSON(IDENTITY)
        train = [identity, identity, SyntheticMath(4000, "train"), SimpleSpelling(4000, "train"), SpellingBee(4000, "train")]
        val = [SyntheticMath(200, "test"), SpellingBee(200, "test"), SimpleSpelling(200, "test")]
        return train, val
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    if stage == "mid":
        identity = CustomJSON(IDENTITY)
        train = [SmolTalk("train"), MMLU("auxiliary_train", "train"), GSM8K("main", "train"), identity, identity,
                 SimpleSpelling(200_000, "train"), SpellingBee(80_000, "train")]
    else:
        mmlu, gsm8k = MMLU("auxiliary_train", "train"), GSM8K("main", "train")
        identity = CustomJSON(IDENTITY)
        # MMLU x3, GSM8K x4 epochs; identity and spelling as in midtraining: SpellingBee is scored after this stage
        train = [SmolTalk("train"), mmlu, mmlu, mmlu, gsm8k, gsm8k, gsm8k, gsm8k, identity, identity,
                 SimpleSpelling(200_000, "train"), SpellingBee(80_000, "train")]
    val = [SmolTalk("test"), MMLU("all", "test", stop=5200), GSM8K("main", "test", stop=420)]
    return train, val


def parse_args(argv, stage):
    mid = stage == "mid"
    p = Flags(description=f"{'Midtraining' if mid else 'Supervised finetuning'} on conversations.")
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    p.add_argument("--source", default=STAGES[stage][0], choices=["base", "mid", "sft"], help="checkpoint to start from")
    p.add_argument("--model-tag", default=None, help="source checkpoint tag (default: the largest d<N>)")
    p.add_argument("--model-step", "--step", type=int, default=None, help="source checkpoint step (default: the last)")
    p.add_argument("--data", choices=["hub", "offline"], default="hub",
                   help="hub: the reference mixture from Hugging Face; offline: identity, synthetic math and spelling only")
    p.add_argument("--loss-tokens", choices=["assistant", "all"], default="all" if mid else "assistant",
                   help="train on what the assistant writes, or on every token of the conversation")
    p.add_argument("--load-optimizer", type=int, default=0 if mid else 1,
                   help="start from the source's optimizer momenta (1) or not (0)")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1 = one epoch of the mixture)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward pass "
                   "(less memory, one more forward pass of every block)")
    p.add_argument("--parallel", choices=["ddp", "fsdp", "tp", "fsdp+tp"], default="ddp",
                   help="how processes share the model, as in base_train (nanochat/parallel.py)")
    p.add_argument("--tp", type=int, default=0, help="ranks per tensor-parallel group (0 = every process)")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the source's")
    p.add_argument("--device-batch-size", type=int, default=None, help="default: the source's")
    p.add_argument("--total-batch-size", type=int, default=None, help="default: the source's")
    source_lr = None if mid else "the source's"
    p.add_argument("--embedding-lr", type=float, default=0.2 if mid else None, help=f"default: {source_lr or 0.2}")
    p.add_argument("--unembedding-lr", type=float, default=0.004 if mid else None, help=f"default: {source_lr or 0.004}")
    p.add_argument("--matrix-lr", type=float, default=0.02 if mid else None, help=f"default: {source_lr or 0.02}")
    p.add_argument("--init-lr-frac", type=float, default=1.0 if mid else 0.8)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2 if mid else 0.5)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=150 if mid else 200, help="val bpb every N steps (-1 = end only)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="val tokens per evaluation (at most one pass)")
    p.add_argument("--chatcore-every", type=int, default=-1 if mid else 200, help="ChatCORE every N steps (-1 = never)")
    p.add_argument("--chatcore-max-cat", type=int, default=-1, help="categorical problems per task in ChatCORE (-1 = all)")
    p.add_argument("--chatcore-max-sample", type=int, default=24, help="generative problems per task in ChatCORE")
    p.add_argument("--model-tag-out", default=None, help="output checkpoint tag (default: the source's)")
    add_kb_flags(p, questions=True)  # with --kb: RAG SFT, searching it and answering from its passages
    args = p.parse_args(argv)
    if args.source == stage or (stage == "mid" and args.source == "sft"):
        p.error(f"--source={args.source} cannot feed {stage}: use base{' or mid' if stage == 'sft' else ''}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        p.error("--num-iterations must be at least 1, or -1 for one epoch of the mixture")
    # left out, the sizes and learning rates are the source's
    check_minimums(args, {"--max-seq-len": 1, "--device-batch-size": 1, "--total-batch-size": 1, "--embedding-lr": 0,
                          "--unembedding-lr": 0, "--matrix-lr": 0, "--init-lr-frac": 0})
    check_folder_name("--model-tag-out", args.model_tag_out)
    return args


def main(argv=None, stage="sft"):
    args = parse_args(argv, stage)
    kb = open_kb(args)
    rag = rag_tasks(args, kb) if kb else ([], [])  # a missing question file is found before the model loads
    import torch
    import torch.distributed as dist

    from nanochat.checkpoint_manager import find_checkpoint, load_model, load_momenta, save_stage
    from nanochat.dataloader import conversation_batches
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.optimizers import LossScaler, progress_lr_multiplier
    from nanochat.parallel import check, data_split, parallelize
    from nanochat.progress import Progress
    from nanochat.tokenizer import get_token_bytes

    ddp, rank, _, world_size, device = compute_init(args.device_type)
    master = rank == 0
    dtype = get_compute_dtype(device.type)[0]
    sharded = args.parallel != "ddp"  # built whole in host memory, then each rank's shards move to the device
    model, tokenizer, source_meta = load_model(args.source, torch.device("cpu") if sharded else device, dtype, phase="train",
                                               model_tag=args.model_tag, step=args.model_step)
    tp = check(args.parallel, args.tp, world_size, model.config)
    data_rank, data_ranks = data_split(args.parallel, tp, rank, world_size)
    model = parallelize(model, args.parallel, tp, device)
    model.activation_checkpointing = args.activation_checkpointing
    source_dir, source_step = find_checkpoint(args.source, args.model_tag, args.model_step)
    inherited = source_meta.get("user_config", {})
    inherit = lambda flag, key, default: flag if flag is not None else source_meta.get(key, default)
    T = inherit(args.max_seq_len, "max_seq_len", 2048)
    B = inherit(args.device_batch_size, "device_batch_size", 32)
    total_batch_size = inherit(args.total_batch_size, "total_batch_size", 524288)
    lrs = {name: getattr(args, name) if getattr(args, name) is not None else inherited.get(name, default)
           for name, default in (("embedding_lr", 0.3), ("unembedding_lr", 0.004), ("matrix_lr", 0.02))}
    tokens_per_micro_step = B * T * data_ranks
    if total_batch_size % tokens_per_micro_step:
        raise UserError(f"total batch {total_batch_size} is not a multiple of device_batch_size x max_seq_len x data-parallel "
                        f"processes = {tokens_per_micro_step}: pass --total-batch-size or --device-batch-size")
    if T > model.config.sequence_len * 10:
        raise UserError(f"--max-seq-len={T} is beyond what the model's rotary tables cover ({model.config.sequence_len * 10})")
    grad_accum_steps = total_batch_size // tokens_per_micro_step
    print0(f"{stage} from {args.source} {source_dir} step {source_step}: batch {total_batch_size:,} tokens "
           f"({grad_accum_steps} x {B} x {T} on {data_ranks} data-parallel ranks), lrs {lrs} x {args.init_lr_frac}")

    optimizer = model.setup_optimizer(unembedding_lr=lrs["unembedding_lr"], embedding_lr=lrs["embedding_lr"],
                                      matrix_lr=lrs["matrix_lr"], weight_decay=0.0)
    if args.load_optimizer:
        load_momenta(optimizer, source_dir, source_step, device, rank, world_size)
    for g in optimizer.param_groups:
        g["initial_lr"] *= args.init_lr_frac
        g["lr"] = g["initial_lr"]
    scaler = LossScaler(dtype, device.type)  # fp16 (NANOCHAT_DTYPE=float16, pre-Ampere GPUs) scales its loss
    step_model = model  # compiled on GPUs, as in base_train: training steps and val bpb (fixed shapes)
    if device.type == "cuda":
        model.prepare_flex_attention(T)  # sliding windows through FlexAttention inside the compiled model
        step_model = torch.compile(model, dynamic=False)
        optimizer.compile()

    if args.data == "offline" and args.chatcore_every > 0:
        print0("ChatCORE needs ARC, MMLU and GSM8K from the hub: not evaluated with --data=offline")
        args.chatcore_every = -1
    try:
        train_ds, val_ds = mixtures(stage, args.data, rag)
    except UserError as e:
        if args.data == "offline":
            raise
        raise UserError(f"{e}; or train on data that needs no network with --data=offline") from None
    print0(f"mixture: {len(train_ds):,} training conversations, {len(val_ds):,} validation")
    all_tokens = args.loss_tokens == "all"
    train_loader = conversation_batches(tokenizer, train_ds, B, T, device, data_rank, data_ranks, all_tokens=all_tokens)
    token_bytes = get_token_bytes(device, tokenizer.get_vocab_size())
    wandb_run = init_wandb(args.run, STAGES[stage][2], vars(args), master)

    def chatcore_eval():  # chat_eval's evaluation (512 new tokens, the same problems), capped for speed
        from tasks.common import BASELINES, chatcore, evaluate_chat_tasks
        max_cat = None if args.chatcore_max_cat < 0 else args.chatcore_max_cat
        results = evaluate_chat_tasks(list(BASELINES), model, tokenizer, max_cat, args.chatcore_max_sample, batch_size=B)
        accuracies = {name: hits / max(n, 1) for name, hits, n in results}
        return accuracies, chatcore(accuracies)

    # --- the loop: until one epoch (or --num-iterations) is done, then a last evaluation and the save ---
    x, y, info = next(train_loader)
    step, val_bpb, val_tokens, chat_core = 0, None, None, None
    progress = Progress(wandb_run, args.num_iterations if args.num_iterations > 0 else None)
    while True:
        done = step / args.num_iterations if args.num_iterations > 0 else info["progress"]
        last_step = done >= 1.0
        if ddp:  # every rank must stop at the same step
            flag = torch.tensor(float(last_step), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            last_step = bool(flag.item())
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            val_loader = conversation_batches(tokenizer, val_ds, B, T, device, data_rank, data_ranks, epochs=1, all_tokens=all_tokens)
            val_bpb, val_tokens = evaluate_bpb(step_model, val_loader, max(1, args.eval_tokens // tokens_per_micro_step),
                                               token_bytes, copies=tp)
            progress.val_bpb(step, val_bpb, val_tokens)
            model.train()
        if args.chatcore_every > 0 and (last_step or (step > 0 and step % args.chatcore_every == 0)):
            model.eval()
            accuracies, chat_core = chatcore_eval()
            print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in accuracies.items()) + f" | ChatCORE: {chat_core:.4f}")
            wandb_run.log({"step": step, "chatcore": chat_core, **{f"chatcore/{k}": v for k, v in accuracies.items()}})
            model.train()
        if last_step:
            break

        t0 = time.time()
        for _ in range(grad_accum_steps):
            loss = step_model(x, y)
            train_loss = loss.detach()
            scaler.backward(loss / grad_accum_steps)
            x, y, info = next(train_loader)
        lrm = progress_lr_multiplier(done, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.10 * min(step / 300, 1.0)
        scaler.step(optimizer)
        model.zero_grad(set_to_none=True)
        loss_value = train_loss.item()
        dt = time.time() - t0
        step += 1
        smooth_loss = progress.train_step(step, loss_value, dt)
        print0(f"step {step:05d} ({100 * min(done, 1):.2f}%) | loss: {smooth_loss:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | "
               f"tok/sec: {total_batch_size / dt:,.0f} | epoch: {info['epoch']}")
        if step % 10 == 0:
            wandb_run.log({"step": step, "train/loss": smooth_loss, "train/lrm": lrm, "train/tok_per_sec": total_batch_size / dt})
    progress.close()

    model_tag = args.model_tag_out or os.path.basename(source_dir)
    checkpoint_dir = os.path.join(get_base_dir(), STAGES[stage][1], model_tag)
    save_stage(checkpoint_dir, step, model, optimizer, tokenizer, rank, val_bpb=val_bpb, source=args.source,
               user_config={**vars(args), **lrs}, max_seq_len=T, device_batch_size=B, total_batch_size=total_batch_size)
    print0(f"saved {checkpoint_dir} step {step}")
    wandb_run.finish()
    print_result(f"chat_{stage}" if stage == "sft" else "mid_train", checkpoint_dir=checkpoint_dir, step=step, data=args.data,
                 kb=args.kb, train_loss=progress.smooth_loss, val_bpb=val_bpb, val_tokens=val_tokens, min_val_bpb=progress.state["min_val_bpb"],
                 chatcore=chat_core, total_training_time=progress.state["total_training_time"], world_size=world_size,
                 parallel=args.parallel, tp=tp, curve=progress.curve)
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
