"""The sandbox against hostile programs. Each runs in a real subprocess."""

import os
import time

import pytest

from nanochat.execution import execute_code


def test_happy_path_and_a_fresh_directory():
    result = execute_code("import os\nprint('hello', 6 * 7)\nopen('notes.txt', 'w').write('x')\nprint(sorted(os.listdir('.')))")
    assert result.success and result.stdout.splitlines()[0] == "hello 42"
    assert "notes.txt" in result.stdout and "program.py" in result.stdout


def test_exceptions_are_reported():
    result = execute_code("def f():\n    return 1 / 0\nf()")
    assert not result.success and result.error == "ZeroDivisionError: division by zero"


def test_infinite_loop_is_killed():
    t0 = time.time()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert result.timeout and not result.success and time.time() - t0 < 5


def test_memory_bomb_hits_the_limit():
    result = execute_code("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_bytes=256 * 2**20)
    assert not result.success and result.memory_exceeded and "allocated" not in result.stdout


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()",
    "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
    "import subprocess\nsubprocess.Popen(['sh', '-c', ':(){ :|:& };:'])",
])
def test_fork_bombs_cannot_fork(bomb):
    t0 = time.time()
    result = execute_code(bomb, timeout=3.0)
    assert not result.success and not result.timeout and time.time() - t0 < 3


def test_files_outside_cannot_be_deleted(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    for attack in (f"import os\nos.remove({str(victim)!r})", f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
                   f"import shutil\nshutil.rmtree({str(folder)!r})", f"import os\nos.rename({str(victim)!r}, 'mine')"):
        assert not execute_code(attack).success
    assert victim.read_text() == "keep me" and folder.is_dir()


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import os\nprint(dict(os.environ))")
    assert result.success and "hunter2" not in result.stdout and "NANOCHAT_TEST_SECRET" not in result.stdout


@pytest.mark.parametrize("attack", [
    "import os\nos.system('echo pwned')",
    "import subprocess\nsubprocess.run(['echo', 'pwned'])",
    "import os\nos.execv('/bin/echo', ['echo', 'pwned'])",
    "import os\nos.popen('echo pwned').read()",
    "import os\nos.posix_spawn('/bin/echo', ['echo', 'pwned'], {})",
    "import pty\npty.spawn('/bin/echo')",
])
def test_programs_cannot_be_started(attack):
    result = execute_code(attack)
    assert not result.success and "pwned" not in result.stdout


def test_endless_output_is_capped():
    result = execute_code("while True:\n    print('x' * 1000)", timeout=10.0, output_bytes=64 * 1024)
    assert not result.success and not result.timeout and len(result.stdout) <= 64 * 1024
    assert result.error == "output limit exceeded"
