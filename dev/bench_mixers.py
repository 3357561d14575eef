"""
Attention, hybrid and Mamba models side by side (nanochat/mamba.py): per mixer pattern and context length, training
tokens/s (eager, 4096 tokens a step), decode tokens/s at batch 1 after a prefill of that context, and the decode
cache's size. Random tokens and weights: speed does not depend on them. With --learn it also trains each pattern
with base_train on the data in $NANOCHAT_BASE_DIR (same flags, steps and tokens) and prints val bpb.

    python -m dev.bench_mixers                                  # d4 at 256, 1024, 4096 for A, AAM, M
    python -m dev.bench_mixers --learn --steps 300              # plus val bpb after 300 steps of 4096 tokens
"""

import json
import subprocess
import sys
import time

from nanochat.common import Flags, compute_init, get_compute_dtype, print0, print_result, run_cli


def measure(pattern, T, args, device, dtype):
    import torch

    from nanochat.engine import KVCache
    from nanochat.gpt import GPT, build_model_config
    config = build_model_config(args.depth, args.vocab_size, head_dim=64, max_seq_len=T, window_pattern="L", mixer_pattern=pattern)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = model.setup_optimizer()
    B = max(1, args.tokens_per_step // T)
    x = torch.randint(0, args.vocab_size, (B, T), device=device)

    def train_step():
        model(x, x).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    train_step()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        train_step()
    train_tok_s = B * T * args.train_steps / (time.perf_counter() - t0)

    model.eval()
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, T + args.decode_tokens)
        logits = model(x[:1], kv_cache=cache)
        token = logits[:, -1:].argmax(-1)
        cache_bytes = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        cache_bytes += sum(t.numel() * t.element_size() for state in cache.states.values() for t in state.values())
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            token = model(token, kv_cache=cache)[:, -1:].argmax(-1)
        decode_tok_s = args.decode_tokens / (time.perf_counter() - t0)
    # the KV cache is allocated for T + decode_tokens: report what the prefilled context itself occupies
    kv_per_token = sum(t[0, :, 0].numel() * t.element_size() for t in cache.k + cache.v)
    cache_mib = (cache_bytes - kv_per_token * args.decode_tokens) / 2 ** 20
    return {"pattern": pattern, "context": T, "train_tok_s": round(train_tok_s), "decode_tok_s": round(decode_tok_s, 1),
            "cache_mib": round(cache_mib, 3), "params": sum(p.numel() for p in model.parameters())}


def learn(pattern, args):
    """base_train for this pattern, as a user runs it; returns its JSON result."""
    flags = [f"--depth={args.depth}", f"--mixer-pattern={pattern}", "--head-dim=64", "--window-pattern=L", "--max-seq-len=256",
             "--device-batch-size=16", "--total-batch-size=4096", f"--num-iterations={args.steps}", "--warmup-steps=20",
             "--eval-every=-1", "--eval-tokens=65536", "--core-metric-every=-1", "--sample-every=-1", f"--model-tag=bench_{pattern}"]
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", *flags], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = Flags(description="Benchmark attention, hybrid and Mamba mixers.")
    p.add_argument("--patterns", default="A,AAM,M")
    p.add_argument("--contexts", default="256,1024,4096")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps, after one warmup step")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--learn", action="store_true", help="also train each pattern with base_train and compare val bpb")
    p.add_argument("--steps", type=int, default=300, help="with --learn: base_train steps per pattern")
    p.add_argument("--device-type", default="")
    args = p.parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    dtype = get_compute_dtype(device.type)[0]
    patterns, contexts = args.patterns.split(","), [int(c) for c in args.contexts.split(",")]
    rows = []
    print0(f"{'pattern':<8} {'context':>7} {'train tok/s':>12} {'decode tok/s':>13} {'cache MiB':>10}")
    for T in contexts:
        for pattern in patterns:
            rows.append(measure(pattern, T, args, device, dtype))
            r = rows[-1]
            print0(f"{pattern:<8} {T:>7} {r['train_tok_s']:>12,} {r['decode_tok_s']:>13,.1f} {r['cache_mib']:>10.3f}")
    learned = {}
    if args.learn:
        for pattern in patterns:
            result = learn(pattern, args)
            learned[pattern] = {"val_bpb": result["val_bpb"], "tokens": result["tokens"], "tok_per_sec": result["tok_per_sec"]}
            print0(f"{pattern:<8} val bpb {result['val_bpb']:.4f} after {result['tokens']:,} tokens")
    print_result("bench_mixers", device=str(device), dtype=str(dtype).removeprefix("torch."), depth=args.depth, rows=rows,
                 learned=learned)


if __name__ == "__main__":
    run_cli(main)
