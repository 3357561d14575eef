"""
A base model's bits per byte on the train and val shards, plus samples: greedy completions of fixed prompts and
unconditioned samples from <|bos|>.

    python -m scripts.base_loss --split-tokens=1048576
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
"""

from nanochat.common import (Flags, UserError, compute_cleanup, compute_init, get_compute_dtype, print0, print_result,
                             run_cli)


def main(argv=None):
    p = Flags(description="Bits per byte and samples of a base model.")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens to evaluate per split")
    p.add_argument("--num-samples", type=int, default=8, help="unconditioned samples (temperature 1, 128 tokens)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    args = p.parse_args(argv)
    if args.device_batch_size < 1 or args.split_tokens < 1:
        raise UserError("--device-batch-size and --split-tokens must be positive")

    from nanochat.checkpoint_manager import load_model
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.engine import Engine
    from nanochat.loss_eval import evaluate_bpb, greedy_samples
    from nanochat.tokenizer import get_token_bytes

    ddp, rank, _, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model("base", device, get_compute_dtype(device.type)[0], model_tag=args.model_tag, step=args.step)
    T = model.config.sequence_len
    tokens_per_step = args.device_batch_size * T * world_size
    steps = max(1, args.split_tokens // tokens_per_step)
    token_bytes = get_token_bytes(device, tokenizer.get_vocab_size())
    bpb, evaluated = {}, {}
    for split in ("train", "val"):  # at most one pass over each split, however small
        loader = tokenizing_distributed_data_loader(tokenizer, args.device_batch_size, T, split, device=device, epochs=1)
        bpb[split], evaluated[split] = evaluate_bpb(model, loader, steps, token_bytes)
        loader.close()
        print0(f"{split} bpb: {bpb[split]:.6f} ({evaluated[split]:,} tokens)")

    samples = {"prompted": [], "unconditioned": []}
    if rank == 0:
        engine = Engine(model, tokenizer, compile=False)  # a few short samples: compiling would not pay
        samples["prompted"] = greedy_samples(engine, tokenizer)
        if args.num_samples > 0:
            sequences, _ = engine.generate_batch([tokenizer.get_bos_token_id()], num_samples=args.num_samples,
                                                 max_tokens=engine.answer_budget(1, 128), temperature=1.0)
            samples["unconditioned"] = [tokenizer.decode(s[1:]) for s in sequences]
        for kind, texts in samples.items():
            print0(f"--- {kind} samples ---")
            for text in texts:
                print0(repr(text))
    print_result("base_loss", step=meta["step"], train_bpb=bpb["train"], val_bpb=bpb["val"], tokens_evaluated=evaluated,
                 samples=samples)
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
