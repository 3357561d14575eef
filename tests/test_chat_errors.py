"""The chat scripts' flags, checked before any work: each mistake is one UserError line (run_cli prints it), never a
traceback, a 0.0 score or a run that saves nothing. Scripts run in-process through main(argv)."""

import socket

import pytest

from nanochat import checkpoint_manager as cm
from nanochat.common import UserError
from scripts import chat_cli, chat_eval, chat_rl, chat_web
from test_chat_web import make_chat_model_dir


def make_chat_checkpoint(root, tokenizer):
    """A tiny sft model with 320 positions whose greedy answers never end on their own."""
    make_chat_model_dir(root, tokenizer, "chatsft_checkpoints", sequence_len=32)


@pytest.mark.parametrize("flags, message", [
    (["-b", "0"], "-b/--batch-size=0 must be at least 1"),
    (["-b", "-1"], "-b/--batch-size=-1 must be at least 1"),
    (["-m", "0"], "-m/--max-new-tokens=0 must be at least 1"),
    (["-m", "-5"], "-m/--max-new-tokens=-5 must be at least 1"),
    (["-n", "0"], "-n/--num-samples=0 must be at least 1"),
    (["-x", "-3"], "-x/--max-problems=-3 must be at least 1"),
    (["-x", "0"], "-x/--max-problems=0 must be at least 1"),
    (["-k", "-1"], "-k/--top-k=-1 must be at least 0"),
    (["-t", "nan"], "-t/--temperature=nan must be a number >= 0"),
    (["-t", "inf"], "-t/--temperature=inf must be a number >= 0"),
    (["-t", "-1"], "-t/--temperature=-1.0 must be a number >= 0"),
])
def test_chat_eval_flags(flags, message):
    with pytest.raises(UserError, match=f"^{message}$".replace("+", r"\+")):
        chat_eval.main(["-i", "sft", *flags])


def test_chat_eval_answers_fit_the_model(base_dir, tokenizer):
    make_chat_checkpoint(base_dir, tokenizer)  # 320 positions; answers of up to 2000 tokens once ran past them
    chat_eval.main(["-i", "sft", "-a", "SpellingBee", "-m", "2000", "-x", "1"])


@pytest.mark.parametrize("flag, message", [
    ("--device-batch-size=0", "--device-batch-size=0 must be at least 1"),
    ("--eval-every=0", "--eval-every=0 must be at least 1"),
    ("--save-every=0", "--save-every=0 must be at least 1"),
    ("--examples-per-step=0", "--examples-per-step=0 must be at least 1"),
    ("--num-samples=0", "--num-samples=0 must be at least 1"),
    ("--num-epochs=0", "--num-epochs=0 must be at least 1"),
    ("--max-new-tokens=0", "--max-new-tokens=0 must be at least 1"),
    ("--num-steps=0", "--num-steps=0 must be at least 1, or -1 for --num-epochs over the problems"),
    ("--temperature=nan", "--temperature=nan must be a number >= 0"),
    ("--matrix-lr=-0.1", "--matrix-lr=-0.1 must be a number >= 0"),
])
def test_chat_rl_flags(flag, message):
    with pytest.raises(UserError, match=f"^{message}$".replace("+", r"\+")):
        chat_rl.main(["--data=offline", flag])


def test_chat_rl_needs_a_step_and_answers_fit_the_model(base_dir, tokenizer):
    make_chat_checkpoint(base_dir, tokenizer)
    with pytest.raises(UserError, match="^--examples-per-step=9000 is more than the 8000 training problems, so an epoch "
                                        "has no step: lower it, or give --num-steps$"):
        chat_rl.main(["--data=offline", "--examples-per-step=9000"])
    # answers of up to 1000 tokens once ran past the model's 320 positions
    chat_rl.main(["--data=offline", "--num-steps=1", "--examples-per-step=1", "--num-samples=1", "--device-batch-size=1",
                  "--eval-examples=1", "--max-new-tokens=1000", "--temperature=0"])
    assert cm.checkpoint_steps(str(base_dir / "chatrl_checkpoints" / "d4")) == [1]


@pytest.mark.parametrize("flags, message", [
    (["-p", "hi", "-t", "nan"], "-t/--temperature=nan must be a number >= 0"),
    (["-p", "hi", "-k", "-1"], "-k/--top-k=-1 must be at least 0"),
    (["-p", ""], "-p/--prompt is empty: give the text to answer, or leave -p out to chat"),
    (["-p", "  "], "-p/--prompt is empty: give the text to answer, or leave -p out to chat"),
])
def test_chat_cli_flags(flags, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        chat_cli.main(flags)


@pytest.mark.parametrize("flags, message", [
    (["-p", "99999"], "^-p/--port=99999 must be between 1 and 65535$"),
    (["-p", "0"], "^-p/--port=0 must be between 1 and 65535$"),
    (["--read-timeout", "nan"], "--read-timeout a number of seconds more than 0$"),
    (["--read-timeout", "inf"], "--read-timeout a number of seconds more than 0$"),
    (["-n", "99"], "--num-gpus=99"),  # on CPU: one worker, so -n is refused; on GPUs: there are not 99
    (["--host", "192.0.2.1", "-p", "8123"], r"^cannot listen on 192.0.2.1:8123 \(.*\): give a --host address of this "
                                            "machine, and a -p port you may use$"),  # an address of no machine here
])
def test_chat_web_flags(flags, message):
    with pytest.raises(UserError, match=message):
        chat_web.main(flags)


def test_chat_web_on_a_port_in_use_says_so_before_loading_the_model():
    with socket.socket() as taken:  # no checkpoint exists: the bind is checked first
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"^port {port} on 127.0.0.1 is already in use: stop what is serving "
                                            "there, or pick another port with -p$"):
            chat_web.main(["--host", "127.0.0.1", "-p", str(port)])
