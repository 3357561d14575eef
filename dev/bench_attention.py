"""
One attention layer's forward and backward at training shapes: SDPA's backends (causal) against FlexAttention over
a sliding window (what a short "S" layer runs in a compiled GPU step) and SDPA with the window as an explicit mask.
The defaults are d20's rows: batch 32, 10 heads of 128, 2048 tokens, a 512-token window.

    python -m dev.bench_attention                   # a GPU (times with CUDA events, median)
    python -m dev.bench_attention --batch=1 --heads=2 --seq=256 --head-dim=64 --window=64   # a CPU (no Flex backward)
"""

import time

from nanochat.common import Flags, print_result, run_cli


def main(argv=None):
    p = Flags(description="Benchmark attention kernels forward and backward.")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    B, H, T, D, W = args.batch, args.heads, args.seq, args.head_dim, args.window
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    grad = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, generator=gen)

    def timed(attend):
        def run():
            attend(q, k, v).backward(grad)
            q.grad = k.grad = v.grad = None
        for _ in range(3):
            run()
        if cuda:
            import triton.testing
            return triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
        t0 = time.perf_counter()
        for _ in range(5):
            run()
        return (time.perf_counter() - t0) / 5 * 1000

    def causal_within(window):
        return lambda b, h, qi, ki: (ki <= qi) & (qi - ki <= window)

    def sdpa_with(backend):
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attend

    flex = torch.compile(flex_attention, dynamic=False)
    whole = create_block_mask(causal_within(T), None, None, T, T, device=device)
    windowed = create_block_mask(causal_within(W), None, None, T, T, device=device)
    ones = torch.ones(T, T, dtype=torch.bool, device=device)
    mask = ones.tril() & ~ones.tril(-W - 1)  # causal, and no further back than W
    candidates = {"sdpa causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    if cuda:
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            candidates[f"sdpa causal, {name.lower()}"] = sdpa_with(getattr(SDPBackend, name))
    candidates["flex causal"] = lambda q, k, v: flex(q, k, v, block_mask=whole)
    candidates[f"flex window {W}"] = lambda q, k, v: flex(q, k, v, block_mask=windowed)
    candidates[f"sdpa window {W} as a mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ms = {}
    for name, attend in candidates.items():
        try:
            ms[name] = round(timed(attend), 3)
            print(f"{name:34s} {ms[name]:9.3f} ms")
        except (RuntimeError, NotImplementedError) as e:  # e.g. FlexAttention has no backward on a CPU
            print(f"{name:34s} not run: {str(e).split('. ')[0]}")
    print_result("bench_attention", device=device, batch=B, heads=H, seq=T, head_dim=D, window=W, ms_forward_backward=ms)


if __name__ == "__main__":
    run_cli(main)
