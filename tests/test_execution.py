"""
The sandbox against hostile programs. Each runs in a real subprocess, under bubblewrap where it is installed.
The attacks at the bottom are a security review's escapes from the old, Python-only sandbox.
"""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat.execution import MAX_PROCESSES, execute_code, sandbox_mode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODE = sandbox_mode()
# The Python layer is best-effort by design: this undoes its import refusals and gets a fresh posix module, so that
# what contains the programs using it is the OS layer alone.
UNGUARDED = """
import sys
sys.meta_path[:] = [finder for finder in sys.meta_path if finder.__module__.startswith("_frozen_importlib")]
for name in [name for name, module in sys.modules.items() if module is None] + ["posix"]:
    del sys.modules[name]
import posix
"""


def require_namespaces():
    """For the OS layer's tests: skip where it cannot run, but fail in CI, which installs bubblewrap. Never run them on
    the fallback, where their attacks would work (fork bombs, processes left running, files written)."""
    if MODE != "namespaces":
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no namespace sandbox: {MODE}")


def test_happy_path_and_a_fresh_directory():
    result = execute_code("import os\nprint('hello', 6 * 7)\nopen('notes.txt', 'w').write('x')\nprint(sorted(os.listdir('.')))")
    assert result.success and result.stdout.splitlines()[0] == "hello 42"
    assert "notes.txt" in result.stdout and "program.py" in result.stdout


def test_exceptions_are_reported():
    result = execute_code("def f():\n    return 1 / 0\nf()")
    assert not result.success and result.error == "ZeroDivisionError: division by zero"


def test_the_error_is_the_exceptions_line_when_tracebacks_interleave():
    """Processes dying together (a fork bomb's) interleave their tracebacks, and those killed with the sandbox stop
    mid-way: the error is still an exception's line, not the last "  File ..." fragment."""
    cut = 'Traceback (most recent call last):\\n  File "program.py", line 8, in <module>\\n'
    code = f"import sys\nsys.stderr.write('{cut}BlockingIOError: [Errno 11] again\\n{cut}')\nsys.exit(1)"
    result = execute_code(code)
    assert not result.success and result.error == "BlockingIOError: [Errno 11] again"
    only_cut = execute_code(f"import sys\nsys.stderr.write('{cut}')\nsys.exit(1)")  # no exception's line: the last line
    assert only_cut.error == '  File "program.py", line 8, in <module>'


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


# --- isolation by the operating system, and the fallback without it


def test_namespace_sandbox_is_available():
    require_namespaces()


def test_runs_as_a_throwaway_user():
    require_namespaces()
    program = """
import json
import os
capabilities = open('/proc/self/status').read().split('CapEff:')[1].split()[0]
print(os.getuid(), os.getgroups(), capabilities)
"""
    first, second = (execute_code(program).stdout.split(" ", 1) for _ in range(2))
    assert first[1] == second[1] == "[] 0000000000000000\n"  # no supplementary groups, no capabilities
    if os.getuid() == 0:  # root's sandboxes each get their own unused uid, so their process counts are their own
        assert first[0] != second[0] and int(first[0]) >= 10**9
    else:  # a user's own uid, in a user namespace
        assert first[0] == second[0] == str(os.getuid())


@pytest.mark.parametrize("bwrap", ["missing", "refusing"])
def test_fallback_says_so_once_and_still_runs(bwrap, tmp_path, capfd):
    path = tmp_path / "bwrap"
    if bwrap == "refusing":  # as in a container that may not make namespaces
        path.write_text("#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\nexit 1\n")
        path.chmod(0o755)
    assert [execute_code("print(6 * 7)", bwrap=str(path)).stdout for _ in range(2)] == ["42\n", "42\n"]
    notice = capfd.readouterr().err.splitlines()
    assert len(notice) == 1 and "no namespace sandbox" in notice[0]
    assert ("install bubblewrap" if bwrap == "missing" else "No permissions to create a new namespace") in notice[0]
    assert sandbox_mode(str(path)) != "namespaces"


def parent_running(code):
    """Run code in the sandbox from a helper process holding a secret in its environment; returns the helper's run."""
    driver = "import sys\nfrom nanochat.execution import execute_code\nprint(execute_code(sys.stdin.read()))"
    return subprocess.run([sys.executable, "-c", driver], input=code, cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "NANOCHAT_TEST_SECRET": "hunter2"})


@pytest.mark.parametrize("unguarded", [False, True], ids=["guarded", "unguarded"])
def test_parent_and_other_processes_cannot_be_signalled(unguarded):
    if unguarded:
        require_namespaces()
    neighbour = subprocess.Popen(["sleep", "60"])
    try:
        parent = parent_running((UNGUARDED if unguarded else "import posix\n") + f"""
import signal
for pid in (posix.getppid(), {neighbour.pid}):
    try:
        posix.kill(pid, signal.SIGTERM)
    except OSError as e:
        print(e)
""")
        assert parent.returncode == 0 and "ExecutionResult" in parent.stdout  # the old sandbox's parent got SIGTERM
        assert neighbour.poll() is None
    finally:
        neighbour.kill()
        neighbour.wait()


def test_parent_secrets_cannot_be_read_from_proc():
    require_namespaces()
    parent = parent_running("""
import json
import os
for pid in [os.getppid()] + [pid for pid in os.listdir('/proc') if pid.isdigit()]:
    try:
        print(pid, open(f'/proc/{pid}/environ').read())
    except OSError as e:
        print(e)
""")
    assert parent.returncode == 0 and "success=True" in parent.stdout and "hunter2" not in parent.stdout


@pytest.mark.parametrize("attack, unguarded", [
    ("import posix\nposix.system({cmd!r})", False),
    ("import sys\ndel sys.modules['ctypes']\nimport ctypes\nctypes.CDLL(None).system({cmd!r}.encode())", False),
    ("import _ctypes\nprint('ran')", False),
    ("import importlib, os\nimportlib.reload(os)\nos.system({cmd!r})", False),
    (UNGUARDED + "posix.system({cmd!r})", True),
    (UNGUARDED + "import ctypes\nctypes.CDLL(None).system({cmd!r}.encode())", True),
], ids=["posix", "ctypes", "_ctypes", "reload-os", "unguarded-posix", "unguarded-ctypes"])
def test_commands_cannot_touch_the_host(attack, unguarded, tmp_path):
    if unguarded:
        require_namespaces()
    victim = tmp_path / "pwned"
    for bwrap in ["bwrap"] if unguarded else ["bwrap", None]:  # the Python layer must hold on its own too
        result = execute_code(attack.format(cmd=f"echo ran; touch {victim}"), bwrap=bwrap)
        assert not victim.exists()
        assert ("ran" in result.stdout) == unguarded  # the Python layer stops the review's attacks; the OS the rest


def test_the_filesystem_is_read_only_and_the_project_hidden(tmp_path):
    require_namespaces()
    targets = [str(tmp_path / "written"), os.path.join(REPO, "written-by-the-sandbox")]
    result = execute_code(f"""
for path in {targets!r}:
    try:
        open(path, 'w').write('x')
    except OSError as e:
        print(e)
print(open({os.path.join(REPO, 'README.md')!r}).read())
""")
    assert not any(os.path.exists(path) for path in targets)
    assert not result.success and "FileNotFoundError" in result.error


def test_survivors_die_at_the_timeout():
    require_namespaces()
    marker = f"1000.{time.time_ns()}"  # a sleep that would outlive the program, found by its command line
    assert execute_code(UNGUARDED + f"""
import time
if posix.fork() == 0:
    posix.setsid()
    posix.execv('/bin/sleep', ['sleep', {marker!r}])
time.sleep(60)
""", timeout=1.0).timeout

    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:  # exited meanwhile
            return b""
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and marker.encode() in cmdline(pid)]


def test_fork_bombs_hit_the_process_limit_alone():
    require_namespaces()
    result = execute_code(UNGUARDED + "while True:\n    posix.fork()", timeout=10.0)
    assert not result.timeout and "BlockingIOError" in result.error  # every process gave up: the bomb ended
    # four bombs at once, each holding what it got: each gets (nearly) the whole limit, not a share of it
    holder = UNGUARDED + """
import time
n = 0
try:
    while True:
        if posix.fork() == 0:
            time.sleep(60)
        n += 1
except OSError:
    print(n, flush=True)
time.sleep(60)
"""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: execute_code(holder, timeout=3.0), range(4)))
    assert all(MAX_PROCESSES - 2 <= int(r.stdout) < MAX_PROCESSES for r in results), [r.stdout for r in results]


def test_no_network_not_even_loopback():
    require_namespaces()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = execute_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('in')")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert not result.success and "in" not in result.stdout and "ConnectionRefusedError" in result.error


def test_benchmark_runs_both_modes():
    proc = subprocess.run([sys.executable, "-m", "dev.bench_execution", "--runs", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == MODE and set(result["median_ms"]) == {"trivial", "humaneval"}
    modes = {"python_only", "namespaces"} if MODE == "namespaces" else {"python_only"}
    assert set(result["median_ms"]["humaneval"]) == modes
