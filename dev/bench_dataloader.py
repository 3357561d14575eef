"""
Throughput of the pretraining loader (tokens per second per rank) at a given batch shape and thread count.
Training at d24 eats ~100k tokens/s per H100 rank; the loader should stay far above that.

    python -m dev.bench_dataloader --threads 1,2,4 --device-batch-size 32 --max-seq-len 2048
"""

import time

from nanochat.common import Flags, print_result, run_cli
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.tokenizer import get_tokenizer


def measure(tokenizer, B, T, threads, steps, warmup=3):
    loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", tokenizer_threads=threads)
    for _ in range(warmup):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(loader)
    dt = time.perf_counter() - t0
    loader.close()
    return B * T * steps / dt


def main(argv=None):
    parser = Flags(description="Benchmark the pretraining data loader.")
    parser.add_argument("--threads", default="1,2,4", help="comma-separated tokenizer thread counts to try")
    parser.add_argument("--device-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="batches timed per setting")
    args = parser.parse_args(argv)
    tokenizer = get_tokenizer()
    results = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        tps = measure(tokenizer, args.device_batch_size, args.max_seq_len, threads, args.steps)
        results[str(threads)] = round(tps)
        print(f"threads {threads}: {tps / 1e6:.2f}M tokens/s per rank (B={args.device_batch_size}, T={args.max_seq_len})")
    print_result("bench_dataloader", tokens_per_second=results, device_batch_size=args.device_batch_size,
                 max_seq_len=args.max_seq_len, vocab_size=tokenizer.get_vocab_size())


if __name__ == "__main__":
    run_cli(main)
