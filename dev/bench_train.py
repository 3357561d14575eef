"""
Training throughput of the model at a given depth: tokens/s, MFU (on GPUs with a known peak) and peak memory.
Random tokens, so no data or tokenizer is needed; the step is the real one (forward, backward, MuonAdamW).

    python -m dev.bench_train --depth=20 --device-batch-size=32             # one GPU
    python -m dev.bench_train --depth=4 --head-dim=64 --max-seq-len=256 --device-batch-size=8 --vocab-size=4096  # a CPU
    python -m dev.bench_train ... --activation-checkpointing   # (memory is the process's peak on a CPU: one run each)
    python -m dev.bench_train --depth=20 --fp8                 # the big matmuls in fp8 (CUDA, Hopper or newer)
"""

import time

from nanochat.common import (Flags, compute_cleanup, compute_init, get_compute_dtype, get_peak_flops, peak_memory_mib,
                             print0, print_result, run_cli)


def time_steps(step_model, model, optimizer, x, y, steps):
    """3 warmup training steps, then `steps` timed ones -> (warmup seconds, seconds a step). The reference's model and
    optimizer take the same calls (dev/bench_train_reference.py)."""
    def step():
        loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device

    t0 = time.time()
    for _ in range(3):
        step()
    warmup = time.time() - t0
    t0 = time.time()
    for _ in range(steps):
        step()
    return warmup, (time.time() - t0) / steps


def main(argv=None):
    p = Flags(description="Benchmark training throughput.")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 3 warmup steps")
    p.add_argument("--compile", choices=["0", "1"], default="1")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--fp8", action="store_true", help="train the big matmuls in fp8, as base_train --fp8 does")
    p.add_argument("--device-type", default="")
    args = p.parse_args(argv)
    import torch

    from nanochat.gpt import GPT, build_model_config, enable_fp8

    _, _, _, world_size, device = compute_init(args.device_type)
    dtype, _ = get_compute_dtype(device.type)
    config = build_model_config(args.depth, args.vocab_size, args.aspect_ratio, args.head_dim, args.max_seq_len, args.window_pattern)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = model.setup_optimizer()
    model.activation_checkpointing = args.activation_checkpointing
    if args.fp8:
        enable_fp8(model)
    step_model = model
    if args.compile == "1":  # as base_train compiles: the model, and the optimizer's updates
        if device.type == "cuda":
            model.prepare_flex_attention()  # sliding windows through FlexAttention, as in base_train
        step_model = torch.compile(model, dynamic=False)
        optimizer.compile()
    B, T = args.device_batch_size, args.max_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)

    warmup, dt = time_steps(step_model, model, optimizer, x, y, args.steps)
    tok_per_sec = B * T / dt
    peak = get_peak_flops(device)
    mfu = 100 * model.estimate_flops() * tok_per_sec / peak if peak else None
    params = model.num_scaling_params()["total"]
    print0(f"d{args.depth} ({params / 1e6:.1f}M params, {dtype}) on {device}: {dt * 1000:.1f} ms/step, "
           f"{tok_per_sec:,.0f} tok/s, MFU {f'{mfu:.1f}%' if mfu else 'n/a'}, peak memory {peak_memory_mib(device):,.0f} MiB "
           f"(warmup {warmup:.1f}s)")
    print_result("bench_train", depth=args.depth, params=params, device=str(device), dtype=str(dtype).removeprefix("torch."),
                 window_pattern=args.window_pattern, compiled=args.compile == "1", fp8=args.fp8, activation_checkpointing=args.activation_checkpointing, device_batch_size=B, max_seq_len=T, ms_per_step=round(dt * 1000, 2),
                 tok_per_sec=round(tok_per_sec), mfu=mfu, peak_memory_mib=round(peak_memory_mib(device)), warmup_seconds=round(warmup, 1))
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
