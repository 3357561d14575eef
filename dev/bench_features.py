"""
The code-model features side by side: one base_train run each, the same depth, data, steps and tokens, against the
plain model. Prints each run's val bpb, training tok/s and peak memory, and their ratios to the baseline's.
Runs on the pretraining data and tokenizer in NANOCHAT_BASE_DIR (the README uses the Shakespeare corpus):

    python -m dev.bench_features                          # d4, 150 steps of 2048 tokens, every feature
    python -m dev.bench_features --steps=300 --features=baseline,mtp

FIM needs a tokenizer trained with tok_train --fim and is left out unless that one is in place.
"""

import json
import subprocess
import sys

from nanochat.common import Flags, UserError, print_result, run_cli

FEATURES = {
    "baseline": [],
    "mtp": ["--mtp-depth=1"],
    "engram": ["--engram-layers=1"],
    "mhc": ["--mhc-streams=4"],
    "dsa": ["--mixer-pattern=AD", "--dsa-top-k=64"],  # warm-up steps: a fifth of the run, added below
    "fim": ["--fim-rate=0.5"],
}


def speculative_speedup(model_tag, max_tokens=120):
    """Greedy decoding of the sample prompts, plain and self-speculative, side by side: identical output, the drafts'
    hit rate, and tokens/s of each."""
    import time

    import torch

    from nanochat.checkpoint_manager import load_model
    from nanochat.common import get_compute_dtype
    from nanochat.engine import Engine
    from nanochat.loss_eval import SAMPLE_PROMPTS
    model, tokenizer, _ = load_model("base", torch.device("cpu"), get_compute_dtype("cpu")[0], model_tag=model_tag)
    seconds, outputs, speculative = {}, {}, Engine(model, tokenizer, speculative=True)
    for name, engine in (("plain", Engine(model, tokenizer)), ("speculative", speculative)):
        t0, outputs[name], tokens = time.time(), [], 0
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            out = [c[0][0] for c in engine.generate(ids, max_tokens=engine.answer_budget(len(ids), max_tokens), temperature=0)]
            outputs[name].append(out)
            tokens += len(out)
        seconds[name] = tokens / (time.time() - t0)
    drafts = speculative.drafts
    return {"identical": outputs["plain"] == outputs["speculative"], "acceptance": round(drafts["accepted"] / drafts["proposed"], 3),
            "plain_tok_per_sec": round(seconds["plain"], 1), "speculative_tok_per_sec": round(seconds["speculative"], 1),
            "speedup": round(seconds["speculative"] / seconds["plain"], 3)}


def main(argv=None):
    p = Flags(description="Train the model with each code-model feature, side by side with the plain one.")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--features", default=",".join(f for f in FEATURES if f != "fim"), help="comma-separated, from "
                   + ", ".join(FEATURES))
    args = p.parse_args(argv)
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    if unknown := [f for f in features if f not in FEATURES]:
        raise UserError(f"--features: unknown {', '.join(unknown)}; pick from {', '.join(FEATURES)}")
    common = [f"--depth={args.depth}", f"--max-seq-len={args.max_seq_len}", f"--device-batch-size={args.device_batch_size}",
              f"--total-batch-size={args.device_batch_size * args.max_seq_len}", f"--num-iterations={args.steps}",
              "--eval-every=-1", f"--eval-tokens={40 * args.device_batch_size * args.max_seq_len}",
              "--core-metric-every=-1", "--sample-every=-1", "--compile=0"]
    rows = {}
    for feature in features:
        extra = FEATURES[feature] + ([f"--dsa-warmup-steps={args.steps // 5}"] if feature == "dsa" else [])
        cmd = [sys.executable, "-m", "scripts.base_train", *common, f"--model-tag=bench-{feature}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{feature}: {proc.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[feature] = {"val_bpb": round(r["val_bpb"], 4), "tok_per_sec": round(r["tok_per_sec"]),
                         "peak_memory_mib": r["peak_memory_mib"], "params": r["num_params"],
                         "flops_per_token": r["flops_per_token"]}
        print(f"{feature:9s} val bpb {r['val_bpb']:.4f} | {r['tok_per_sec']:,.0f} tok/s | "
              f"{r['peak_memory_mib']:.0f} MiB | {r['num_params']:,} params", flush=True)
    if "mtp" in rows:
        rows["mtp"]["speculative"] = speculative_speedup("bench-mtp")
    if "baseline" in rows:
        base = rows["baseline"]
        for row in rows.values():
            row["tok_per_sec_ratio"] = round(row["tok_per_sec"] / base["tok_per_sec"], 3)
            row["memory_ratio"] = round(row["peak_memory_mib"] / base["peak_memory_mib"], 3)
    print_result("bench_features", depth=args.depth, steps=args.steps, tokens=args.steps * args.device_batch_size *
                 args.max_seq_len, rows=rows)


if __name__ == "__main__":
    run_cli(main)
