"""
Pretrain the base model. One knob, --depth, sizes everything: width and heads from depth; then the training
horizon, batch size, learning rates and weight decay follow from the model size by the rules below.

    python -m scripts.base_train --depth=4 --max-seq-len=256 ...                      # one process (CPU, 1 GPU)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20      # one node
    torchrun ... -m scripts.base_train -- --depth=32 --parallel fsdp                  # sharded (nanochat/parallel.py)
"""

import math
import os
import time

from nanochat.common import (Flags, UserError, check_folder_name, check_minimums, compute_cleanup, compute_init, get_base_dir, get_compute_dtype,
                             get_peak_flops, init_wandb, peak_memory_mib, print0, print_result, run_cli)

B_REF = 2 ** 19  # tokens per step of the d12 reference run that the hyperparameters were tuned at


def parse_args(argv):
    p = Flags(description="Pretrain a base model.")
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    p.add_argument("--fp8", action="store_true", help="train the large matmuls in fp8 (CUDA, Hopper or newer)")
    p.add_argument("--fp8-recipe", choices=["tensorwise"], default="tensorwise",
                   help="fp8 scaling; the reference measured rowwise slower (564K vs 740K tok/s at d26), so only tensorwise is here")
    # the model
    p.add_argument("--depth", type=int, default=20, help="number of layers: the one knob that sizes the model")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio (rounded to heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default=None, help="S = attend to a quarter of the context, L = all of it; tiled "
                   "over attention layers, the last always L (default SSSL; L with --hf-compatible)")
    p.add_argument("--window-long", type=int, default=0, help="tokens an L window covers (0 = the whole context)")
    p.add_argument("--window-short", type=int, default=0, help="tokens an S window covers (0 = a quarter of the "
                   "context, rounded up to 128)")
    p.add_argument("--rotary-base", type=float, default=100_000.0, help="the rotary embeddings' base (larger for longer "
                   "contexts)")
    p.add_argument("--mixer-pattern", default="A", help="each layer's sequence mixer, tiled over layers: A = attention, M = Mamba-2 (e.g. AAM), "
                   "D = DeepSeek sparse attention")
    p.add_argument("--hf-compatible", action="store_true", help="only what transformers' NanoChat model has, so that "
                   "scripts.export_hf can export it: no value embeddings, smear, backout or layer scalars; full windows")
    p.add_argument("--mamba-d-state", type=int, default=64, help="Mamba state size N")
    p.add_argument("--mamba-headdim", type=int, default=64, help="Mamba head size P; must divide expand x width")
    p.add_argument("--mamba-expand", type=int, default=2, help="Mamba inner width = expand x model width")
    p.add_argument("--mamba-chunk", type=int, default=64, help="tokens per chunk of the Mamba scan")
    p.add_argument("--mamba3-trapezoidal", action="store_true", help="Mamba-3's trapezoidal discretisation")
    p.add_argument("--mamba3-rope", action="store_true", help="Mamba-3's data-dependent rotary on B and C")
    p.add_argument("--mamba3-bc-norm", action="store_true", help="Mamba-3's RMSNorm plus bias on B and C")
    p.add_argument("--mamba-kernels", choices=["auto", "torch"], default="auto",
                   help="auto: mamba_ssm's Triton scan on CUDA where it imports; torch: always the PyTorch scan")
    p.add_argument("--dsa-top-k", type=int, default=None, help="keys each query of a sparse attention layer (D in "
                   "--mixer-pattern, nanochat/sparse_attention.py) attends to (default 2048, DeepSeek's)")
    p.add_argument("--dsa-warmup-steps", type=int, default=0, help="D layers: steps of dense warm-up at the start, "
                   "attention dense while the indexer learns it; sparse afterwards")
    p.add_argument("--engram-layers", default="", help="layers with Engram's hashed 2/3-gram memory, e.g. 1,-2 "
                   "(nanochat/engram.py; '' = none)")
    p.add_argument("--engram-rows", type=int, default=0, help="rows per Engram table (0 = 2 x the vocabulary)")
    p.add_argument("--mhc-streams", type=int, default=0, help="mHC: residual streams mixed by doubly stochastic "
                   "matrices (nanochat/mhc.py; 0 = off, DeepSeek uses 4)")
    p.add_argument("--mtp-depth", type=int, default=0, help="multi-token prediction modules (nanochat/mtp.py; 0 = off, "
                   "DeepSeek-V3 uses 1); they also draft for chat_cli/chat_web --speculative")
    p.add_argument("--mtp-lambda", type=float, default=0.3, help="the MTP loss weight; a third of it for the last third "
                   "of the steps (DeepSeek-V3's 0.3, then 0.1)")
    # the horizon, in precedence order
    p.add_argument("--num-iterations", type=int, default=-1, help="exact number of steps (-1 = derive)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="train for this compute budget (-1 = off)")
    p.add_argument("--target-param-data-ratio", type=float, default=10.5, help="tokens per scaling parameter (10.5 is compute optimal)")
    # the batch
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass (lower it on OOM)")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step (-1 = derive from the model size)")
    # fill in the middle (nanochat/fim.py): needs a tokenizer from tok_train --fim
    p.add_argument("--fim-rate", type=float, default=0.0, help="share of training documents rearranged for "
                   "fill-in-the-middle (0 = off; the paper trains at 0.5)")
    p.add_argument("--fim-spm-rate", type=float, default=0.5, help="share of those in SPM order rather than PSM")
    # the optimizer
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate")
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.28, help="Muon weight decay at the reference size (scaled)")
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument("--resume-from-step", type=int, default=-1, help="continue from this saved step (-1 = start fresh)")
    p.add_argument("--init-from", default=None, help="start from this base checkpoint tag's weights, momenta and data "
                   "position, with a schedule of its own: e.g. a long-context stage at a larger --max-seq-len (only "
                   "--max-seq-len, --window-long/-short and --rotary-base may differ from it)")
    p.add_argument("--init-from-step", type=int, default=None, help="the --init-from checkpoint's step (default: the last)")
    # evaluation, sampling and saving
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=80 * 524288, help="val tokens per evaluation (at most one pass over the split)")
    p.add_argument("--core-metric-every", type=int, default=2000, help="CORE every N steps and at the end (-1 = never)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps and at the end (-1 = never)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward pass: "
                   "only each block's input is kept, for one more forward pass of every block")
    p.add_argument("--parallel", choices=["ddp", "fsdp", "tp", "fsdp+tp"], default="ddp",
                   help="how processes share the model: ddp replicates it (optimizer state sharded), fsdp shards "
                   "everything, tp splits each block's heads and MLP over --tp ranks, fsdp+tp both (nanochat/parallel.py)")
    p.add_argument("--tp", type=int, default=0, help="ranks per tensor-parallel group (0 = every process)")
    p.add_argument("--compile", choices=["auto", "0", "1"], default="auto",
                   help="torch.compile the model (auto: on CUDA, and on CPU for runs of 500+ steps)")
    args = p.parse_args(argv)
    check_minimums(args, {"--depth": 1, "--aspect-ratio": 1, "--head-dim": 1, "--max-seq-len": 1, "--device-batch-size": 1,
                          "--embedding-lr": 0, "--unembedding-lr": 0, "--matrix-lr": 0, "--scalar-lr": 0,
                          "--weight-decay": 0, "--warmup-steps": 0, "--window-long": 0, "--window-short": 0,
                          "--dsa-warmup-steps": 0, "--engram-rows": 0, "--mhc-streams": 0, "--mtp-depth": 0,
                          "--mtp-lambda": 0})
    check_folder_name("--model-tag", args.model_tag)
    for flag in ("--fim-rate", "--fim-spm-rate"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if not 0 <= value <= 1:  # nan too
            raise UserError(f"{flag}={value} must be between 0 and 1: it is a share of the training documents")
    if args.init_from is not None and args.resume_from_step >= 0:
        p.error("--init-from starts a new run from another checkpoint, --resume-from-step continues this one: pick one")
    if args.init_from_step is not None and args.init_from is None:
        p.error("--init-from-step needs --init-from")
    if args.num_iterations <= 0 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        p.error("give a horizon: --num-iterations, --target-flops or --target-param-data-ratio")
    if not 0 <= args.warmdown_ratio <= 1:
        p.error("--warmdown-ratio must be between 0 and 1")
    if args.rotary_base <= 1:
        p.error(f"--rotary-base={args.rotary_base:g} must be above 1 (the default is 100000)")
    if args.window_long and args.window_short > args.window_long:
        p.error(f"--window-short={args.window_short} is longer than --window-long={args.window_long}")
    if args.head_dim % 2:
        p.error(f"--head-dim={args.head_dim} must be even: rotary embeddings turn pairs of dimensions")
    if args.window_pattern is None:
        args.window_pattern = "L" if args.hf_compatible else "SSSL"
    if not args.window_pattern or set(args.window_pattern.upper()) - set("SL"):
        p.error(f"--window-pattern={args.window_pattern!r} must be a string of S and L, like SSSL")
    from nanochat.gpt import MIXERS
    if not args.mixer_pattern or set(args.mixer_pattern.upper()) - set(MIXERS):
        p.error(f"--mixer-pattern={args.mixer_pattern!r} must be a string of A (attention) and M (Mamba), like AAM "
                "(or D, sparse attention)")
    if args.hf_compatible and ("S" in args.window_pattern.upper() or set(args.mixer_pattern.upper()) != {"A"}
                               or 0 < args.window_long < args.max_seq_len):
        p.error("--hf-compatible models attend to the whole context in every layer: drop --window-pattern (S), "
                "--window-long and --mixer-pattern (M, D)")
    if args.hf_compatible and (args.engram_layers or args.mhc_streams):
        p.error("--hf-compatible models have what transformers' NanoChat has: drop --engram-layers and --mhc-streams "
                "(MTP modules are dropped at export, so --mtp-depth may stay)")
    if "D" not in args.mixer_pattern.upper() and (args.dsa_top_k is not None or args.dsa_warmup_steps):
        p.error("--dsa-top-k and --dsa-warmup-steps set up sparse attention layers: put D in --mixer-pattern (e.g. AAD)")
    if args.dsa_top_k is None:
        from nanochat.gpt import GPTConfig
        args.dsa_top_k = GPTConfig.dsa_top_k
    if "D" in args.mixer_pattern.upper():
        from nanochat.sparse_attention import check_sizes
        try:
            check_sizes(model_config(args, depth=args.depth, vocab_size=1))
        except ValueError as e:
            p.error(str(e))
    if args.engram_layers:
        from nanochat.engram import engram_layers
        try:
            engram_layers(model_config(args, depth=args.depth, vocab_size=1))
        except ValueError as e:
            p.error(f"--engram-layers={args.engram_layers!r}: {e}")
    if "M" in args.mixer_pattern.upper():
        from nanochat.mamba import sizes
        try:
            sizes(model_config(args, depth=args.depth, vocab_size=1))
        except ValueError as e:
            p.error(str(e))
    return args


def model_config(args, depth, vocab_size):
    from nanochat.gpt import build_model_config
    return build_model_config(depth, vocab_size, args.aspect_ratio, args.head_dim, args.max_seq_len, args.window_pattern,
                              args.mixer_pattern.upper(), mamba_d_state=args.mamba_d_state, mamba_headdim=args.mamba_headdim,
                              mamba_expand=args.mamba_expand, mamba_chunk=args.mamba_chunk,
                              mamba3_trapezoidal=args.mamba3_trapezoidal, mamba3_rope=args.mamba3_rope,
                              mamba3_bc_norm=args.mamba3_bc_norm, hf_compatible=args.hf_compatible,
                              window_long=args.window_long, window_short=args.window_short, rotary_base=args.rotary_base,
                              dsa_top_k=args.dsa_top_k, engram_layers=args.engram_layers, engram_rows=args.engram_rows,
                              mhc_streams=args.mhc_streams, mtp_depth=args.mtp_depth, mtp_lambda=args.mtp_lambda)


def scaling_params(model):
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def depth_dial(args, model, reference_model, tokens_per_micro_step):
    """
    Batch, learning-rate scale, Muon weight decay and horizon from the model's size; reference_model is the d12
    the hyperparameters were tuned at. Returns (total_batch_size, lr_scale, weight_decay, num_iterations).
    """
    # 1) the model's data: tokens = ratio x scaling params (transformer matrices + lm_head: the counting that gave
    #    the cleanest scaling exponents). Batch and weight decay follow from it, as in the reference, even when
    #    --target-flops or --num-iterations sets a different horizon (so an isoFLOP sweep varies only the steps)
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else 10.5
    target_tokens = ratio * scaling_params(model)
    d_ref = ratio * scaling_params(reference_model)
    # 2) batch size: B_opt grows as D^0.383 (Power Lines), anchored at 2^19 tokens for d12 at the same ratio
    total_batch_size = args.total_batch_size
    if total_batch_size <= 0:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))
        if total_batch_size < tokens_per_micro_step:
            print0(f"the derived batch of {total_batch_size:,} tokens is below one micro-step; using {tokens_per_micro_step:,}")
            total_batch_size = tokens_per_micro_step
    if total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total-batch-size={total_batch_size} is not a multiple of device_batch_size x max_seq_len "
                        f"x data-parallel processes = {tokens_per_micro_step}: change one of them")
    # 3) learning rates scale with sqrt(B / B_ref); 4) weight decay with sqrt(B / B_ref) * D_ref / D (T_epoch, arXiv 2405.13698)
    lr_scale = (total_batch_size / B_REF) ** 0.5
    weight_decay = args.weight_decay * lr_scale * (d_ref / target_tokens)
    # 5) the horizon, in steps: explicit, else what the FLOP budget buys, else the model's data
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (model.estimate_flops() * total_batch_size))
    else:
        num_iterations = int(target_tokens // total_batch_size)
    return total_batch_size, lr_scale, weight_decay, max(num_iterations, 1)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    import torch
    import torch.distributed as dist

    from nanochat.checkpoint_manager import check_tokenizer, find_checkpoint, load_checkpoint, load_momenta, save_stage
    from nanochat.dataloader import resplit_states, tokenizing_distributed_data_loader
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, build_model_config, enable_fp8, mixer_kinds
    from nanochat.mamba import use_kernels
    from nanochat.sparse_attention import last_indexer_kl, set_stage
    from nanochat.loss_eval import evaluate_bpb, greedy_samples
    from nanochat.optimizers import LossScaler, lr_multiplier, muon_momentum, weight_decay_schedule
    from nanochat.parallel import check, data_split, parallelize
    from nanochat.progress import Progress
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    dtype, _ = get_compute_dtype(device.type)
    tokenizer = get_tokenizer()
    if args.fim_rate > 0 and not tokenizer.has_fim():
        from nanochat.fim import NO_FIM_TOKENS
        raise UserError(f"--fim-rate={args.fim_rate}: {NO_FIM_TOKENS}")
    token_bytes = get_token_bytes(device, tokenizer.get_vocab_size())
    core_bundle = None
    if args.core_metric_every > 0:  # fetched now, not after hours of training
        from nanochat.core_eval import get_eval_bundle
        try:
            core_bundle = get_eval_bundle()
        except UserError as e:
            raise UserError(f"{e}; or train without CORE: --core-metric-every=-1") from None
    vocab_size = tokenizer.get_vocab_size()

    # the model, on the meta device first so that nothing is allocated twice; sharded runs build it whole in host
    # memory, the same on every rank, and move only their shards to the device
    config = model_config(args, args.depth, vocab_size)
    sharded = args.parallel != "ddp"
    tp = check(args.parallel, args.tp, world_size, config)
    data_rank, data_ranks = data_split(args.parallel, tp, rank, world_size)  # the ranks of a tp group read the same rows
    build_device = torch.device("cpu") if sharded else device
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=build_device)
    model.init_weights()
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    resume = None
    if args.resume_from_step >= 0:
        # a sharded run takes the whole optimizer state (or every rank's shard of it) and cuts its own pieces
        model_state, optim_state, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, build_device, load_optimizer=True,
                                                         rank=0 if sharded else rank, world_size=1 if sharded else world_size,
                                                         step_flag="--resume-from-step")
        check_tokenizer(meta, tokenizer, checkpoint_dir)
        changed = [f"{k}: saved {v}, now {getattr(config, k)}" for k, v in meta["model_config"].items()
                   if getattr(config, k, v) != v]
        if changed:
            raise UserError(f"{checkpoint_dir} step {args.resume_from_step} is another model ({'; '.join(changed)}): "
                            "resume with the flags it was trained with, or give this run its own --model-tag")
        saved = {"fim_rate": 0.0, "fim_spm_rate": 0.5, **meta.get("user_config", {})}  # runs from before FIM: off
        fim = [f"--{k.replace('_', '-')}: saved {saved[k]}, now {getattr(args, k)}" for k in ("fim_rate", "fim_spm_rate")
               if saved[k] != getattr(args, k) and (saved["fim_rate"] or args.fim_rate)]
        if fim:  # the loader's buffered documents were rearranged with the saved settings
            raise UserError(f"{checkpoint_dir} step {args.resume_from_step} read its data otherwise ({'; '.join(fim)}): "
                            "resume with the flags it was trained with")
        model.load_state_dict(model_state, strict=True, assign=True)
        model.cast_embeddings()
        resume = (optim_state, meta)
        print0(f"resuming from {checkpoint_dir} step {args.resume_from_step}")
    init = None
    if args.init_from is not None:  # a new stage from another run: its weights now, its momenta once there is an optimizer
        init_dir, init_step = find_checkpoint("base", args.init_from, args.init_from_step)
        model_state, _, meta = load_checkpoint(init_dir, init_step, build_device, step_flag="--init-from-step")
        check_tokenizer(meta, tokenizer, init_dir)
        context = {"sequence_len", "window_long", "window_short", "rotary_base"}
        changed = [f"{k}: saved {v}, now {getattr(config, k)}" for k, v in meta["model_config"].items()
                   if k not in context and getattr(config, k, v) != v]
        if changed:
            raise UserError(f"{init_dir} step {init_step} is another model ({'; '.join(changed)}): give this run its "
                            "flags; only --max-seq-len, --window-long, --window-short and --rotary-base may differ")
        model.load_state_dict(model_state, strict=True, assign=True)
        model.cast_embeddings()
        init = (init_dir, init_step, meta)
        print0(f"starting from {init_dir} step {init_step} (trained at {meta['model_config']['sequence_len']} tokens "
               f"a row; this run: {config.sequence_len})")

    if args.fp8:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise UserError("--fp8 needs a CUDA GPU with fp8 tensor cores (Ada, Hopper or newer): drop the flag")
        if sharded:
            raise UserError(f"--fp8 casts whole weights and trains under --parallel ddp only, not {args.parallel}: drop one")
        print0(f"fp8: {enable_fp8(model)} linear layers train in fp8 ({args.fp8_recipe} scaling)")
    model = parallelize(model, args.parallel, tp, device)
    if sharded:
        print0(f"--parallel {args.parallel}: {data_ranks} data-parallel group(s) x tensor-parallel {tp}")
    counts = model.num_scaling_params()
    print0("Parameter counts:")
    for key, value in {**counts, **{f"  of which {k}": v for k, v in model.num_params_by_mixer().items()}}.items():
        print0(f"  {key:<22} {value:>15,}")
    scan = use_kernels(model, args.mamba_kernels)
    if scan:
        print0(f"mixers {''.join(mixer_kinds(config))} (tiled from {args.mixer_pattern}); the Mamba scan: {scan}")
    if "D" in mixer_kinds(config):
        every_key = " (no fewer than the context: every key, so dense)" if config.dsa_top_k >= config.sequence_len else ""
        print0(f"sparse attention: a D layer's queries attend to their top {config.dsa_top_k} keys{every_key}, after "
               f"{args.dsa_warmup_steps} dense warm-up steps")
    flops_per_token = model.estimate_flops()
    print0(f"FLOPs per token: {flops_per_token:e}")

    # --- the depth dial: batch, learning rates, weight decay and horizon from the model size ---
    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * data_ranks
    # the anchor is the attention-only d12 the hyperparameters were tuned at, whatever this model's mixers
    with torch.device("meta"):
        reference_model = GPT(build_model_config(12, vocab_size, args.aspect_ratio, args.head_dim, args.max_seq_len, args.window_pattern))
    total_batch_size, lr_scale, weight_decay, num_iterations = depth_dial(args, model, reference_model, tokens_per_micro_step)
    grad_accum_steps = total_batch_size // tokens_per_micro_step
    n_scaling = scaling_params(model)
    if resume is not None and args.resume_from_step >= num_iterations:
        raise UserError(f"--resume-from-step={args.resume_from_step} is already at or past this run's last step "
                        f"({num_iterations}): ask for more steps with --num-iterations")
    total_tokens = num_iterations * total_batch_size
    print0(f"steps: {num_iterations:,} | batch: {total_batch_size:,} tokens ({grad_accum_steps} micro-steps of "
           f"{args.device_batch_size}x{args.max_seq_len} on {data_ranks} data-parallel ranks) | tokens: {total_tokens:,} | "
           f"tokens per scaling param: {total_tokens / n_scaling:.2f} | lr scale {lr_scale:.3f} | muon wd {weight_decay:.4f}")

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
                                      matrix_lr=args.matrix_lr * lr_scale, weight_decay=weight_decay,
                                      scalar_lr=args.scalar_lr * lr_scale)
    if resume is not None:
        optimizer.load_state_dict(resume[0])
    if init is not None:
        load_momenta(optimizer, init[0], init[1], device, rank, world_size,
                     otherwise=f"pick another --init-from-step ({init[0]})")
    scaler = LossScaler(dtype, device.type)

    model.activation_checkpointing = args.activation_checkpointing
    orig_model = model  # uncompiled: saving, CORE and sampling, where shapes vary
    use_compile = args.compile == "1" or (args.compile == "auto" and (device.type == "cuda" or
                                          (device.type == "cpu" and num_iterations >= 500)))
    if use_compile:
        # on a 2-core CPU (d4, 256 wide, bf16) compiled steps take 324 ms instead of 425 ms but compiling costs ~22 s:
        # it pays after a few hundred steps (python -m dev.bench_train --compile 0|1)
        if device.type == "cuda":
            orig_model.prepare_flex_attention()  # sliding windows through FlexAttention inside the compiled model
        model = torch.compile(model, dynamic=False)
        optimizer.compile()

    # --- data ---
    loader_states = resume[1]["dataloader_state_dicts"] if resume else [None] * data_ranks
    if init is not None:  # on from where the source's data stopped (its buffered rows were packed for its length)
        loader_states = resplit_states(init[2]["dataloader_state_dicts"], data_ranks)
    if len(loader_states) != data_ranks:  # resumed on another number of processes (the optimizer state reshards too)
        print0(f"resuming {len(loader_states)} data-parallel ranks' positions on {data_ranks}: all restart where the least "
               "advanced one was, so a few documents are read again and the buffered ones skipped")
        loader_states = resplit_states(loader_states, data_ranks)
    loader_state = loader_states[data_rank]
    train_loader = tokenizing_distributed_data_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train",
                                                      device=device, resume_state=loader_state, rank=data_rank,
                                                      world_size=data_ranks, fim_rate=args.fim_rate,
                                                      fim_spm_rate=args.fim_spm_rate)
    x, y, next_state = next(train_loader)

    # --- the loop: runs num_iterations + 1 times, so the last pass evaluates and saves ---
    step = args.resume_from_step if resume else 0
    wandb_run = init_wandb(args.run, "nanochat", vars(args), master)
    progress = Progress(wandb_run, num_iterations, state=resume[1]["loop_state"] if resume else None)
    loop = progress.state  # min val bpb, the loss EMA and the training time: saved with checkpoints
    peak_flops = get_peak_flops(device)
    val_bpb, val_tokens, core_metric, mfu, tok_per_sec = None, None, None, None, None
    while True:
        last_step = step == num_iterations
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            val_loader = tokenizing_distributed_data_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val",
                                                            device=device, epochs=1, rank=data_rank, world_size=data_ranks)
            eval_steps = max(1, args.eval_tokens // tokens_per_micro_step)
            # compiled: FlexAttention on GPUs
            val_bpb, val_tokens = evaluate_bpb(model, val_loader, eval_steps, token_bytes, copies=tp)
            val_loader.close()
            progress.val_bpb(step, val_bpb, val_tokens)
            model.train()
        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            from nanochat.core_eval import evaluate_core
            orig_model.eval()
            core = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task, bundle=core_bundle)
            core_metric = core["core_metric"]
            print0(f"step {step:05d} | CORE: {core_metric:.4f}")
            wandb_run.log({"step": step, "core_metric": core_metric, "centered_results": core["centered_results"]})
            orig_model.train()
        if (master or sharded) and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            orig_model.eval()  # sharded: every rank decodes the same tokens, rank 0 prints them
            for text in greedy_samples(Engine(orig_model, tokenizer, compile=False), tokenizer):
                print0(text)
            orig_model.train()
        if last_step or (args.save_every > 0 and step > 0 and step % args.save_every == 0 and step != args.resume_from_step):
            # each rank's loader state: where it stands after the last batch it trained on
            states = [None] * world_size
            if ddp:
                dist.all_gather_object(states, loader_state)
            else:
                states = [loader_state]
            states = states[::tp]  # one per data-parallel rank (global rank = data rank x tp + tp rank)
            save_stage(checkpoint_dir, step, orig_model, optimizer, tokenizer, rank, val_bpb=val_bpb, user_config=vars(args),
                       device_batch_size=args.device_batch_size, max_seq_len=args.max_seq_len,
                       total_batch_size=total_batch_size, dataloader_state_dicts=states, loop_state=loop)
            print0(f"saved checkpoint {checkpoint_dir} step {step}")
        if last_step:
            break

        # --- one optimization step ---
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        set_stage(orig_model, "dense" if step < args.dsa_warmup_steps else "sparse")  # D layers (none: a no-op)
        orig_model.mtp_weight = args.mtp_lambda * (1 if step < 2 * num_iterations / 3 else 1 / 3)  # MTP (none: unused)
        for _ in range(grad_accum_steps):
            loss = model(x, y)
            train_loss = loss.detach()
            loss = loss / grad_accum_steps
            scaler.backward(loss)
            loader_state = next_state
            x, y, next_state = next(train_loader)  # prefetch while the GPU works
        lrm = lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step, num_iterations, args.warmdown_ratio)
                group["weight_decay"] = weight_decay_schedule(step, num_iterations, weight_decay)
        scaler.step(optimizer)
        model.zero_grad(set_to_none=True)
        train_loss_f = train_loss.item()  # syncs with the device
        indexer_kl = last_indexer_kl(orig_model)  # D layers: KL of the indexer to the attention it learns (None without)
        mtp_loss = orig_model.mtp_loss.item() if orig_model.mtp_loss is not None else None  # the modules' own, unweighted
        dt = time.time() - t0

        step += 1
        smooth_loss = progress.train_step(step, train_loss_f, dt)
        tok_per_sec = total_batch_size / dt
        mfu = 100 * flops_per_token * tok_per_sec / (peak_flops * world_size) if peak_flops else None
        done = step / num_iterations
        eta = loop["total_training_time"] / max(step - 10, 1) * (num_iterations - step) / 60
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * done:.2f}%) | loss: {smooth_loss:.6f} | lrm: {lrm:.2f} | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,.0f} | mfu: {f'{mfu:.2f}' if mfu else 'n/a'} | "
               f"epoch: {next_state['epoch']} pq: {next_state['pq_idx']} rg: {next_state['rg_idx']} | "
               f"total time: {loop['total_training_time'] / 60:.2f}m | eta: {eta:.1f}m"
               + (f" | indexer kl: {indexer_kl:.4f}" if indexer_kl is not None else "")
               + (f" | mtp loss: {mtp_loss:.4f}" if mtp_loss is not None else ""))
        if step % 100 == 0:
            wandb_run.log({"step": step, "train/loss": smooth_loss, "train/lrm": lrm, "train/dt": dt,
                           "train/tok_per_sec": tok_per_sec, "train/mfu": mfu, "train/epoch": next_state["epoch"],
                           **({"train/indexer_kl": indexer_kl} if indexer_kl is not None else {}),
                           **({"train/mtp_loss": mtp_loss} if mtp_loss is not None else {})})

    train_loader.close()
    progress.close()
    peak_mem = peak_memory_mib(device)
    print0(f"peak memory: {peak_mem:.0f} MiB | total training time: {loop['total_training_time'] / 60:.2f}m | "
           f"min val bpb: {loop['min_val_bpb']:.6f}")
    wandb_run.finish()
    print_result("base_train", model_tag=model_tag, checkpoint_dir=checkpoint_dir, step=step, depth=args.depth,
                 init_from=f"{init[0]} step {init[1]}" if init else None,
                 mixers="".join(mixer_kinds(config)), num_params=counts["total"], num_scaling_params=n_scaling, flops_per_token=flops_per_token,
                 total_batch_size=total_batch_size, num_iterations=num_iterations, tokens=total_tokens,
                 val_bpb=val_bpb, val_tokens=val_tokens, min_val_bpb=loop["min_val_bpb"], core_metric=core_metric,
                 train_loss=progress.smooth_loss,
                 tok_per_sec=tok_per_sec, mfu=mfu, total_training_time=loop["total_training_time"],
                 peak_memory_mib=round(peak_mem, 1), compute_dtype=str(dtype).removeprefix("torch."), world_size=world_size,
                 parallel=args.parallel, tp=tp,
                 curve=progress.curve)
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
