"""
Inference benchmark: what a checkpoint costs to run (latency, throughput, memory, bandwidth), measured on the path
chat_cli and chat_web decode on (Engine.generate with its KV cache), over prompt lengths and batch sizes.

Inference has two regimes. Prefill reads the whole prompt in one pass: big matmuls, compute-bound. Decode makes one
token per row per step and re-reads every weight and the whole KV cache for a little math: memory-bandwidth-bound,
so batching is nearly free until compute saturates. MBU (model bandwidth utilisation: bytes a decode step must read,
per second, over the device's peak) is decode's counterpart of training's MFU.

    python -m scripts.infer_bench -i sft --prompt-tokens 128,512 --batch-sizes 1,4,16 --decode-tokens 64   # d4 on a CPU
    python -m scripts.infer_bench -i base -g d20 --prompt-tokens 128,512,2048                               # one GPU

It prints a static card (parameters, bytes per token of KV cache, the bandwidth ceiling), then a table row per
(prompt length, batch size) as it goes, then the JSON line. Runs on a CPU, MPS or one CUDA GPU; MBU, MFU and the
ceiling need a GPU named in the peak tables of nanochat/common.py (elsewhere they are n/a).
"""

import os
import statistics
import time

from nanochat.common import (Flags, UserError, check_minimums, compute_init, get_dist_info, get_peak_bandwidth,
                             get_peak_flops, peak_memory_mib, print0, print_result, run_cli)

GPU_BATCH_SIZES, CPU_BATCH_SIZES = "1,8,32,128", "1,4,16"
WARMUP_TOKENS = 4  # each row first runs this many steps: allocator, kernels (cuBLAS, attention), caches and compiling warm


def parse_sizes(flag, text):
    """'128,512' -> [128, 512]; anything else is one line naming the flag."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdecimal() and int(p) > 0 for p in parts):
        raise UserError(f"{flag}={text!r} must be a comma-separated list of whole numbers >= 1, e.g. 1,8,32")
    return [int(p) for p in parts]


def build_prompt(tokenizer, num_tokens):
    """<|bos|> and natural text, exactly num_tokens long (greedy decoding from random ids tends to degenerate)."""
    paragraph = ("The history of science is the study of the development of science, including both the natural and "
                 "social sciences. Science is a body of empirical, theoretical, and practical knowledge about the world. ")
    text = paragraph
    while len(tokenizer.encode(text)) < num_tokens:
        text += text
    return tokenizer.encode(text, prepend="<|bos|>")[:num_tokens]


# -----------------------------------------------------------------------------
# What the architecture implies, before measuring anything

def mamba_layers(model):
    from nanochat.mamba import Mamba2
    return [block.mixer for block in model.transformer.h if isinstance(block.mixer, Mamba2)]


def kv_read_bytes(model, context):
    """Bytes of K and V one row's decode step reads at this context: each attention layer reads its window's worth,
    n_kv_head heads of head_dim per token, in the cache's dtype (KVCache.for_model)."""
    c = model.config
    per_token = 2 * c.n_kv_head * (c.n_embd // c.n_head) * model.compute_dtype.itemsize
    return per_token * sum(min(context, w + 1) for w in model.windows if w is not None)


def static_costs(model):
    """Parameters by dtype, weight bytes (stored, and read by each decode step), KV cache and Mamba state sizes."""
    params_by_dtype = {}
    for p in model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        params_by_dtype[name] = params_by_dtype.get(name, 0) + p.numel()
    tables = {id(p) for p in [model.transformer.wte.weight, *model.value_embeds.parameters()]}
    attention_layers = sum(w is not None for w in model.windows)
    return {
        "params": sum(params_by_dtype.values()),
        "params_by_dtype": params_by_dtype,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        # a decode step reads every weight but the embedding tables, of which it only gathers its tokens' rows.
        # (Our Linear also casts each fp32 master to the compute dtype on every step: traffic not counted here.)
        "weight_bytes_read_per_step": sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables),
        "attention_layers": attention_layers,
        "mamba_layers": len(mamba_layers(model)),
        "kv_bytes_per_token": kv_read_bytes(model, 1),  # one token's K and V in every attention layer
        # a Mamba layer's decode state (conv inputs, SSM state) has one size whatever the context: bytes per row
        "mamba_state_bytes_per_row": sum(t.numel() * t.element_size() for layer in mamba_layers(model)
                                         for t in layer.empty_state(1, "meta").values()),
    }


def decode_step_bytes(model, costs, context, batch_size):
    """What one decode step must read: the weights once, and each row's KV cache at this context and Mamba state
    (reads only: writing this token's K, V and the new state is left out)."""
    per_row = kv_read_bytes(model, context) + costs["mamba_state_bytes_per_row"]
    return costs["weight_bytes_read_per_step"] + batch_size * per_row


def forward_flops(model, start, end):
    """Forward FLOPs for the tokens at positions start..end-1 over a cache of the earlier ones: 2 per matmul weight,
    4 x n_embd per key attended (q.k and the sum over v), and each Mamba layer's conv and scan (the chunked scan's
    count; a decode step does a little less)."""
    from nanochat.mamba import scan_flops
    keys = sum(min(p + 1, w + 1) for w in model.windows if w is not None for p in range(start, end))
    mamba = len(mamba_layers(model)) * scan_flops(model.config)
    return (end - start) * (2 * model.num_matmul_params() + mamba) + 4 * model.config.n_embd * keys


# -----------------------------------------------------------------------------
# Measurement

def synchronize(device):
    """Wait for the device's queued work before reading the clock (a CPU runs eagerly)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure(engine, prompt, batch_size, decode_tokens, temperature):
    """
    One generation through Engine.generate: (TTFT, decode step times), in seconds. Its first step prefills the prompt
    at batch 1, copies that cache into batch_size rows and samples the first token; each later step is one decode
    forward of all rows, then sampling. After the last token the generator runs one more forward and ends: not timed.
    """
    device = engine.model.get_device()
    steps = engine.generate(prompt, num_samples=batch_size, max_tokens=decode_tokens, temperature=temperature)
    synchronize(device)
    t0 = time.perf_counter()
    next(steps)
    synchronize(device)
    ttft, step_times = time.perf_counter() - t0, []
    while True:
        t0 = time.perf_counter()
        if next(steps, None) is None:
            return ttft, step_times
        synchronize(device)
        step_times.append(time.perf_counter() - t0)


def percent(value, peak):
    return None if value is None or peak is None else round(100 * value / peak, 3)


def bench_row(engine, prompt, batch_size, decode_tokens, temperature, costs, peaks):
    """Warm up, then time one generation; the row's figures. peaks: (bytes/s, FLOP/s), None where unknown."""
    import torch
    model, device, n = engine.model, engine.model.get_device(), len(prompt)
    # the first steps of the same generation (so the same cache size: a compiled Engine builds its graph here)
    for _ in zip(range(WARMUP_TOKENS), engine.generate(prompt, num_samples=batch_size, max_tokens=decode_tokens,
                                                       temperature=temperature)):
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttft, step_times = measure(engine, prompt, batch_size, decode_tokens, temperature)
    decode_s = sum(step_times)
    tpot = statistics.median(step_times) if step_times else None  # none when every row stopped at its first token
    context = n + decode_tokens // 2  # the median step's context: the KV it reads, the keys it attends to
    bytes_per_s = tpot and decode_step_bytes(model, costs, context, batch_size) / tpot
    flops_per_s = tpot and batch_size * forward_flops(model, context - 1, context) / tpot
    return dict(prompt_tokens=n, batch=batch_size, ttft_ms=round(1e3 * ttft, 3), prefill_tok_per_s=round(n / ttft, 1),
                tpot_ms=tpot and round(1e3 * tpot, 3), decode_ms=round(1e3 * decode_s, 3), decode_steps=len(step_times),
                decode_tok_per_s=round(batch_size * len(step_times) / decode_s, 1) if step_times else None,
                context=context, decode_gb_per_s=bytes_per_s and round(bytes_per_s / 1e9, 3),
                mbu_pct=percent(bytes_per_s, peaks[0]), decode_mfu_pct=percent(flops_per_s, peaks[1]),
                prefill_mfu_pct=percent(forward_flops(model, 0, n) / ttft, peaks[1]),  # TTFT also copies the cache to every row
                peak_memory_mib=round(peak_memory_mib(device), 1))


def fmt(value, spec, unit=""):
    return "n/a" if value is None else format(value, spec) + unit


def print_card(c):
    dtypes = ", ".join(f"{n:,} {name}" for name, n in sorted(c["params_by_dtype"].items()))
    bandwidth = fmt(c["peak_bandwidth"] and c["peak_bandwidth"] / 1e12, ".2f", " TB/s")
    compute = fmt(c["peak_flops"] and c["peak_flops"] / 1e12, ".0f", " TFLOP/s")
    print0("=" * 100)
    print0(f"model: {c['source']} {c['model_tag']} step {c['step']} | {c['n_layer']} layers (mixers {c['mixer_pattern']}, "
           f"windows {c['window_pattern']}), dim {c['n_embd']}, {c['n_head']} heads, {c['n_kv_head']} kv heads | "
           f"context {c['sequence_len']}")
    print0(f"device: {c['device_name']} | compute {c['compute_dtype']} | peak bandwidth {bandwidth} | peak compute {compute}")
    print0(f"parameters: {c['params']:,} ({dtypes}) | weights {c['weight_bytes'] / 2**20:.1f} MiB stored, "
           f"{c['weight_bytes_read_per_step'] / 2**20:.1f} MiB read per decode step (all but the embedding tables)")
    print0(f"KV cache: {c['kv_bytes_per_token']:,} bytes/token (in {c['attention_layers']} of {c['n_layer']} layers) | "
           f"Mamba state: {c['mamba_state_bytes_per_row']:,} bytes/row, whatever the context "
           f"(in {c['mamba_layers']} of {c['n_layer']} layers)")
    ceilings = ", ".join(f"{fmt(v, ',.0f', ' tok/s')} at prompt {n}" for n, v in c["decode_ceiling_batch1_tok_per_s"].items())
    print0(f"batch-1 decode ceiling (peak bandwidth / bytes per step): {ceilings} | "
           f"full-context rows that fit: {fmt(c['max_full_context_rows'], ',')}")
    print0("=" * 100)


def print_row(r, decode_tokens):
    early = "" if r["decode_steps"] == decode_tokens - 1 else " (every row ended early)"
    print0(f"{r['prompt_tokens']:>6} {r['batch']:>5} {r['ttft_ms']:>9.1f} {r['prefill_tok_per_s']:>13,.0f} "
           f"{fmt(r['tpot_ms'], '.2f'):>9} {fmt(r['decode_tok_per_s'], ',.1f'):>12} {fmt(r['decode_gb_per_s'], '.2f'):>7} "
           f"{fmt(r['mbu_pct'], '.1f'):>6} {fmt(r['decode_mfu_pct'], '.2f'):>6} {r['peak_memory_mib']:>8.0f} "
           f"{r['decode_steps']:>5}{early}")


# -----------------------------------------------------------------------------

def main(argv=None):
    p = Flags(description="Inference benchmark: TTFT, TPOT, decode throughput, MBU, MFU and peak memory of a checkpoint "
                          "over prompt lengths x batch sizes, on the Engine's KV-cache path.")
    p.add_argument("-i", "--source", default="base", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--prompt-tokens", default="2048", help="comma-separated prompt lengths, each cut so that prompt + "
                   "decode fits the model's context, sequence_len (default 2048)")
    p.add_argument("--decode-tokens", type=int, default=256, help="tokens generated per row, the first by prefill (default 256)")
    p.add_argument("--batch-sizes", default=None, help=f"comma-separated decode batch sizes (default {GPU_BATCH_SIZES} on "
                   f"CUDA, {CPU_BATCH_SIZES} elsewhere: a few minutes on 2 CPU cores at d4-d12)")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    args = p.parse_args(argv)
    check_minimums(args, {"--decode-tokens": 2, "-t/--temperature": 0})
    prompt_sizes = parse_sizes("--prompt-tokens", args.prompt_tokens)
    batch_sizes = parse_sizes("--batch-sizes", args.batch_sizes) if args.batch_sizes is not None else None
    if get_dist_info()[3] > 1:
        raise UserError("infer_bench measures one device: run it with python -m scripts.infer_bench, not torchrun")

    import torch

    from nanochat.checkpoint_manager import find_checkpoint, load_model
    from nanochat.engine import Engine

    _, _, _, _, device = compute_init(args.device_type)
    checkpoint_dir, step = find_checkpoint(args.source, args.model_tag, args.step)
    model_tag = os.path.basename(checkpoint_dir)
    model, tokenizer, _ = load_model(args.source, device, model_tag=model_tag, step=step)
    if batch_sizes is None:
        batch_sizes = parse_sizes("--batch-sizes", GPU_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES)
    # every row should decode its full length: the stop tokens' logits pinned at 0 keep greedy decoding off them while
    # any other logit is positive (a row that still ends early shows in the steps column)
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    engine = Engine(model, tokenizer)
    c = model.config

    # prompt + decode must fit the context the model was trained on
    room = c.sequence_len - args.decode_tokens
    if room < 1:
        raise UserError(f"--decode-tokens={args.decode_tokens} leaves no room for a prompt in this model's "
                        f"{c.sequence_len}-token context: use at most {c.sequence_len - 1}")
    prompts = []
    for n in prompt_sizes:
        if n > room:
            print0(f"note: --prompt-tokens {n} cut to {room}, so that prompt + {args.decode_tokens} decode tokens "
                   f"fit the model's {c.sequence_len}-token context")
        if min(n, room) not in prompts:
            prompts.append(min(n, room))

    # the static card: what the architecture implies on this device, before measuring
    costs = static_costs(model)
    peaks = get_peak_bandwidth(device), get_peak_flops(device)
    ceiling = {str(n): peaks[0] and round(peaks[0] / decode_step_bytes(model, costs, n + args.decode_tokens // 2, 1), 1)
               for n in prompts}  # tok/s at batch 1, at the median step's context
    max_rows = None
    if device.type == "cuda":  # how many rows of full-context cache fit beside the weights
        free = torch.cuda.get_device_properties(device).total_memory - costs["weight_bytes"]
        max_rows = int(free // (costs["kv_bytes_per_token"] * c.sequence_len + costs["mamba_state_bytes_per_row"]))
    card = dict(source=args.source, model_tag=model_tag, step=step, device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                compute_dtype=str(model.compute_dtype).removeprefix("torch."), n_layer=c.n_layer, n_embd=c.n_embd,
                n_head=c.n_head, n_kv_head=c.n_kv_head, sequence_len=c.sequence_len, mixer_pattern=c.mixer_pattern,
                window_pattern=c.window_pattern, **costs, peak_bandwidth=peaks[0], peak_flops=peaks[1],
                decode_ceiling_batch1_tok_per_s=ceiling, max_full_context_rows=max_rows)
    print_card(card)

    # the sweep
    header = (f"{'prompt':>6} {'batch':>5} {'TTFT ms':>9} {'prefill tok/s':>13} {'TPOT ms':>9} {'decode tok/s':>12} "
              f"{'GB/s':>7} {'MBU %':>6} {'MFU %':>6} {'mem MiB':>8} {'steps':>5}")
    print0(header)
    print0("-" * len(header))
    rows = []
    for n in prompts:
        prompt = build_prompt(tokenizer, n)
        for batch_size in batch_sizes:
            rows.append(bench_row(engine, prompt, batch_size, args.decode_tokens, args.temperature, costs, peaks))
            print_row(rows[-1], args.decode_tokens)
    print0("-" * len(header))
    print0("GB/s: bytes a decode step must read (weights but embedding tables, KV cache, Mamba state) per second"
           + ("" if device.type == "cuda" else "; mem MiB: the process's peak resident memory so far (it never goes down)"))
    print_result("infer_bench", card=card, prompt_tokens_asked=prompt_sizes, prompt_tokens=prompts,
                 decode_tokens=args.decode_tokens, batch_sizes=batch_sizes, temperature=args.temperature, rows=rows)


if __name__ == "__main__":
    run_cli(main)
