"""
Decode speed of the Engine (KV cache) at batch 1 and 8, eager and compiled (Engine(compile=...)) in one run, next to
naive generation (the whole sequence recomputed for every token). Uses a checkpoint if -i is given, else a randomly
initialised model of --depth (weights cast for inference as load_model casts a checkpoint's).

    python -m dev.bench_engine --depth=4 --head-dim=64 --max-seq-len=256 --tokens=256
    python -m dev.bench_engine -i sft
"""

import time

from nanochat.common import Flags, compute_init, get_compute_dtype, print0, print_result, run_cli


def main(argv=None):
    p = Flags(description="Benchmark KV-cache decoding against naive generation.")
    p.add_argument("-i", "--source", default=None, choices=["base", "mid", "sft", "rl"], help="load this checkpoint")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("--depth", type=int, default=4, help="without -i: a random model of this depth (vocab 32768)")
    p.add_argument("--head-dim", type=int, default=128, help="without -i: its head size")
    p.add_argument("--max-seq-len", type=int, default=2048, help="without -i: its context")
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
            model = GPT(build_model_config(args.depth, tokenizer.get_vocab_size(), head_dim=args.head_dim,
                                           max_seq_len=args.max_seq_len), compute_dtype=dtype)
        model.to_empty(device=device)
        model.init_weights()
        model.cast_for_inference()
    model.eval()
    # every run should decode the full length: pin the stop tokens' logits at 0 and decode greedily, so they never win
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
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
    for mode in ("eager", "compiled"):
        engine = Engine(model, tokenizer, compile=mode == "compiled")
        for batch in (1, 8):
            run = lambda: batch * sum(1 for _ in engine.generate(prompt, num_samples=batch, max_tokens=args.tokens, temperature=0))
            timed(run)  # warm up (and compile)
            results[f"{mode}_batch{batch}"] = timed(run)
    for name, tps in results.items():
        print0(f"{name:<16} {tps:10.1f} tokens/s")
    print_result("bench_engine", device=str(device), dtype=str(dtype).removeprefix("torch."), params=model.num_scaling_params()["total"],
                 prompt_tokens=args.prompt_tokens, tokens=args.tokens, tokens_per_second={k: round(v, 1) for k, v in results.items()},
                 speedup_batch1=round(results["compiled_batch1"] / results["naive_batch1"], 2),
                 compiled_over_eager={b: round(results[f"compiled_batch{b}"] / results[f"eager_batch{b}"], 2) for b in (1, 8)})


if __name__ == "__main__":
    run_cli(main)
