"""
Run model-written Python (HumanEval answers) in a sandbox with two layers.

The operating system is the boundary. On Linux with bubblewrap (`bwrap`, 0.8 or later), each run gets new PID,
network, mount, IPC, UTS and cgroup namespaces: it sees only its own processes (a fresh /proc: not the parent's
environment), no network but its own loopback, and a read-only filesystem holding only the system directories (/usr,
/lib, /etc, ...) and Python's install, plus a private tmpfs at /tmp (its working directory, at most memory_bytes). As
root, bwrap keeps only CAP_SETUID/CAP_SETGID and sets no_new_privs (setuid programs grant nothing), and the guard
becomes a throwaway user: a random uid with no passwd entry, no groups and no capabilities, whose process count
(RLIMIT_NPROC) is that run's alone. Without root the program runs as the user, inside a user namespace that cannot
make more: the best available, as it owns nothing in the sandbox but is the user's own uid outside. At the timeout the
namespace's init is killed, and the kernel kills everything in the namespace before this returns.

The second layer, inside Python and best-effort as before: limits on address space, CPU time, file size (which caps
the output) and, with namespaces, processes; the dangerous functions of os and posix set to None; ctypes,
_posixsubprocess, multiprocessing and the like refused at import; a scrubbed environment; no stdin. It stops accidents
and naive attacks; a determined program gets around it.

Without bwrap, without namespaces (e.g. an unprivileged container) or off Linux, one line on stderr says so and runs
get the second layer alone: the network, the filesystem and other processes are then within reach. What remains with
namespaces: the kernel itself (every syscall is allowed; as root the program can make user namespaces, as there is no
seccomp filter), and memory and CPU time are bounded per process (times MAX_PROCESSES), not per run.
"""
import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

MAX_PROCESSES = 16  # processes and threads per sandbox (RLIMIT_NPROC); a HumanEval program needs one
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

# Runs in the child before the program, which arrives on stdin: drop root, limits, then remove what must not be called.
GUARD = r"""
import builtins, faulthandler, os, posix, resource, shutil, subprocess, sys
memory, cpu_seconds, output_bytes, processes, uid = (int(a) for a in sys.argv[1:6])
source = sys.stdin.buffer.read()
if uid:  # root started bwrap: become the throwaway user (setuid also drops every capability)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
with open("program.py", "wb") as f:
    f.write(source)
if sys.platform != "darwin":  # macOS does not enforce address-space limits
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
if processes:
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
faulthandler.disable()
for module in (os, posix):  # posix too: importlib.reload(os) copies its functions from there
    for name in ("kill", "killpg", "pidfd_open", "system", "popen", "putenv", "unsetenv", "remove", "removedirs",
                 "rmdir", "unlink", "rename", "renames", "replace", "truncate", "ftruncate", "fchdir", "chdir", "chmod",
                 "fchmod", "chown", "fchown", "lchown", "chroot", "setuid", "setgid", "fork", "forkpty", "vfork",
                 "posix_spawn", "posix_spawnp", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp",
                 "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "_exit"):
        if hasattr(module, name):
            setattr(module, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = None
blocked = ("_posixsubprocess", "multiprocessing", "_multiprocessing", "ctypes", "_ctypes", "resource", "psutil", "pty",
           "ipdb", "joblib", "tkinter")
class Blocked:  # refuses them (and a fresh posix) even after `del sys.modules[name]`
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in blocked + ("posix",):
            raise ImportError(f"{name} is not available in the sandbox")
sys.meta_path.insert(0, Blocked)
for module in blocked:
    sys.modules[module] = None
builtins.exit = builtins.quit = builtins.help = builtins.input = None
del builtins, faulthandler, os, posix, resource, shutil, subprocess, sys
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


@dataclass
class ExecutionResult:
    success: bool  # exit code 0 within the limits
    stdout: str
    stderr: str
    error: str = ""  # stderr's last unindented line but "Traceback (..." (else its last line), or what stopped it
    timeout: bool = False
    memory_exceeded: bool = False


def bwrap_command(bwrap, info_fd, tmp_bytes, as_root):
    """bubblewrap's command line: new namespaces, a read-only view of the system and of Python, a private /tmp."""
    command = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    if as_root:  # no user namespace (it would map the sandbox to root outside): the guard drops to a throwaway uid
        command += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command += ["--unshare-user", "--disable-userns"]
    # the private /tmp first: Python binds that come after stay visible even when Python lives under /tmp (a venv in
    # a checkout there), where a later tmpfs would hide them
    command += ["--proc", "/proc", "--dev", "/dev", "--perms", "0777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    for path in SYSTEM_DIRS:
        command += ["--ro-bind-try", path, path]
    for path in sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}):
        # --dir first: bwrap would make the missing parents (/root, ...) 0700, which the throwaway uid cannot enter
        command += ["--dir", path, "--ro-bind", path, path]
    return command + ["--remount-ro", "/", "--chdir", "/tmp", "--"]


def _read(f, limit):
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _run(code, timeout, memory_bytes, output_bytes, bwrap=None):
    """Run code under bwrap (a path) or, with bwrap=None, with the Python layer alone in a temporary directory."""
    as_root = bwrap is not None and os.getuid() == 0
    uid = 1_000_000_000 + secrets.randbelow(1_000_000_000) if as_root else 0  # one per run: no shared process count
    processes = MAX_PROCESSES if bwrap else 0  # without namespaces RLIMIT_NPROC would count all of the user's processes
    cpu_seconds = max(1, int(timeout) + 1)
    guard = [sys.executable, "-I", "-c", GUARD, str(memory_bytes), str(cpu_seconds), str(output_bytes), str(processes),
             str(uid)]
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as workdir, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        popen = dict(cwd=workdir, env=ENV, stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True)
        if bwrap:
            info, info_w = os.pipe()
            command = bwrap_command(bwrap, info_w, memory_bytes, as_root) + guard
            proc = subprocess.Popen(command, pass_fds=(info_w,), **popen)
            os.close(info_w)
            init = _open_init(info)
        else:
            proc, init = subprocess.Popen(guard, **popen), None
        timed_out = False
        try:
            proc.communicate(code.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill(proc, init)
        stdout, stderr = _read(out, output_bytes), _read(err, output_bytes)
    lines = stderr.strip().splitlines()
    memory_exceeded = "MemoryError" in stderr
    if timed_out:
        error = f"timed out after {timeout}s"
    elif proc.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):  # bwrap exits 128 + the signal
        error = "CPU time limit exceeded"
    elif "[Errno 27] File too large" in stderr:  # RLIMIT_FSIZE (Python ignores SIGXFSZ, so writes fail instead)
        error = "output limit exceeded"
    else:
        # the exception's line: the last unindented one (processes that die together interleave their tracebacks, and
        # the ones killed with the sandbox stop mid-way, so the very last line can be another's "  File ..." line)
        said = [line for line in lines if line[:1] not in (" ", "\t") and not line.startswith("Traceback (")] or lines
        error = said[-1] if said else ("" if proc.returncode == 0 else f"exit code {proc.returncode}")
    return ExecutionResult(success=proc.returncode == 0 and not timed_out, stdout=stdout, stderr=stderr, error=error,
                           timeout=timed_out, memory_exceeded=memory_exceeded)


def _open_init(info):
    """A pidfd of the sandbox's init, from what bwrap writes on --info-fd (it closes it before starting the guard,
    which then waits for the program on stdin, so the init is still alive); None if the sandbox did not start."""
    with open(info) as f:
        child = json.loads(f.read() or "{}").get("child-pid")
    try:
        return os.pidfd_open(child) if child else None
    except ProcessLookupError:
        return None


def _kill(proc, init):
    """Kill whatever is left. With namespaces: the init, whose exit makes the kernel kill every process in its
    namespace first, and wait for that exit; without: the process group, which a program can leave with setsid."""
    try:
        if init is None:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(init, signal.SIGKILL)
            select.select([init], [], [])  # readable once the init (and so everything in the namespace) has exited
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        if init is not None:
            os.close(init)
    proc.wait()


def _why_no_namespaces(bwrap):
    if sys.platform != "linux":
        return "namespaces need Linux"
    path = shutil.which(bwrap)
    if path is None:
        return f"{bwrap} not found: install bubblewrap (apt-get install bubblewrap)"
    result = _run("print('ok')", timeout=30.0, memory_bytes=256 * 2**20, output_bytes=2**20, bwrap=path)
    if not (result.success and result.stdout == "ok\n"):
        return f"bubblewrap cannot start a sandbox here ({result.error}): allow user namespaces, or use root or a VM"


@functools.cache
def _mode(bwrap):
    reason = _why_no_namespaces(bwrap)
    if reason:
        print(f"nanochat.execution: no namespace sandbox ({reason}); model-written code runs with rlimits and Python "
              "guards only", file=sys.stderr, flush=True)
    return reason or "namespaces"


_mode_lock = threading.Lock()  # the HumanEval evaluator starts several sandboxes at once: probe (and print) once


def sandbox_mode(bwrap="bwrap"):
    """'namespaces' when a bubblewrap sandbox starts here, else the reason why not (then only the Python layer
    runs). Probed once per process and bwrap; the first fallback prints one line to stderr."""
    with _mode_lock:
        return _mode(bwrap)


def execute_code(code, timeout=5.0, memory_bytes=256 * 2**20, output_bytes=2**20, bwrap="bwrap"):
    """Run code as a Python program in the sandbox; returns what happened. bwrap: bubblewrap's name or path, or None
    for the Python layer alone (to compare with)."""
    namespaces = bwrap is not None and sandbox_mode(bwrap) == "namespaces"
    return _run(code, timeout, memory_bytes, output_bytes, shutil.which(bwrap) if namespaces else None)
