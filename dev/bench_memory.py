"""
Training memory per rank under each --parallel mode, and what fits on an 80 GB GPU.

Parameters, gradients and optimizer state follow from the parameter shapes and how each mode cuts them
(nanochat/parallel.py, nanochat/optimizers.py). Activations are measured: saved-tensor hooks count what autograd
keeps for the backward pass, on small bf16 models under every mode on 4 CPU processes (gloo), and per-token
coefficients are fitted from them (per layer and width, split and unsplit by tensor parallelism; per vocabulary
entry). A model the fit did not see is then measured whole next to what the formulas say. Then the tables for
d20-d32 at --seq-len on --gpus GPUs: bytes per rank, and the largest power-of-two device batch size that fits.

    python -m dev.bench_memory                    # 8 GPUs, tp 2, 2048-token rows
    python -m dev.bench_memory --gpus 16 --tp 4

What the fit cannot see: kernels' workspaces, the allocator's fragmentation, NCCL buffers and the CUDA context
(the budget leaves 4.6 GiB of an 80 GB card for them), and attention's own saved state on GPUs (FlashAttention keeps
the output and one float per head and token, as the CPU kernel here does).
"""

import json
import math
import os
import subprocess
import sys

GIB = 2 ** 30
BUDGET = 75 * GIB  # of the 79.6 GiB an 80 GB H100 shows
ROW = 64  # tokens per row in the measurements


def divisor(name, mode, world, tp):
    """How many ranks share each element of parameter `name` (see nanochat/parallel.py)."""
    from nanochat.parallel import split_by_tp
    split = split_by_tp(name)
    return {"ddp": 1, "fsdp": world, "tp": tp if split else 1, "fsdp+tp": world if split else world // tp}[mode]


def static_bytes(model, mode, world, tp):
    """Per rank: parameters, gradients, optimizer state, and the largest transient buffers (bytes)."""
    from nanochat.optimizers import _row_sharded
    params = dict(model.named_parameters())
    size = lambda name: params[name].numel() * params[name].element_size()
    out = {"params": sum(size(n) / divisor(n, mode, world, tp) for n in params)}
    out["grads"] = out["params"]
    groups = {}
    for name, p in params.items():
        if name.startswith("transformer.h.") and p.ndim == 2:
            groups.setdefault(tuple(p.shape), []).append(name)
    muon = {n for names in groups.values() for n in names}
    adamw = sum(8 * params[n].numel() / (divisor(n, mode, world, tp) if mode != "ddp" else
                                         world if _row_sharded(params[n], world) else 1) for n in params if n not in muon)
    if mode == "ddp":  # each rank owns whole matrices of each shape group: ceil(K / world) of them
        momentum = sum(math.ceil(len(names) / world) * 4 * math.prod(shape) for shape, names in groups.items())
    else:
        momentum = sum(4 * params[n].numel() / divisor(n, mode, world, tp) for n in muon)
    out["optimizer"] = adamw + momentum
    # Muon needs one shape group whole at a time: ddp's reduce-scatter buffer; sharded, the gathered list and its stack
    largest_group = max(4 * len(names) * math.prod(shape) for shape, names in groups.items())
    transient = largest_group * (1 if mode == "ddp" else 2)
    if "fsdp" in mode:  # the gathered weights: a block and the next one prefetched (compute dtype), the root's lm_head
        block = max(sum(p.numel() for p in b.parameters()) for b in model.transformer.h)
        transient += 2 * 2 * block / (tp if mode == "fsdp+tp" else 1) + 4 * model.lm_head.weight.numel()
    out["transient"] = transient
    return out


def activation_bytes(coef, config, rows, mode, tp, checkpointing=False):
    """Saved for the backward pass, per rank, for `rows` rows of config.sequence_len tokens (fitted coefficients)."""
    C, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.sequence_len
    split = tp if "tp" in mode else 1
    per_layer = (coef["layer_unsplit"] + coef["layer_split"] / split) * C
    if checkpointing:  # only each block's input (and its value embedding) is kept; one block's insides at a time
        return rows * T * (L * 2 * C * 1.5 + per_layer + coef["vocab"] * V + coef["other"] * C)
    return rows * T * (L * per_layer + coef["vocab"] * V + coef["other"] * C)


def casts_bytes(model, mode, tp):
    """Batch-independent saved tensors: the compute-dtype copies our Linear makes of fp32 weights (none where FSDP
    gathers them already cast, nanochat/parallel.py); the root's head stays fp32 under FSDP, so it is cast."""
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    head = model.lm_head.weight.numel()
    return 2 * ({"ddp": blocks, "tp": blocks / tp}.get(mode, 0) + head)


def meta_model(config):
    import torch

    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config, compute_dtype=torch.bfloat16)
    model.cast_embeddings()
    return model


# -----------------------------------------------------------------------------
# Measuring: run under torchrun on 4 CPU processes

def measure_configs():
    from nanochat.gpt import build_model_config
    small = lambda depth, width, vocab: build_model_config(depth, vocab, aspect_ratio=width // depth, head_dim=16,
                                                          max_seq_len=ROW, window_pattern="SSSL")
    return {"d2": small(2, 128, 2048), "d4": small(4, 128, 2048), "d2v": small(2, 128, 4096), "d6": small(6, 192, 2048)}


def measure_one(config, mode, tp, rows, compiled=False):
    """One training step of a bf16 model under mode (torch.compile'd: after a first step that compiles it): bytes
    this rank holds of each kind."""
    import torch
    from torch.distributed.tensor import DTensor

    from nanochat.gpt import GPT
    from nanochat.parallel import parallelize
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights()
    model = parallelize(model, mode, tp, torch.device("cpu"))
    optimizer = model.setup_optimizer()
    x = torch.randint(0, config.vocab_size, (rows, ROW + 1), generator=torch.Generator().manual_seed(1))
    forward = model
    if compiled:
        forward = torch.compile(model, dynamic=False)
        forward(x[:, :-1], x[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    weights = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = forward(x[:, :-1], x[:, 1:])
    storages = {}  # what is still allocated once the forward pass is done (FSDP has freed its gathered weights)
    for t in saved:
        s = local(t).untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
    activations = sum(storages.values())
    saved.clear()
    loss.backward()
    grads = nbytes(local(p.grad) for p in model.parameters())
    optimizer.step()
    state = nbytes(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": nbytes(local(p) for p in model.parameters()), "grads": grads, "optimizer": state,
            "activations": activations}


def worker():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {}
    for mode, tp in (("ddp", 1), ("fsdp", 1), ("tp", world), ("fsdp+tp", 2)):
        for name, config in measure_configs().items():
            for rows in (1, 2):
                results[f"{mode}/{name}/{rows}"] = measure_one(config, mode, tp, rows)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        print(json.dumps({"world": world, "ranks": everyone}))
    dist.destroy_process_group()


def fit(m, world, compiled=None):
    """
    Per-token activation coefficients (bytes per unit of width or vocabulary) from one rank's measurements m,
    {"mode/config/rows": ...}. compiled: ddp's measurements under torch.compile, which keeps fewer tensors; its
    per-layer figure then scales both parts of the eager split (not measured under tp: compiling there is slow).
    """
    per_row = lambda mode, name: m[f"{mode}/{name}/2"]["activations"] - m[f"{mode}/{name}/1"]["activations"]
    configs = measure_configs()
    C, V = configs["d2"].n_embd, configs["d2"].vocab_size
    layer = lambda mode: (per_row(mode, "d4") - per_row(mode, "d2")) / (2 * ROW * C)  # d4 has 2 layers more
    whole, quarter = layer("ddp"), layer("tp")  # tp over 4: split part / 4
    split = (whole - quarter) * world / (world - 1)
    coef = {"layer_unsplit": whole - split, "layer_split": split,
            "vocab": (per_row("ddp", "d2v") - per_row("ddp", "d2")) / (ROW * (configs["d2v"].vocab_size - V))}
    coef["other"] = (per_row("ddp", "d2") / ROW - 2 * whole * C - coef["vocab"] * V) / C
    if compiled is None:
        return coef
    plain = fit({**compiled, **{k: v for k, v in m.items() if k.startswith("tp/")}}, world)
    scale = (plain["layer_unsplit"] + plain["layer_split"]) / whole
    return {"layer_unsplit": coef["layer_unsplit"] * scale, "layer_split": coef["layer_split"] * scale,
            "vocab": plain["vocab"], "other": plain["other"]}


def main(argv=None):
    from nanochat.common import Flags, UserError, print_result
    p = Flags(description="Training memory per rank under each --parallel mode.")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size for tp (every GPU) is --gpus; this is fsdp+tp's")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--depths", default="20,24,26,32")
    args = p.parse_args(argv)
    import dataclasses

    from nanochat.gpt import build_model_config
    from nanochat.parallel import MODES, check

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                          "-m", "dev.bench_memory", "--worker"], capture_output=True, text=True, env=env, timeout=1200)
    if run.returncode:  # one line: the error the measuring processes ended in
        last = next((line for line in reversed(run.stderr.splitlines()) if "Error" in line), "no error line")
        raise UserError(f"the 4 measuring processes failed ({last.strip()[:200]}): run python -m torch.distributed.run "
                        "--standalone --nproc-per-node=4 -m dev.bench_memory --worker to see why")
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    world = measured["world"]
    coef = fit(measured["ranks"][0], world)
    compiled = {f"ddp/{name}/{rows}": measure_one(config, "ddp", 1, rows, compiled=True)
                for name, config in measure_configs().items() if name != "d6" for rows in (1, 2)}
    coef_compiled = fit(measured["ranks"][0], world, compiled)
    for label, c in (("eager", coef), ("compiled", coef_compiled)):
        print(f"activations, bytes per token (bf16, {label}): per layer {c['layer_unsplit']:.1f} x width unsplit + "
              f"{c['layer_split']:.1f} x width / tp; {c['vocab']:.2f} x vocabulary; {c['other']:.1f} x width outside the blocks")

    # the check: a model the fit did not see, measured whole on every rank, next to the formulas
    config = measure_configs()["d6"]
    model = meta_model(config)
    print(f"\nd6, width {config.n_embd}, 2 rows of {ROW} tokens, per rank (MiB), measured / computed:")
    print(f"{'mode':<8} {'params':>15} {'grads':>15} {'optimizer':>15} {'activations':>15}")
    checks = {}
    for mode, tp in (("ddp", 1), ("fsdp", 1), ("tp", world), ("fsdp+tp", 2)):
        got = measured["ranks"][0][f"{mode}/d6/2"]
        want = static_bytes(model, mode, world, tp)
        want["activations"] = activation_bytes(coef, config, 2, mode, tp) + casts_bytes(model, mode, tp)
        checks[mode] = {k: {"measured": got[k], "computed": round(want[k])} for k in got}
        print(f"{mode:<8} " + " ".join(f"{got[k] / 2**20:>7.2f} /{want[k] / 2**20:>6.2f}" for k in got))

    print(f"\nper rank on {args.gpus} GPUs, rows of {args.seq_len} tokens, bf16 compute, fp32 masters (GiB); "
          f"batch: the largest power-of-two device batch size within {BUDGET / GIB:.0f} GiB, eager / compiled / with "
          "--activation-checkpointing (eager); activations per row: eager / compiled")
    print("| depth | params | mode | params | grads | optimizer | transient | activations per row | device batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = []
    for depth in map(int, args.depths.split(",")):
        config = build_model_config(depth, args.vocab_size, max_seq_len=args.seq_len)
        model = meta_model(config)
        n = sum(p.numel() for p in model.parameters())
        for mode in MODES:
            tp = {"ddp": 1, "fsdp": 1, "tp": args.gpus, "fsdp+tp": args.tp}[mode]
            try:
                check(mode, tp, args.gpus, config, planned=True)
            except Exception as e:  # the heads do not split this way
                print(f"| d{depth} | {n / 1e9:.2f}B | {mode} | {str(e).split(':')[0]} |||||")
                continue
            static = static_bytes(model, mode, args.gpus, tp)
            fixed = sum(static.values()) + casts_bytes(model, mode, tp)
            row, row_compiled = (activation_bytes(c, config, 1, mode, tp) for c in (coef, coef_compiled))
            fits = lambda c, ac=False: max([b for b in (2 ** i for i in range(8))
                                            if fixed + activation_bytes(c, config, b, mode, tp, ac) <= BUDGET], default=0)
            batches = {"eager": fits(coef), "compiled": fits(coef_compiled), "checkpointing": fits(coef, True)}
            table.append({"depth": depth, "params": n, "mode": mode, "tp": tp, **{k: round(v) for k, v in static.items()},
                          "activations_per_row": round(row), "activations_per_row_compiled": round(row_compiled),
                          "device_batch_size": batches})
            print(f"| d{depth} | {n / 1e9:.2f}B | {mode}{f' (tp {tp})' if 'tp' in mode else ''} | "
                  + " | ".join(f"{static[k] / GIB:.1f}" for k in ("params", "grads", "optimizer", "transient"))
                  + f" | {row / GIB:.2f} / {row_compiled / GIB:.2f} | " + " / ".join(str(b or "no") for b in batches.values()) + " |")
    print_result("bench_memory", gpus=args.gpus, tp=args.tp, seq_len=args.seq_len, budget_gib=BUDGET / GIB,
                 coefficients=coef, coefficients_compiled=coef_compiled, check_d6=checks, table=table,
                 measured_config=dataclasses.asdict(measure_configs()["d6"]))


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        from nanochat.common import run_cli
        run_cli(main)
