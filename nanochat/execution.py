"""
Run model-written Python (HumanEval answers) in a separate process with limits: address space, CPU time, output
size, a wall-clock timeout that kills the whole process group, a scrubbed environment, a fresh temporary working
directory, no stdin, and the destructive parts of os/shutil/subprocess switched off.

This stops accidents and plain misbehaviour (endless loops, memory and fork bombs, deleting files, starting
programs, reading the parent's secrets). It is not a security boundary against deliberate escape: the network,
ctypes and the kernel stay reachable. Run untrusted code in a container or VM.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Runs in the child before the program: limits first, then remove what must not be called.
GUARD = r"""
import builtins, faulthandler, os, resource, shutil, subprocess, sys
memory, cpu_seconds, output_bytes = (int(a) for a in sys.argv[1:4])
with open("program.py") as f:
    source = f.read()
if sys.platform != "darwin":  # macOS does not enforce address-space limits
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
faulthandler.disable()
for name in ("kill", "killpg", "system", "popen", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink",
             "rename", "renames", "replace", "truncate", "ftruncate", "fchdir", "chdir", "chmod", "fchmod", "chown",
             "fchown", "lchown", "chroot", "setuid", "setgid", "fork", "forkpty", "vfork", "posix_spawn",
             "posix_spawnp", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "_exit"):
    if hasattr(os, name):
        setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = None
for module in ("_posixsubprocess", "multiprocessing", "ctypes", "resource", "psutil", "pty", "ipdb", "joblib", "tkinter"):
    sys.modules[module] = None
builtins.exit = builtins.quit = builtins.help = builtins.input = None
del builtins, faulthandler, os, resource, shutil, subprocess, sys
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


@dataclass
class ExecutionResult:
    success: bool  # exit code 0 within the limits
    stdout: str
    stderr: str
    error: str = ""  # the last line of stderr, or what stopped the program
    timeout: bool = False
    memory_exceeded: bool = False


def _read(path, limit):
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def execute_code(code, timeout=5.0, memory_bytes=256 * 2**20, output_bytes=2**20):
    """Run code as a Python program in a fresh process and directory; returns what happened."""
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as workdir:
        with open(os.path.join(workdir, "program.py"), "w") as f:
            f.write(code)
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        cpu_seconds = max(1, int(timeout) + 1)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", GUARD, str(memory_bytes), str(cpu_seconds), str(output_bytes)],
                cwd=workdir, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"},
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole process group: whatever the program started dies with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        stdout, stderr = _read(out_path, output_bytes), _read(err_path, output_bytes)
    lines = stderr.strip().splitlines()
    memory_exceeded = "MemoryError" in stderr
    if timed_out:
        error = f"timed out after {timeout}s"
    elif proc.returncode == -signal.SIGXCPU:
        error = "CPU time limit exceeded"
    elif "[Errno 27] File too large" in stderr:  # RLIMIT_FSIZE (Python ignores SIGXFSZ, so writes fail instead)
        error = "output limit exceeded"
    else:
        error = lines[-1] if lines else ("" if proc.returncode == 0 else f"exit code {proc.returncode}")
    return ExecutionResult(success=proc.returncode == 0 and not timed_out, stdout=stdout, stderr=stderr, error=error,
                           timeout=timed_out, memory_exceeded=memory_exceeded)
