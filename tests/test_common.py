import json
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

from nanochat import common
from nanochat.common import Flags, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_parser():
    parser = Flags(prog="demo")
    parser.add_argument("--device-batch-size", type=int, default=32)
    parser.add_argument("--run", default="dummy")
    return parser


@pytest.mark.parametrize("argv", [["--device-batch-size=8"], ["--device_batch_size=8"], ["--device_batch_size", "8"],
                                  ["--", "--device-batch-size", "8"]])
def test_flags_take_both_spellings_and_torchrun_separator(argv):
    assert make_parser().parse_args(argv).device_batch_size == 8


def test_flag_values_keep_their_underscores():
    assert make_parser().parse_args(["--run=my_run_1"]).run == "my_run_1"


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        make_parser().parse_args(["--device-batch-sise=8"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "demo: error: unrecognized arguments: --device-batch-sise=8 (see --help)\n"


def test_dtype_override_and_its_validation(monkeypatch):
    common.get_compute_dtype.cache_clear()
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    assert common.get_compute_dtype("cpu") == (torch.float32, "NANOCHAT_DTYPE=float32")
    common.get_compute_dtype.cache_clear()
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp8")
    with pytest.raises(UserError, match="NANOCHAT_DTYPE='fp8' is not one of"):
        common.get_compute_dtype("cpu")
    common.get_compute_dtype.cache_clear()


def test_cpu_dtype_follows_the_hardware_not_a_timing(monkeypatch):
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    old = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    assert common.cpu_bf16_instructions(x86) == "avx512_bf16"
    assert common.cpu_bf16_instructions(arm) == "bf16"
    assert common.cpu_bf16_instructions(old) == "" and common.cpu_bf16_instructions("") == ""
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    decisions = set()
    for _ in range(3):  # the same answer every time: nothing is measured
        common.get_compute_dtype.cache_clear()
        decisions.add(common.get_compute_dtype("cpu"))
    common.get_compute_dtype.cache_clear()
    (dtype, reason), = decisions
    native = common.cpu_bf16_instructions()
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert reason == (f"cpu has native bf16 ({native})" if native else
                      "cpu has no native bf16 instructions (NANOCHAT_DTYPE=bfloat16 to force it)")


def test_compute_init_on_cpu_and_bad_device():
    ddp, rank, local_rank, world_size, device = common.compute_init("cpu")
    assert (ddp, rank, local_rank, world_size, device.type) == (False, 0, 0, 1, "cpu")
    with pytest.raises(UserError, match="not one of cuda, mps, cpu"):
        common.compute_init("tpu")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_compute_init_on_cpu_keeps_freed_memory_for_the_next_tensors():
    # in a fresh process (the setting is the whole process's): a freed 64 MB tensor goes back to the kernel (the next
    # one faults in its 16,384 pages again) until compute_init("cpu") has glibc keep freed blocks
    program = ("import os, torch\n"
               "from nanochat.common import compute_init\n"
               "def returned():  # KiB the process gives back when a 64 MB tensor is freed\n"
               "    x = torch.ones(16 << 20)\n"
               "    held = int(open('/proc/self/statm').read().split()[1]); del x\n"
               "    return (held - int(open('/proc/self/statm').read().split()[1])) * os.sysconf('SC_PAGE_SIZE') >> 10\n"
               "print(returned()); compute_init('cpu'); print(returned(), returned())\n")
    out = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()  # compute_init prints the device between them
    before, after = int(lines[0]), [int(n) for n in lines[-1].split()]
    assert before >= 60 << 10 and all(abs(n) <= 1024 for n in after), out  # MiB: 64 given back, then none


def test_base_dir_and_dummy_wandb(base_dir):
    assert common.get_base_dir() == str(base_dir) and base_dir.is_dir()
    run = common.init_wandb("dummy", "nanochat", {"a": 1})
    run.log({"loss": 1.0})
    run.finish()
    assert isinstance(common.init_wandb("real-name", "nanochat", {}, master_process=False), common.DummyWandb)


def test_wandb_without_an_account_is_one_clear_line(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"^--run=demo logs to wandb: .*Or set WANDB_MODE=offline, or drop --run$"):
        common.init_wandb("demo", "nanochat", {})


def test_base_dir_that_cannot_be_a_folder_is_one_line(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "a_file"))
    with pytest.raises(UserError, match=r"cannot use .*a_file as NANOCHAT_BASE_DIR \(File exists\): point it at a folder"):
        common.get_base_dir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", "~/nanochat-test-home")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.get_base_dir() == str(tmp_path / "nanochat-test-home")  # ~ means home, not a folder named ~


def test_a_closed_pipe_ends_quietly():
    """`python -m scripts.tok_eval | head -1`: the reader leaves early, the script must not print a traceback."""
    program = "from nanochat.common import run_cli\nrun_cli(lambda: [print('x' * 100) for _ in range(100_000)])"
    proc = subprocess.Popen([sys.executable, "-c", program], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=60) == 1 and proc.stderr.read() == b""


def test_result_line_is_json(capsys):
    common.print_result("demo", loss=1.5, path="/x")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"stage": "demo", "loss": 1.5, "path": "/x"}


def test_user_error_exits_with_one_line(capsys):
    def main():
        raise UserError("no tokenizer: run python -m scripts.tok_train first")
    with pytest.raises(SystemExit) as e:
        common.run_cli(main)
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: no tokenizer: run python -m scripts.tok_train first\n"


def test_flag_minimums_and_folder_names():
    import argparse
    args = argparse.Namespace(batch_size=0, temperature=float("nan"), top_k=None, lr=0.5)
    common.check_minimums(args, {"--top-k": 0, "--lr": 0})  # None: left out, a default comes later
    with pytest.raises(UserError, match=r"^-b/--batch-size=0 must be at least 1$"):
        common.check_minimums(args, {"-b/--batch-size": 1})
    with pytest.raises(UserError, match=r"^--temperature=nan must be a number >= 0$"):
        common.check_minimums(args, {"--temperature": 0})
    common.check_folder_name("--model-tag", "d20.v2_x-1")
    with pytest.raises(UserError, match=r"^--model-tag='runs/a' must be a plain folder name"):
        common.check_folder_name("--model-tag", "runs/a")
    for name in (".", ".."):  # the folder itself, or the one above: never a folder of its own
        with pytest.raises(UserError, match=f"^--kb='{re.escape(name)}' must be a plain folder name"):
            common.check_folder_name("--kb", name)
