"""
Plumbing every stage shares: where artifacts live, which device and compute dtype to use,
distributed init from torchrun's environment, rank-0 printing and logging, wandb (or a no-op),
command-line flags in both spellings, one-line user errors, and the JSON result line.
"""

import argparse
import functools
import json
import logging
import math
import os
import re
import sys

# torch is imported inside the functions that need it, so that data and tokenizer tools start fast.


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, no network). Scripts print it as one line."""


def get_base_dir():
    """Every artifact (data, tokenizer, checkpoints, reports) lives under $NANOCHAT_BASE_DIR."""
    base = os.path.expanduser(os.environ.get("NANOCHAT_BASE_DIR") or os.path.join("~", ".cache", "nanochat"))
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use {base} as NANOCHAT_BASE_DIR ({e.strerror}): point it at a folder you can write") from None
    return base


# -----------------------------------------------------------------------------
# Device and compute dtype

def autodetect_device_type():
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_bf16_instructions(cpuinfo=None):
    """
    The CPU's native bf16 instructions named in /proc/cpuinfo (x86: avx512_bf16, amx_bf16; Arm: bf16), or "" when
    it has none or cannot tell (not Linux). A fact about the hardware, so every run and every rank decides alike.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return ""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | Arm
            flags.update(value.split())
    return " ".join(sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"}))


@functools.cache
def get_compute_dtype(device_type):
    """
    The one place the compute dtype is decided. Returns (dtype, reason).
    Weights stay fp32 masters; activations and matmuls run in this dtype (no autocast).
    Decided from what the hardware is, never from a timing. Under torchrun, rank 0 decides for every rank: the
    first call after the process group is up (compute_init makes it) is collective, later calls return the cache.
    """
    import torch
    import torch.distributed as dist
    dtype, reason = _choose_compute_dtype(device_type)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        choice = [str(dtype).removeprefix("torch."), reason]
        dist.broadcast_object_list(choice, src=0)
        if dist.get_rank() != 0:
            dtype, reason = getattr(torch, choice[0]), f"{choice[1]} (rank 0's choice)"
    return dtype, reason


def _choose_compute_dtype(device_type):
    import torch
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    forced = os.environ.get("NANOCHAT_DTYPE")
    if forced:
        if forced not in names:
            raise UserError(f"NANOCHAT_DTYPE={forced!r} is not one of {', '.join(names)}: fix or unset it")
        return names[forced], f"NANOCHAT_DTYPE={forced}"
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return torch.bfloat16, f"CUDA SM {major}.{minor} has native bf16"
        return torch.float32, f"CUDA SM {major}.{minor} < 8.0 has no fast bf16 (NANOCHAT_DTYPE=float16 to opt in)"
    if device_type == "cpu":
        # with native bf16 (avx512_bf16, AMX, Arm bf16) bf16 matmuls ran 2.1-3.4x faster than fp32 on the 2-core
        # EPYC these tests run on; without, bf16 is emulated and slower than fp32
        found = cpu_bf16_instructions()
        if found:
            return torch.bfloat16, f"cpu has native bf16 ({found})"
        return torch.float32, "cpu has no native bf16 instructions (NANOCHAT_DTYPE=bfloat16 to force it)"
    return torch.float32, f"{device_type}: fp32 by default (NANOCHAT_DTYPE=bfloat16 saves memory, runs slower)"


# Dense bf16 tensor-core peak FLOP/s by GPU name, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
# Peak memory bandwidth in bytes/s by GPU name (the vendors' datasheets), for inference's MBU. "H100" is the SXM part
# (torch names it "H100 80GB HBM3"), "A100" the 40GB parts. Unknown devices (and CPUs) report no MBU.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12, "B200": 8e12,
                  "A100": 1.555e12, "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "L40S": 0.864e12,
                  "A10G": 0.6e12, "L4": 0.3e12, "RTX 4090": 1.008e12, "RTX 3090": 0.936e12}


def lookup_gpu(table, name):
    """The entry for the longest key that is a whole word of the GPU's name ("L4" is not "L40S", "H200" not "GH200")."""
    matches = [k for k in table if re.search(rf"(?<![A-Za-z0-9]){re.escape(k)}(?![A-Za-z0-9])", name)]
    return table[max(matches, key=len)] if matches else None


def get_peak_flops(device):
    if device.type != "cuda":
        return None
    import torch
    return lookup_gpu(PEAK_FLOPS, torch.cuda.get_device_name(device))


def get_peak_bandwidth(device):
    if device.type != "cuda":
        return None
    import torch
    return lookup_gpu(PEAK_BANDWIDTH, torch.cuda.get_device_name(device))


def peak_memory_mib(device):
    """Peak GPU memory allocated on CUDA; the process's peak resident memory elsewhere."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -----------------------------------------------------------------------------
# Distributed

def is_ddp_requested():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment; (False, 0, 0, 1) for plain python."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type=""):
    """Pick the device, seed, and join the process group when launched by torchrun (NCCL on CUDA, gloo otherwise)."""
    import torch
    import torch.distributed as dist
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device-type={device_type!r} is not one of cuda, mps, cpu (or '' to autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type=cuda but torch sees no CUDA GPU: drop the flag to autodetect")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device-type=mps but MPS is not available: drop the flag to autodetect")
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
    else:
        device = torch.device(device_type)
    setup_logging(rank)
    if device_type == "cpu":
        keep_freed_memory()
    if ddp and int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size:  # more than one machine
        check_shared_base_dir(rank, device)
    dtype, reason = get_compute_dtype(device_type)
    print0(f"device: {device} | world size: {world_size} | compute dtype: {dtype} ({reason})")
    return ddp, rank, local_rank, world_size, device


def keep_freed_memory():
    """
    Have glibc keep the memory that tensors free inside the process, for the next ones. By default it hands each large
    block back to the kernel (above 32 MB always mapped apart, and the heap's top trimmed), so every training step
    faults its big tensors in again, page by page and zeroed: at d4 on 2 cores (bf16) the fp32 logits' 64 MB cost ~12
    ms of faults per pass, and whole steps ran 1.13-1.21x slower. Caching allocators (PyTorch's on CUDA, jemalloc) keep
    memory too; the process's footprint stays near its peak. Returns whether glibc took the settings (not on macOS).
    """
    import ctypes
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1


def check_shared_base_dir(rank, device):
    """
    A run over several machines needs one NANOCHAT_BASE_DIR that all of them see (NFS, Lustre, ...): rank 0 alone
    writes each checkpoint's model and meta, every rank its optimizer shard, and a resume reads them all. Rank 0
    leaves a marker there; every rank looks for it, and all agree on the answer before any work starts.
    """
    import secrets

    import torch
    import torch.distributed as dist
    base = get_base_dir()
    name = [f".rank0-{secrets.token_hex(8)}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    marker = os.path.join(base, name[0])
    if rank == 0:
        os.makedirs(base, exist_ok=True)
        open(marker, "w").close()
    dist.barrier()
    seen = torch.tensor([os.path.exists(marker)], dtype=torch.int32, device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    dist.barrier()
    if rank == 0:
        os.remove(marker)
    if not seen.item():
        raise UserError(f"this run spans several machines, but not all of them see rank 0's NANOCHAT_BASE_DIR ({base}): "
                        "put it on a filesystem every machine mounts at the same path (checkpoints and resumes need it)")


def compute_cleanup():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Printing, logging, wandb

def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def setup_logging(rank=0):
    """INFO on rank 0, warnings only elsewhere, so an 8-GPU run does not print everything 8 times."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


class DummyWandb:
    """Stands in for a wandb run when --run=dummy (the default) or on non-zero ranks: nothing needs an account."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run, project, config, master_process=True):
    if run == "dummy" or not master_process:
        return DummyWandb()
    import wandb  # imported lazily: only real runs need it
    try:
        return wandb.init(project=project, name=run, config=config)
    except wandb.errors.Error as e:  # no account, no network: say how to do without
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"--run={run} logs to wandb: {reason} Or set WANDB_MODE=offline, or drop --run") from None


# -----------------------------------------------------------------------------
# Flags and results

class Flags(argparse.ArgumentParser):
    """
    argparse that takes every flag in both spellings (--device-batch-size and --device_batch_size),
    answers a bad flag in one line, and ignores the '--' that torchrun users put before script flags.
    Declare flags in kebab-case.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] == ["--"]:
            args = args[1:]
        normalized = []
        for a in args:
            if a.startswith("--") and len(a) > 2:
                name, eq, value = a.partition("=")
                a = name.replace("_", "-") + eq + value
            normalized.append(a)
        return super().parse_args(normalized, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_minimums(args, minimums):
    """
    minimums: {flag: lowest}, the flag as its help names it ("--max-seq-len" or "-b/--batch-size"). A value below
    its lowest, or a float that is not a finite number (nan compares false with everything), is one line naming the
    flag; None (left out: a default comes later) passes.
    """
    for flag, lowest in minimums.items():
        value = getattr(args, flag.rpartition("--")[2].replace("-", "_"))
        if value is not None and not (math.isfinite(value) and value >= lowest):
            raise UserError(f"{flag}={value} must be {'a number >= ' if isinstance(value, float) else 'at least '}{lowest}")


def check_folder_name(flag, name):
    """A checkpoint tag is one folder: 'runs/a' would be written where load_model never looks."""
    if name is not None and (not re.fullmatch(r"[\w.-]+", name) or not name.strip(".")):  # '..' is no folder of its own
        raise UserError(f"{flag}={name!r} must be a plain folder name (letters, digits, '_', '-', '.')")


def print_result(stage, **fields):
    """
    The last stdout line of every script: one JSON object that run scripts and tools read (rank 0 only).
    Pipeline stages' results also become their section of the report card.
    """
    if int(os.environ.get("RANK", 0)) != 0:
        return
    result = {"stage": stage, **fields}
    from nanochat.report import log_result  # here, not at the top: report imports this module
    log_result(result)
    print(json.dumps(result), flush=True)


def run_cli(main):
    """Run a script's main(); a UserError ends the process with one clear line instead of a traceback."""
    import gc
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`... | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(1)
    finally:
        # training loops freeze and disable the GC for speed; undone here too, when they end early, so shutdown
        # finds no frozen objects (which some extensions report as leaks)
        gc.unfreeze()
        gc.enable()
