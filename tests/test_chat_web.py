"""The web server as users and clients meet it: a real server process on 127.0.0.1, real HTTP, the official OpenAI
client, and a real headless Chromium driving the UI."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from nanochat import checkpoint_manager as cm
from test_gpt import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_chat_model_dir(root, tokenizer):
    """A tiny model that never ends its answers (the stop tokens' logits are pinned at 0): streams stay open."""
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0
    checkpoint_dir = root / "base_checkpoints" / "d4"
    cm.save_checkpoint(str(checkpoint_dir), 1, model.state_dict(), None)
    cm.save_meta(str(checkpoint_dir), 1, {"step": 1, "model_config": dataclasses.asdict(model.config)})
    tokenizer.save(str(root / "tokenizer"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("web")
    make_chat_model_dir(root, tokenizer)
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root), "NANOCHAT_DTYPE": "float32"}
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "base", "--host", "127.0.0.1", "-p", str(port),
                             "-m", "64"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.seek(0)
                pytest.fail("server did not start:\n" + log.read())
            time.sleep(0.3)
    yield url
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    result = json.loads(out.strip().splitlines()[-1])  # the last stdout line, after a clean shutdown
    assert result["stage"] == "chat_web" and result["requests"] >= 1


def post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_streaming_endpoint_health_and_stats(server):
    health = get_json(server + "/health")
    assert health["status"] == "ok" and health["ready"] and health["available_workers"] == 1
    status, body = post(server + "/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                                       "max_tokens": 10, "temperature": 0})
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == {"done": True}
    assert all(e["gpu"] == 0 and isinstance(e["token"], str) for e in events[:-1]) and len(events) > 1
    stats = get_json(server + "/stats")
    assert stats["total_workers"] == 1 and stats["busy_workers"] == 0 and stats["workers"][0]["device"] == "cpu"
    with urllib.request.urlopen(server + "/", timeout=10) as response:
        assert "<title>nanochat</title>" in response.read().decode()


@pytest.mark.parametrize("body, field", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 3}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 201}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "max_tokens"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 501}, "messages"),
])
def test_limits_answer_400_naming_the_field(server, body, field):
    for path in ("/chat/completions", "/v1/chat/completions"):
        status, text = post(server + path, body)
        error = json.loads(text)["error"]
        assert status == 400 and error["param"] == field, (path, text)


@pytest.mark.parametrize("raw", [b"{not json", b'{"messages": "hello"}', b'{"messages": [{"role": "user"}]}',
                                 b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', b"[]", b""])
def test_malformed_requests_get_4xx_never_500(server, raw):
    status, text = post(server + "/chat/completions", None, raw=raw)
    assert 400 <= status < 500 and "error" in json.loads(text)


def test_official_openai_client(server):
    from openai import OpenAI
    client = OpenAI(base_url=server + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    assert model.startswith("nanochat-base-d4")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == reply.choices[0].message.content  # same greedy answer, in pieces
    assert chunks[-1].choices[0].finish_reason == "length"


def test_health_answers_during_generation_and_a_disconnect_frees_the_worker(server):
    host, port = server.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    body = json.dumps({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 4096, "temperature": 0})
    conn.sendall((f"POST /chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while b"data: " not in received:  # wait until streaming has begun
        chunk = conn.recv(4096)
        assert chunk, "the server closed the stream"
        received += chunk
    t0 = time.time()
    health = get_json(server + "/health")
    assert health["available_workers"] == 0  # busy generating, and still answering
    assert time.time() - t0 < 5
    conn.close()  # the client goes away mid-stream
    deadline = time.time() + 20
    while get_json(server + "/health")["available_workers"] != 1:
        assert time.time() < deadline, "the worker was not freed after the client disconnected"
        time.sleep(0.1)


def test_load_benchmark_runs_clean(server):
    proc = subprocess.run([sys.executable, "-m", "dev.bench_web", "--url", server, "--clients", "4", "--seconds", "3",
                           "--max-tokens", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["requests"] > 0 and result["ttft_p50_ms"] > 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="Debian's chromium is not installed (CI installs it)")
def test_ui_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--disable-quic"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page()
        page.goto(server)
        done = "() => !document.querySelector('#send-button').disabled && !document.querySelector('.streaming')"

        # type and send with Enter; the answer streams in, growing while it is being written
        page.fill("#chat-input", "Hello, who are you?")
        page.keyboard.press("Enter")
        page.wait_for_selector(".message.assistant .content.streaming")
        lengths = [len(page.inner_text(".message.assistant .content"))]
        while page.query_selector(".content.streaming") and len(lengths) < 200:
            page.wait_for_timeout(20)
            lengths.append(len(page.inner_text(".message.assistant .content")))
        page.wait_for_function(done)
        first = page.inner_text(".message.assistant .content")
        assert len(set(lengths)) > 2 and first  # several different lengths were seen: it streamed
        assert page.inner_text(".message.user .content") == "Hello, who are you?"

        # Shift+Enter adds a line instead of sending
        page.fill("#chat-input", "line one")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("line two")
        assert page.input_value("#chat-input") == "line one\nline two"
        page.fill("#chat-input", "")

        # regenerate: click the answer, a new one replaces it
        page.click(".message.assistant .content")
        page.wait_for_function(done)
        assert page.locator(".message.assistant").count() == 1 and page.locator(".message.user").count() == 1

        # edit: click the user message, it returns to the input and the conversation is cut there
        page.click(".message.user .content")
        assert page.input_value("#chat-input") == "Hello, who are you?" and page.locator(".message").count() == 0
        page.fill("#chat-input", "Tell me about the river.")
        page.click("#send-button")
        page.wait_for_function(done)
        assert page.inner_text(".message.user .content") == "Tell me about the river."

        # slash commands, and errors shown to the user
        page.fill("#chat-input", "/temperature 0.5")
        page.keyboard.press("Enter")
        assert "temperature set to 0.5" in page.inner_text(".notice")
        page.fill("#chat-input", "/topk 999")
        page.keyboard.press("Enter")
        assert "top_k must be a whole number from 1 to 200" in page.inner_text(".error-message")
        page.screenshot(path=str(tmp_path / "chat_web.png"))
        page.fill("#chat-input", "x" * 9000)  # over the server's limit: its error reaches the page
        page.keyboard.press("Enter")
        page.wait_for_selector(".error-message >> text=longer than 8000 characters")
        assert page.input_value("#chat-input") == "x" * 9000  # handed back to be fixed
        assert page.locator(".message.user").count() == 1

        # start over
        page.click("#new-chat")
        assert page.locator(".message").count() == 0
        page.fill("#chat-input", "/help")
        page.keyboard.press("Enter")
        assert "/temperature" in page.inner_text(".notice")
        page.keyboard.press("Control+Shift+N")
        browser.close()
    assert (tmp_path / "chat_web.png").stat().st_size > 10_000
