"""
The CORE metric of a base model: 22 in-context tasks from the DCLM eval bundle (downloaded once).
Writes $NANOCHAT_BASE_DIR/base_eval/base_model_<step>.csv.

    python -m scripts.base_eval --max-per-task=100
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval
"""

import csv
import os

from nanochat.common import (Flags, compute_cleanup, compute_init, get_base_dir, get_compute_dtype, print0, print_result,
                             run_cli)


def main(argv=None):
    p = Flags(description="Evaluate a base model's CORE metric.")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1 = all)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    args = p.parse_args(argv)

    from nanochat.checkpoint_manager import load_model
    from nanochat.core_eval import evaluate_core, get_eval_bundle

    ddp, rank, _, _, device = compute_init(args.device_type)
    bundle = get_eval_bundle() if rank == 0 else None  # rank 0 fetches; the others wait at the barrier
    if ddp:
        import torch.distributed as dist
        dist.barrier()
    bundle = bundle or get_eval_bundle()
    model, tokenizer, meta = load_model("base", device, get_compute_dtype(device.type)[0], model_tag=args.model_tag, step=args.step)
    out = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, bundle=bundle)
    print0(f"CORE: {out['core_metric']:.4f}")
    path = os.path.join(get_base_dir(), "base_eval", f"base_model_{meta['step']:06d}.csv")
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Task", "Accuracy", "Centered"])
            for task, accuracy in out["results"].items():
                writer.writerow([task, f"{accuracy:.6f}", f"{out['centered_results'][task]:.6f}"])
            writer.writerow(["CORE", "", f"{out['core_metric']:.6f}"])
    print_result("base_eval", step=meta["step"], core_metric=out["core_metric"], results=out["results"],
                 centered_results=out["centered_results"], csv=path)
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
