"""
runs/cloud_start.sh as a pod runs it, on a CPU: the real script (runs/setup.sh's `uv sync --locked` included, a no-op
in a synced checkout) pulls a tiny model from a local olah server standing in for the Hub (HF_ENDPOINT), starts chat_web
in the background, and prints where and with which key; run again, it reuses that server. RunPod's proxy cannot exist
here: RUNPOD_POD_ID only shapes the printed URL; nor can a GPU: a stand-in nvidia-smi lists none.
"""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import test_hub
from test_chat_web import start_server
from test_hub import REPO, free_port, save_tiny_model

olah = test_hub.olah  # the fixture: an olah server on 127.0.0.1 standing in for the Hub, serving me/tiny


def pod_env(base, port, **extra):
    """The environment of a fresh pod: none of this machine's keys, repo, GPU count or timeouts."""
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_API_KEY", "RUNPOD_POD_ID", "HF_TOKEN", "NPROC",
                                                            "NANOCHAT_HF_REPO", "NANOCHAT_START_TIMEOUT")}
    return {**env, "NANOCHAT_BASE_DIR": str(base), "PORT": str(port), "NANOCHAT_DTYPE": "float32", **extra}


def cloud_start(env, expect_ok=True):
    proc = subprocess.run(["bash", "runs/cloud_start.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert (proc.returncode == 0) == expect_ok, proc.stdout + proc.stderr
    return proc


def get(url, key=None):
    """(status, JSON body or None) of a GET."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def stop(pid):
    """End the server's session (setsid made it its leader), and wait until it is gone (or a zombie nobody reaps)."""
    os.killpg(pid, signal.SIGTERM)
    if not gone(pid):
        os.killpg(pid, signal.SIGKILL)


def gone(pid, seconds=10):
    """Whether the process ends (or is a zombie nobody reaps) within seconds."""
    for _ in range(int(seconds * 10)):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_cloud_start_pulls_serves_and_is_safe_to_run_twice(olah, tmp_path, tokenizer):
    port, base = free_port(), tmp_path / "base"
    env = pod_env(base, port, NANOCHAT_HF_REPO="me/tiny", HF_ENDPOINT=olah[0])
    state = base / f"chat_web-{port}.state"
    save_tiny_model(base, tokenizer, tag="d6", step=3)  # a larger model here, which chat_web -i sft alone would serve
    # a chat_web without a key, which takes ours too (it takes any): it must not pass for one we started. It loads
    # while the script pulls (the last -i wins).
    pool = concurrent.futures.ThreadPoolExecutor(1)
    keyless = pool.submit(start_server, base, "-i", "sft", env={"NANOCHAT_API_KEY": ""})
    try:
        first = json.loads(cloud_start(env).stdout.strip().splitlines()[-1])
        assert first["model"] == "hub:me/tiny" and not first["reused"] and first["url"].endswith(f":{port}")
        assert (first["model_tag"], first["step"]) == ("d4", 1)
        assert state.read_text().split()[1:] == ["hub:me/tiny", "d4", "1"]
        assert "scripts.chat_web" in open(f"/proc/{first['pid']}/cmdline").read()
        assert (base / "api_key").read_text().strip() == first["api_key"]
        assert (base / "api_key").stat().st_mode & 0o777 == 0o600  # a secret: the owner's only
        local = f"http://127.0.0.1:{port}"
        assert get(local + "/health")[0] == 200 and get(local + "/v1/models")[0] == 401
        status, models = get(local + "/v1/models", first["api_key"])
        assert status == 200 and models["data"][0]["id"] == "nanochat-sft-d4-step1"

        again = cloud_start({**env, "RUNPOD_POD_ID": "pod123"})
        assert "pulling" not in again.stdout  # the running server is reused: nothing pulled, nothing started
        second = json.loads(again.stdout.strip().splitlines()[-1])
        assert second == {**first, "reused": True, "url": f"https://pod123-{port}.proxy.runpod.net"}

        other = cloud_start({**env, "NANOCHAT_HF_REPO": "me/other"}, expect_ok=False)
        assert other.stderr.splitlines()[-1] == (f"error: the server on port {port} serves hub:me/tiny, not hub:me/other:"
                                                 f" stop it (kill {first['pid']}) and run this again, or pick another PORT")

        open_port = keyless.result()[1].rpartition(":")[2]
        refused = cloud_start({**env, "PORT": open_port, "NANOCHAT_HF_REPO": ""}, expect_ok=False)  # "serve what is here"
        assert refused.stderr.splitlines()[-1] == (f"error: a server on port {open_port} answers without an API key, so "
                                                   "anyone who can reach it may use it: stop it and run this again, or "
                                                   "pick another PORT")
    finally:
        pool.shutdown()
        if not keyless.exception():
            keyless.result()[0].terminate()
            keyless.result()[0].wait(timeout=30)
        if state.exists():
            stop(int(state.read_text().split()[0]))


def test_cloud_start_refusals_are_one_line(tmp_path, tokenizer):
    base, port = tmp_path / "base", free_port()
    bare = tmp_path / "bare"  # a PATH with no curl: only what the script needs before it looks for curl
    bare.mkdir()
    for tool in ("bash", "dirname"):
        os.symlink(shutil.which(tool), bare / tool)
    no_curl = cloud_start(pod_env(base, port, PATH=str(bare)), expect_ok=False)
    assert no_curl.stderr.splitlines()[-1].startswith("error: curl is missing, and this script asks the server with it")

    no_gpu = tmp_path / "no_gpu"  # a pod without a GPU: nvidia-smi fails as it does without a driver
    no_gpu.mkdir()
    (no_gpu / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed'; exit 9\n")
    (no_gpu / "nvidia-smi").chmod(0o755)
    env = pod_env(base, port, PATH=f"{no_gpu}:{os.environ['PATH']}")
    refused = cloud_start(env, expect_ok=False)
    assert refused.stderr.splitlines()[-1] == (
        f"error: no model named (NANOCHAT_HF_REPO or an argument), no sft checkpoint in {base}, and no GPU "
        "(nvidia-smi -L) to train one with speedrun.sh: name a Hub repo, or run this on a GPU pod")

    save_tiny_model(base, tokenizer)  # a model here: served as it is, but it cannot load within 0 s
    late = cloud_start({**env, "NANOCHAT_START_TIMEOUT": "0"}, expect_ok=False)
    assert (f"error: chat_web did not answer on http://127.0.0.1:{port}/health within 0s, so it was stopped: raise "
            "NANOCHAT_START_TIMEOUT if the model is still loading; the end of") in late.stderr
    pid = int(late.stdout.split("waiting for chat_web (pid ")[1].split(",")[0])
    assert not (base / f"chat_web-{port}.state").exists()
    if not gone(pid):
        stop(pid)
        raise AssertionError(f"chat_web (pid {pid}) still runs after its deadline")
