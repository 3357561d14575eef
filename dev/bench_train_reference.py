"""
The reference nanochat's training step timed as dev/bench_train.py times this repo's: its GPT at the same depth and
width, its setup_optimizer (MuonAdamW), torch.compile as its base_train does, random tokens. For side-by-side runs on
a GPU (on a CPU, ../shared/tools/sidebyside.sh trains both on real data). Give it an exported copy of the reference:

    mkdir -p /tmp/ref && git -C <a clone of karpathy/nanochat> archive HEAD | tar -x -C /tmp/ref   # never inside this repo
    python -m dev.bench_train_reference --reference=/tmp/ref --depth=20 --window-pattern=L
    python -m dev.bench_train --depth=20 --window-pattern=L  # this repo, same shapes and FLOPs per token
"""

import argparse
import json
import os
import sys

from dev.bench_train import time_steps  # before the reference's nanochat replaces this one


def main():
    p = argparse.ArgumentParser(description="Benchmark the reference nanochat's training step.")
    p.add_argument("--reference", required=True, help="root of an exported karpathy/nanochat tree")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 3 warmup steps")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.reference, "nanochat", "gpt.py")):
        sys.exit(f"error: no nanochat/gpt.py under {args.reference}: give --reference the root of the reference's tree")
    sys.path.insert(0, os.path.abspath(args.reference))  # its nanochat package, not this one
    for name in [m for m in sys.modules if m == "nanochat" or m.startswith("nanochat.")]:
        del sys.modules[name]
    import torch

    import nanochat.flash_attention as reference_attention
    from nanochat.common import COMPUTE_DTYPE, get_peak_flops
    from nanochat.gpt import GPT, GPTConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    width = -(-args.depth * 64 // args.head_dim) * args.head_dim  # as its base_train rounds: whole heads
    heads = width // args.head_dim
    config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=heads,
                       n_kv_head=heads, n_embd=width, window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = model.setup_optimizer()
    step_model = torch.compile(model, dynamic=False)
    B, T = args.device_batch_size, args.max_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)

    warmup, dt = time_steps(step_model, model, optimizer, x, y, args.steps)
    tok_per_sec = B * T / dt
    cuda = device.type == "cuda"
    mfu = 100 * model.estimate_flops() * tok_per_sec / get_peak_flops(torch.cuda.get_device_name(device)) if cuda else None
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    print(f"reference d{args.depth}, window {args.window_pattern}, {COMPUTE_DTYPE}, FA3 {reference_attention.HAS_FA3}: "
          f"{dt * 1000:.1f} ms/step, {tok_per_sec:,.0f} tok/s, MFU {f'{mfu:.1f}%' if mfu else 'n/a'}, "
          f"peak memory {f'{peak:,.0f} MiB' if peak else 'n/a'}")
    print(json.dumps({"stage": "bench_train_reference", "depth": args.depth, "window_pattern": args.window_pattern,
                      "device": str(device), "dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
                      "fa3": reference_attention.HAS_FA3, "flops_per_token": model.estimate_flops(),
                      "ms_per_step": round(dt * 1000, 2), "tok_per_sec": round(tok_per_sec), "mfu": mfu,
                      "peak_memory_mib": round(peak) if peak else None, "warmup_seconds": round(warmup, 1)}))


if __name__ == "__main__":
    main()
