"""
Reinforcement learning on math word problems, the reference's simplified GRPO: for each problem, sample a group
of answers, reward the correct ones (1) and not the others (0), and push up the log-probability of each answer's
tokens by its reward minus the group's mean. On-policy, so no ratio or clipping; no KL penalty or reference model;
the loss is normalised per token (DAPO). Tool outputs forced by the engine are not trained on.

With --kb the problems are questions over a knowledge base instead (tasks/rag.py): the sampled answers' searches
run against it as they are written, and only the final answer is rewarded (exact match), so the model learns when
and what to search, hop after hop.

    python -m scripts.chat_rl                       # GSM8K, from the latest SFT checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=rl1
    python -m scripts.chat_rl --data=offline --num-steps=20   # synthetic problems, no hub
    python -m scripts.chat_rl --kb synthetic --rag-data synthetic   # multi-hop questions, searching the knowledge base
"""

import os
import time

from nanochat.common import (Flags, UserError, check_minimums, compute_cleanup, compute_init, get_base_dir, get_compute_dtype, init_wandb,
                             print0, print_result, run_cli)
from nanochat.retrieval import add_kb_flags, open_kb


def main(argv=None):
    p = Flags(description="RL on GSM8K with a simplified GRPO.")
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    p.add_argument("--source", default="sft", choices=["mid", "sft"], help="checkpoint to start from")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--model-step", "--step", type=int, default=None)
    p.add_argument("--data", choices=["hub", "offline"], default="hub", help="hub: GSM8K; offline: synthetic problems")
    p.add_argument("--num-epochs", type=int, default=1)
    p.add_argument("--num-steps", type=int, default=-1, help="steps (-1 = num_epochs over the training problems)")
    p.add_argument("--device-batch-size", type=int, default=8, help="samples generated per forward pass")
    p.add_argument("--examples-per-step", type=int, default=16, help="problems per step, across all processes")
    p.add_argument("--num-samples", type=int, default=16, help="answers sampled per problem (the group)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward pass "
                   "(less memory, one more forward pass of every block)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0, help="Muon's weight decay")
    p.add_argument("--init-lr-frac", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=60)
    p.add_argument("--eval-examples", type=int, default=400)
    p.add_argument("--save-every", type=int, default=60)
    add_kb_flags(p, questions=True)
    args = p.parse_args(argv)
    check_minimums(args, {f"--{name}": 1 for name in ("num-epochs", "device-batch-size", "examples-per-step", "num-samples",
                                                      "max-new-tokens", "eval-every", "eval-examples", "save-every")})
    check_minimums(args, {f"--{name}": 0 for name in ("temperature", "top-k", "embedding-lr", "unembedding-lr",
                                                      "matrix-lr", "weight-decay", "init-lr-frac")})
    if not (args.num_steps >= 1 or args.num_steps == -1):
        raise UserError(f"--num-steps={args.num_steps} must be at least 1, or -1 for --num-epochs over the problems")
    if args.num_samples % args.device_batch_size:
        raise UserError(f"--num-samples={args.num_samples} must be a multiple of --device-batch-size={args.device_batch_size}")

    import torch
    import torch.distributed as dist

    from nanochat.checkpoint_manager import find_checkpoint, load_model, save_stage
    from nanochat.engine import SEARCH, Engine
    from nanochat.optimizers import LossScaler
    from tasks.gsm8k import GSM8K, SyntheticMath

    ddp, rank, _, world_size, device = compute_init(args.device_type)
    master = rank == 0
    if args.examples_per_step % world_size:
        raise UserError(f"--examples-per-step={args.examples_per_step} must be divisible by the {world_size} processes")
    source_dir, _ = find_checkpoint(args.source, args.model_tag, args.model_step)
    kb = open_kb(args)
    if kb is not None:
        from tasks.rag import RAGQA, settings
        rag = dict(mode="search", **settings(args, kb))
        train_task, val_task = RAGQA(split="train", **rag), RAGQA(split="test", **rag)
    else:
        try:
            train_task = GSM8K("main", "train") if args.data == "hub" else SyntheticMath(8000, "train")
            val_task = GSM8K("main", "test") if args.data == "hub" else SyntheticMath(500, "test")
        except UserError as e:
            if args.data == "offline":
                raise
            raise UserError(f"{e}; or train on data that needs no network with --data=offline") from None
    num_steps = args.num_steps if args.num_steps > 0 else (len(train_task) // args.examples_per_step) * args.num_epochs
    if num_steps == 0:
        raise UserError(f"--examples-per-step={args.examples_per_step} is more than the {len(train_task)} training "
                        "problems, so an epoch has no step: lower it, or give --num-steps")
    dtype = get_compute_dtype(device.type)[0]
    model, tokenizer, _ = load_model(args.source, device, dtype, phase="train",
                                     model_tag=args.model_tag, step=args.model_step)
    model.activation_checkpointing = args.activation_checkpointing  # the policy-gradient passes; sampling has no grad
    engine = Engine(model, tokenizer, kb, args.retriever, args.passages)
    examples_per_rank = args.examples_per_step // world_size
    search_call = "<|python_start|>" + SEARCH  # how a search shows in a decoded answer
    passes = args.num_samples // args.device_batch_size

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for g in optimizer.param_groups:
        g["initial_lr"] *= args.init_lr_frac
        g["lr"] = g["initial_lr"]
    scaler = LossScaler(dtype, device.type)  # fp16 (NANOCHAT_DTYPE=float16, pre-Ampere GPUs) scales its loss
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    wandb_run = init_wandb(args.run, "nanochat-rl", vars(args), master)

    def budget(prompt):
        """--max-new-tokens, cut where the context the model was trained on ends."""
        return engine.answer_budget(len(prompt), args.max_new_tokens)

    def rollouts(example_index, step):
        """Yield (inputs, targets, rewards) for device_batch_size samples at a time of one problem."""
        conversation = train_task[example_index]
        prompt = tokenizer.render_for_completion(conversation)
        for k in range(passes):
            model.eval()
            seed = hash((step, example_index, k)) & 0x7FFFFFFF
            sequences, masks = engine.generate_batch(prompt, num_samples=args.device_batch_size, max_tokens=budget(prompt),
                                                     temperature=args.temperature, top_k=args.top_k, seed=seed)
            model.train()
            completions = [tokenizer.decode(s[len(prompt):]) for s in sequences]
            rewards = [train_task.reward(conversation, c) for c in completions]
            searches.extend(c.count(search_call) for c in completions)
            width = max(len(s) for s in sequences)
            ids = torch.tensor([s + [assistant_end] * (width - len(s)) for s in sequences], dtype=torch.long, device=device)
            mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long, device=device)
            targets = torch.where(mask[:, 1:] == 1, ids[:, 1:], -1)  # only the sampled tokens: not prompt, tool output, pad
            yield ids[:, :-1], targets, torch.tensor(rewards, dtype=torch.float32, device=device)

    @torch.no_grad()
    def pass_at_k():
        """pass@k for k = 1..device_batch_size on the first eval_examples test problems, sampled at the run's temperature."""
        model.eval()
        hits = torch.zeros(args.device_batch_size, device=device)
        total = torch.zeros((), device=device)
        for i in range(rank, min(args.eval_examples, len(val_task)), world_size):
            conversation = val_task[i]
            prompt = tokenizer.render_for_completion(conversation)
            sequences, _ = engine.generate_batch(prompt, num_samples=args.device_batch_size, max_tokens=budget(prompt),
                                                 temperature=args.temperature, top_k=args.top_k, seed=i)
            correct = [val_task.evaluate(conversation, tokenizer.decode(s[len(prompt):])) for s in sequences]
            hits += torch.tensor([float(any(correct[:k + 1])) for k in range(len(correct))], device=device)
            total += 1
        if ddp:
            dist.all_reduce(hits)
            dist.all_reduce(total)
        model.train()
        return (hits / total.clamp(min=1)).tolist()

    checkpoint_dir = os.path.join(get_base_dir(), "chatrl_checkpoints", os.path.basename(source_dir))

    print0(f"RL: {num_steps} steps of {args.examples_per_step} problems x {args.num_samples} samples on {world_size} processes")
    pass_k, mean_reward, mean_searches, t_start = None, None, None, time.time()
    for step in range(num_steps + 1):
        if step % args.eval_every == 0 or step == num_steps:
            pass_k = pass_at_k()
            print0(f"step {step:05d} | " + " | ".join(f"pass@{k + 1}: {v:.4f}" for k, v in enumerate(pass_k)))
            wandb_run.log({"step": step, **{f"pass@{k + 1}": v for k, v in enumerate(pass_k)}})
        if step > 0 and (step % args.save_every == 0 or step == num_steps):
            save_stage(checkpoint_dir, step, model, None, tokenizer, rank, user_config=vars(args))
        if step == num_steps:
            break

        t0, rewards_seen, searches = time.time(), [], []
        for j in range(examples_per_rank):
            index = (step * args.examples_per_step + rank + j * world_size) % len(train_task)
            group = list(rollouts(index, step))
            rewards = torch.cat([r for _, _, r in group])
            advantages = rewards - rewards.mean()  # relative to the group; not divided by the std
            rewards_seen.append(rewards.mean().item())
            for k, (inputs, targets, _) in enumerate(group):
                logp = -model(inputs, targets, loss_reduction="none").view_as(targets)
                valid = (targets >= 0).float()
                adv = advantages[k * args.device_batch_size:(k + 1) * args.device_batch_size].unsqueeze(1)
                objective = (logp * adv * valid).sum() / (valid.sum().clamp(min=1) * passes * examples_per_rank)
                scaler.backward(-objective)
        lrm = 1.0 - step / num_steps
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lrm
        scaler.step(optimizer)
        model.zero_grad(set_to_none=True)
        stats = torch.tensor([sum(rewards_seen) / len(rewards_seen), sum(searches) / len(searches)], device=device)
        if ddp:
            dist.all_reduce(stats)
            stats /= world_size
        mean_reward, mean_searches = stats.tolist()
        print0(f"step {step + 1:05d}/{num_steps:05d} | mean reward: {mean_reward:.4f} | searches/answer: {mean_searches:.2f} "
               f"| lrm: {lrm:.3f} | dt: {time.time() - t0:.2f}s")
        wandb_run.log({"step": step + 1, "reward": mean_reward, "searches": mean_searches, "lrm": lrm})
    wandb_run.finish()
    print_result("chat_rl", checkpoint_dir=checkpoint_dir, steps=num_steps, data=args.rag_data if kb else args.data,
                 kb=args.kb, mean_reward=mean_reward, searches_per_answer=mean_searches, pass_at_k=pass_k,
                 seconds=round(time.time() - t_start, 2), world_size=world_size)
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
