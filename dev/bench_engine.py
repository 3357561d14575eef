"""
Decode speed of the Engine (KV cache) at batch 1 and 8, next to naive generation (the whole sequence recomputed
for every token). Uses a checkpoint if one exists (-i/-g), else a randomly initialised model of --depth.

    python -m dev.bench_engine --depth=4 --tokens=128
    python -m dev.bench_engine -i sft
"""

import time

from nanochat.common import Flags, compute_init, get_compute_dtype, print0, print_result, run_cli


def main(argv=None):
    p = Flags(description="Benchmark KV-cache decoding against naive generation.")
    p.add_argument("-i", "--source", default=None, choices=["base", "mid", "sft", "rl"], help="load this checkpoint")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("--depth", type=int, default=4, help="without -i: a random model of this depth (vocab 32768)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128, help="tokens to decode per run")
    p.add_argument("--device-type", default="")
    args = p.parse_args(argv)
    import torch

    from nanochat.engine import Engine
    from nanochat.gpt import GPT, build_model_config

    _, _, _, _, device = compute_init(args.device_type)
    dtype = get_compute_dtype(device.type)[0]
    if args.source:
        from nanochat.checkpoint_manager import load_model
        model, tokenizer, _ = load_model(args.source, device, dtype, model_tag=args.model_tag)
    else:
        from nanochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
        with torch.device("meta"):
            model = GPT(build_model_config(args.depth, tokenizer.get_vocab_size()), compute_dtype=dtype)
        model.to_empty(device=device)
        model.init_weights()
    model.eval()
    # every run should decode the full length: pin the stop tokens' logits at 0 and decode greedily, so they never win
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.get_bos_token_id()] + [i % 200 + 10 for i in range(args.prompt_tokens - 1)]

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        n = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.time() - t0)

    results = {}
    results["naive_batch1"] = timed(lambda: len(list(model.generate(prompt, args.tokens, temperature=0))))
    for batch in (1, 8):
        run = lambda: batch * sum(1 for _ in engine.generate(prompt, num_samples=batch, max_tokens=args.tokens, temperature=0))
        timed(run)  # warm up
        results[f"engine_batch{batch}"] = timed(run)
    for name, tps in results.items():
        print0(f"{name:<14} {tps:10.1f} tokens/s")
    print_result("bench_engine", device=str(device), params=model.num_scaling_params()["total"], prompt_tokens=args.prompt_tokens,
                 tokens=args.tokens, tokens_per_second={k: round(v, 1) for k, v in results.items()},
                 speedup_batch1=round(results["engine_batch1"] / results["naive_batch1"], 2))


if __name__ == "__main__":
    run_cli(main)
