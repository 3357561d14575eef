"""The web server as users and clients meet it: real server processes on 127.0.0.1, real HTTP and bare sockets, the
official OpenAI client, a property-based fuzz of both endpoints, and a real headless Chromium driving the UI."""

import collections
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat import checkpoint_manager as cm
from nanochat.serving import MAX_BODY_BYTES
from scripts.chat_web import MAX_QUEUE
from test_gpt import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "sk-test-0123456789"
ALLOWED_ORIGIN = "http://allowed.example"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_chat_model_dir(root, tokenizer, folder="base_checkpoints", sequence_len=1024):
    """A tiny model that never ends its answers (the stop tokens' logits are pinned at 0): streams stay open, and
    greedy answers run as long as they may (to sequence_len; with --past-context to 10 x sequence_len)."""
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len)
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0
    checkpoint_dir = root / folder / "d4"
    cm.save_checkpoint(str(checkpoint_dir), 1, model.state_dict(), None)
    cm.save_meta(str(checkpoint_dir), 1, {"step": 1, "model_config": dataclasses.asdict(model.config)})
    tokenizer.save(str(root / "tokenizer"))


def start_server(root, *flags, env=None):
    """A chat_web process over the tiny model in root, on a free port; returns (process, url) once /health answers."""
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root), "NANOCHAT_DTYPE": "float32", **(env or {})}
    log = open(root / f"server-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "base", "--host", "127.0.0.1", "-p", str(port),
                             *flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.seek(0)
                pytest.fail("server did not start:\n" + log.read())
            time.sleep(0.3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("web")
    make_chat_model_dir(root, tokenizer)
    return root


@pytest.fixture(scope="module")
def server(model_dir):
    """No API key, and every limit, timeout and the queue at the defaults users get."""
    proc, url = start_server(model_dir, "-m", "64")
    yield url
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    result = json.loads(out.strip().splitlines()[-1])  # the last stdout line, after a clean shutdown
    assert result["stage"] == "chat_web" and result["requests"] >= 1


@pytest.fixture(scope="module")
def keyed_server(model_dir):
    """The API key from NANOCHAT_API_KEY, one allowed CORS origin, and a 1 s read timeout (so its test is short)."""
    proc, url = start_server(model_dir, "-m", "16", "--read-timeout", "1", "--cors-origins", ALLOWED_ORIGIN,
                             env={"NANOCHAT_API_KEY": API_KEY})
    yield url
    proc.terminate()
    proc.communicate(timeout=30)


def call(url, body=None, raw=None, headers=None, method=None):
    """One HTTP request: (status, headers, body text), errors included."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def post(url, body, raw=None, headers=None):
    status, _, text = call(url, body, raw, headers)
    return status, text


def get_json(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def sse_events(text):
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def open_request(url, path, body=None, raw=None, headers=""):
    """Send a request on a bare socket and return the socket unread: a client that may wait, stall or leave at will."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    if raw is None:
        data = json.dumps(body)
        raw = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{headers}"
               f"Content-Length: {len(data)}\r\n\r\n{data}").encode()
    conn.sendall(raw)
    return conn


def read_until_closed(conn):
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def wait_until(condition, what, seconds=30):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.05)


HELLO = [{"role": "user", "content": "hello"}]
LONG = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 4096, "temperature": 0}


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


def test_messages_for_a_conversation_with_no_question_and_a_nan_temperature(server):
    status, text = post(server + "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."}]})
    assert status == 400 and json.loads(text)["error"]["message"] == ("messages: the conversation needs a user message "
                                                                      "to answer, last (or before a final assistant message)")
    status, text = post(server + "/v1/chat/completions", None, raw=b'{"messages": [{"role": "user", "content": "hi"}], '
                                                                   b'"temperature": NaN}')
    assert status == 400 and json.loads(text)["error"]["message"] == "temperature: Input should be a finite number"


@pytest.mark.parametrize("raw", [b"{not json", b'{"messages": "hello"}', b'{"messages": [{"role": "user"}]}',
                                 b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', b"[]", b""])
def test_malformed_requests_get_400_never_500(server, raw):
    status, text = post(server + "/chat/completions", None, raw=raw)
    assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"


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
    conn = open_request(server, "/chat/completions", LONG)
    received = b""
    while b"data: " not in received:  # wait until streaming has begun
        chunk = conn.recv(4096)
        assert chunk, "the server closed the stream"
        received += chunk
    assert get_json(server + "/health")["available_workers"] == 0  # busy generating, and still answering
    conn.close()  # the client goes away mid-stream
    wait_until(lambda: get_json(server + "/health")["available_workers"] == 1,
               "the worker was not freed after the client disconnected")


def test_a_non_streaming_client_that_leaves_frees_the_worker_early(server):
    before = get_json(server + "/stats")
    conn = open_request(server, "/v1/chat/completions", LONG)
    wait_until(lambda: get_json(server + "/health")["available_workers"] == 0, "the request never started")
    conn.close()  # gone before its answer: nobody will read it
    wait_until(lambda: get_json(server + "/stats")["requests_served"] == before["requests_served"] + 1,
               "the worker was not freed after the client disconnected")
    # it stopped early: the whole answer fills the 1,024-token context, over 1,000 tokens after this short prompt
    assert get_json(server + "/stats")["tokens_generated"] - before["tokens_generated"] < 1000


def test_the_queue_is_capped_and_health_tells_the_truth(server):
    # one request generating and MAX_QUEUE (the default) waiting behind it fill the server
    clients = [open_request(server, "/chat/completions", LONG) for _ in range(1 + MAX_QUEUE)]
    full = lambda health: health["queued"] == MAX_QUEUE and health["available_workers"] == 0
    wait_until(lambda: full(get_json(server + "/health")), "the requests were not queued")
    health = get_json(server + "/health")
    assert not health["ready"] and health["max_queue"] == MAX_QUEUE
    status, headers, text = call(server + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert status == 503 and int(headers["Retry-After"]) >= 1, text
    assert json.loads(text)["error"]["type"] == "server_error"  # the server's state, not the client's mistake
    for conn in clients:
        conn.close()  # the waiting clients leave too: none of them gets generated for
    wait_until(lambda: get_json(server + "/health") == {**health, "ready": True, "available_workers": 1, "queued": 0},
               "the queue did not drain after its clients left")
    assert post(server + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("part", [{"type": "text", "text": 5}, {"type": "text", "text": None},
                                  {"type": "text", "text": ["a"]}, {"type": "text"}, {"type": "image_url", "text": "x"}, 7])
def test_content_parts_must_be_text(server, part):
    for path in ("/chat/completions", "/v1/chat/completions"):
        status, text = post(server + path, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, part]}]})
        assert status == 400 and json.loads(text)["error"]["param"].startswith("messages[0].content[1]"), (path, text)
    status, text = post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}], "max_tokens": 2})
    assert status == 200, text


def test_seeds_outside_64_bits_are_refused_and_tiny_temperatures_are_greedy(server):
    for path in ("/chat/completions", "/v1/chat/completions"):
        status, text = post(server + path, {"messages": HELLO, "seed": 2**70})
        assert status == 400 and json.loads(text)["error"]["param"] == "seed", text
    for seed in (-2**63, 2**63 - 1):
        status, text = post(server + "/chat/completions", {"messages": HELLO, "seed": seed, "max_tokens": 3})
        assert status == 200 and "error" not in text, text
    answers = {}
    for temperature in (0, 1e-38, 5e-324, 1e-6):  # 1e-38 once overflowed to inf, then NaN, inside the sampler
        body = {"messages": HELLO, "max_tokens": 8, "temperature": temperature, "seed": 1}
        status, text = post(server + "/v1/chat/completions", body)
        assert status == 200, text
        answers[temperature] = json.loads(text)["choices"][0]["message"]["content"]
        status, text = post(server + "/chat/completions", body)
        assert status == 200 and "error" not in text and sse_events(text)[-1] == {"done": True}, text
    assert len(set(answers.values())) == 1  # all of them are the greedy answer


def test_oversized_bodies_get_413_before_they_are_read(server):
    # a declared 70 MB body is refused from its headers: the server answers although not one byte of it was sent
    conn = open_request(server, None, raw=b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Type: application/json\r\nContent-Length: 70000000\r\n\r\n")
    answer = read_until_closed(conn)
    assert answer.startswith(b"HTTP/1.1 413") and b"invalid_request_error" in answer
    # a chunked body is cut off as soon as it passes the limit; meanwhile the server answers others
    conn = open_request(server, None, raw=b"POST /chat/completions HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    # (exactly the limit, then one byte over it: the server has read all that was sent when it answers and closes)
    sizes = [50_000] * (MAX_BODY_BYTES // 50_000) + [MAX_BODY_BYTES % 50_000, 1]
    for i, size in enumerate(sizes):
        conn.sendall(b"%x\r\n%s\r\n" % (size, b"[" * size))
        if i == 3:
            assert get_json(server + "/health")["status"] == "ok"  # not blocked by the body being read
    assert read_until_closed(conn).startswith(b"HTTP/1.1 413")
    # the largest valid conversation fits: every character a JSON-escaped surrogate pair, the most bytes it can take
    messages = [{"role": role, "content": "\U0001F600" * 8000} for role in ("user", "assistant") * 2]
    raw = json.dumps({"messages": messages}, indent=4).encode()
    assert len(raw) > 350_000
    status, text = post(server + "/v1/chat/completions", None, raw=raw)
    assert status == 400 and "tokens" in json.loads(text)["error"]["message"]  # refused for the model's context, not size


def test_half_sent_requests_are_cut_off(keyed_server):
    auth = f"Authorization: Bearer {API_KEY}\r\n"
    idle = open_request(keyed_server, None, raw=b"")  # connects, never writes
    half_headers = open_request(keyed_server, None, raw=b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    half_body = open_request(keyed_server, None, raw=(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}"
                                                      f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                                                      '{"messages": [').encode())
    # each socket has a 30 s timeout: recv raises if the server kept the connection open
    assert read_until_closed(idle) == b"" and read_until_closed(half_headers) == b""
    answer = read_until_closed(half_body)
    assert answer.startswith(b"HTTP/1.1 408") and b"took over 1s" in answer
    kept_alive = open_request(keyed_server, None, raw=b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b"}"):  # the first request is answered; the next one never completes
        answer += kept_alive.recv(4096)
    kept_alive.sendall(b"GET /hea")
    assert answer.startswith(b"HTTP/1.1 200") and read_until_closed(kept_alive) == b""


def test_openapi_declares_the_limits(server):
    schemas = get_json(server + "/openapi.json")["components"]["schemas"]
    request, message = schemas["ChatRequest"]["properties"], schemas["Message"]["properties"]
    assert (request["messages"]["minItems"], request["messages"]["maxItems"]) == (1, 500)
    assert set(message["role"]["enum"]) == {"system", "developer", "user", "assistant"}
    assert message["content"]["anyOf"][0]["maxLength"] == 8000
    bounds = {name: (request[name]["anyOf"][0]["minimum"], request[name]["anyOf"][0]["maximum"])
              for name in ("temperature", "top_k", "max_tokens", "max_completion_tokens", "n")}
    assert bounds == {"temperature": (0, 2), "top_k": (0, 200), "max_tokens": (1, 4096), "max_completion_tokens": (1, 4096),
                      "n": (1, 8)}
    assert request["stop"]["anyOf"][1]["maxItems"] == 4 and request["seed"]["anyOf"][0]["maximum"] >= 2**63 - 1


def test_n_stop_and_include_usage_through_the_openai_client(server):
    from openai import OpenAI
    client = OpenAI(base_url=server + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    # n answers from one prompt, each with its own finish_reason, all counted in the usage
    reply = client.chat.completions.create(model="nanochat", messages=HELLO, n=3, max_tokens=6, temperature=1.0, seed=3,
                                           extra_body={"top_k": 20})  # top 20: the end-of-answer tokens are never drawn
    assert [c.index for c in reply.choices] == [0, 1, 2] and all(c.finish_reason == "length" for c in reply.choices)
    assert len({c.message.content for c in reply.choices}) > 1 and reply.usage.completion_tokens == 18
    # a stop string ends the answer and is not part of it
    greedy = client.chat.completions.create(model="nanochat", messages=HELLO, max_tokens=12, temperature=0)
    full = greedy.choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    stopped = client.chat.completions.create(model="nanochat", messages=HELLO, max_tokens=12, temperature=0,
                                             stop=[stop, "never written"])
    assert stopped.choices[0].message.content == full[:full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # streamed: the same text in pieces, per choice, and a last chunk with the usage
    chunks = list(client.chat.completions.create(model="nanochat", messages=HELLO, max_tokens=12, temperature=0, stop=stop,
                                                 n=2, stream=True, stream_options={"include_usage": True}))
    for index in (0, 1):
        choices = [c for chunk in chunks for c in chunk.choices if c.index == index]
        assert "".join(c.delta.content or "" for c in choices) == stopped.choices[0].message.content
        assert [c.finish_reason for c in choices if c.finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == stopped.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 2 * stopped.usage.completion_tokens


def test_n_stop_and_usage_on_the_ui_endpoint(server):
    status, text = post(server + "/chat/completions", {"messages": HELLO, "n": 2, "max_tokens": 5, "stop": "never written",
                                                       "stream_options": {"include_usage": True}})
    events = sse_events(text)
    assert status == 200 and {e["index"] for e in events if "token" in e} == {0, 1}
    assert events[-2]["usage"]["completion_tokens"] == 10 and events[-1] == {"done": True}


def test_answers_end_where_the_trained_context_does_unless_past_context(tmp_path, tokenizer):
    """A model trained on 32 tokens: the server's answers stop there ("length"), or with --past-context run on to
    max_tokens; a prompt that fills the context is refused either way."""
    make_chat_model_dir(tmp_path, tokenizer, sequence_len=32)
    for flags, expect in (((), "context"), (("--past-context",), 100)):
        proc, url = start_server(tmp_path, "--eager", *flags)
        try:
            status, text = post(url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 100, "temperature": 0})
            assert status == 200, text
            reply = json.loads(text)
            usage = reply["usage"]
            assert reply["choices"][0]["finish_reason"] == "length"
            assert usage["completion_tokens"] == (32 - usage["prompt_tokens"] if expect == "context" else expect), usage
            status, text = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "go " * 40}]})
            assert status == 400 and "more than this model reads (32)" in json.loads(text)["error"]["message"], text
        finally:
            proc.terminate()
            proc.communicate(timeout=30)


def test_api_key_guards_everything_but_the_page_and_health(keyed_server):
    from openai import AuthenticationError, OpenAI
    key = {"Authorization": f"Bearer {API_KEY}"}
    for path in ("/", "/health", "/favicon.ico"):
        assert call(keyed_server + path)[0] == 200
    for path, body in (("/v1/chat/completions", {"messages": HELLO}), ("/chat/completions", {"messages": HELLO}),
                       ("/v1/models", None), ("/stats", None), ("/openapi.json", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            status, response_headers, text = call(keyed_server + path, body, headers=headers)
            error = json.loads(text)["error"]
            assert status == 401 and error["code"] == "invalid_api_key" and response_headers["WWW-Authenticate"] == "Bearer"
        assert call(keyed_server + path, body, headers=key)[0] == 200, path
    assert call(keyed_server + "/docs", headers=key)[0] == 404  # a browser cannot send the key: the docs are off
    client = OpenAI(base_url=keyed_server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert client.chat.completions.create(model="nanochat", messages=HELLO, max_tokens=3).choices[0].message.content
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=keyed_server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_cors_is_open_without_a_key_and_restricted_with_one(server, keyed_server):
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert call(server + "/v1/models", headers={"Origin": "http://any.example"})[1]["Access-Control-Allow-Origin"] == "*"
    allowed = call(keyed_server + "/v1/models", headers={**key, "Origin": ALLOWED_ORIGIN})[1]
    assert allowed["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    evil = call(keyed_server + "/v1/models", headers={**key, "Origin": "http://evil.example"})[1]
    assert "Access-Control-Allow-Origin" not in evil
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = call(keyed_server + "/v1/chat/completions", headers={**preflight, "Origin": ALLOWED_ORIGIN},
                              method="OPTIONS")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    status, headers, _ = call(keyed_server + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"},
                              method="OPTIONS")
    assert status == 400 and "Access-Control-Allow-Origin" not in headers


def test_favicon(server):
    status, headers, text = call(server + "/favicon.ico")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml" and text.startswith("<svg") and len(text) < 400


def json_schema_strategy(schema, defs, small):
    """Hypothesis values for a JSON schema of the shapes FastAPI writes; sizes beyond `small` are tested elsewhere."""
    if "$ref" in schema:
        return json_schema_strategy(defs[schema["$ref"].split("/")[-1]], defs, small)
    if "anyOf" in schema:
        return st.one_of([json_schema_strategy(s, defs, small) for s in schema["anyOf"]])
    if "const" in schema or "enum" in schema:
        return st.sampled_from(schema.get("enum", [schema.get("const")]))
    bounds = dict(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
    kind = schema.get("type")
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", small), small))
    if kind == "integer":
        return st.integers(*(None if b is None else int(b) for b in bounds.values()))
    if kind == "number":
        return st.floats(**bounds)
    if kind == "array":
        return st.lists(json_schema_strategy(schema["items"], defs, small), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object":
        properties = {k: json_schema_strategy(v, defs, small) for k, v in schema["properties"].items()}
        required = schema.get("required", [])
        return st.fixed_dictionaries({k: properties[k] for k in required},
                                     optional={k: v for k, v in properties.items() if k not in required})
    return {"boolean": st.booleans(), "null": st.none()}[kind]


def as_conversation(body):
    """The same request with its messages' roles rewritten into a conversation the model can answer: alternating, and
    ending with a user's turn that is not blank."""
    messages = body["messages"]
    for i, m in enumerate(messages):
        from_end = len(messages) - 1 - i
        m["role"] = "user" if from_end % 2 == 0 else "system" if i == 0 else "assistant"
        if m["role"] == "user":
            hi = {"type": "text", "text": "hi "}
            m["content"] = "hi " + m["content"] if isinstance(m["content"], str) else [hi, *m["content"]]
    return body


def test_fuzz_both_endpoints_never_5xx(server):
    """
    500 requests (hypothesis, derandomized: the same ones every run), in about equal parts: drawn from the server's own
    OpenAPI schema; the same made into answerable conversations; with one field swapped for arbitrary JSON; arbitrary
    JSON. None may get a 5xx or an error inside a 200 stream, and some must reach the model. schemathesis does this
    too, but brings its own runner and dozens of packages for what these 50 lines do.
    """
    schemas = get_json(server + "/openapi.json")["components"]["schemas"]
    request = json.loads(json.dumps(schemas["ChatRequest"]))
    for name in ("max_tokens", "max_completion_tokens"):  # short answers: the budget goes to requests, not generation
        request["properties"][name] = {"type": "integer", "minimum": 1, "maximum": 3}
    request["required"] = ["messages", "max_tokens"]
    valid = json_schema_strategy(request, schemas, small=12)
    anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=6)
    swapped = st.builds(lambda body, field, junk: {**body, field: junk}, valid,
                        st.sampled_from(sorted(request["properties"])), anything)
    outcomes = collections.Counter()

    @settings(max_examples=500, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/chat/completions", "/v1/chat/completions"]),
           body=st.one_of(valid, valid.map(as_conversation), swapped, anything))
    def check(path, body):
        status, text = post(server + path, None, raw=json.dumps(body).encode())
        assert status < 500, (path, body, text)
        assert status == 200 or json.loads(text)["error"]["type"] == "invalid_request_error", text
        if status == 200:
            assert '"error"' not in text, (path, body, text)
        outcomes[status] += 1

    check()
    assert outcomes[200] >= 50, outcomes  # some requests reached the model (173 of 500 when written)


def test_load_benchmark_runs_clean(server):
    proc = subprocess.run([sys.executable, "-m", "dev.bench_web", "--url", server, "--clients", "4", "--seconds", "3",
                           "--max-tokens", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["requests"] > 0 and result["ttft_p50_ms"] > 0


def test_load_benchmark_without_the_servers_key_is_one_line(keyed_server):
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "dev.bench_web", "--url", keyed_server, "--seconds", "1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: the server at {keyed_server} wants an API key: pass the one it was started "
                                   "with as --api-key (or NANOCHAT_API_KEY)")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic"]
needs_chromium = pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"),
                                    reason="Debian's chromium is not installed (CI installs it)")
DONE = "() => !document.querySelector('#send-button').disabled && !document.querySelector('.streaming')"


@needs_chromium
def test_ui_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("dialog", lambda dialog: pytest.fail(f"a server without a key asked: {dialog.message}"))
        page.goto(server)
        done = DONE

        # type and send with Enter; the answer streams in, growing while it is being written. The page records the
        # answer's text each time the UI rewrites it (a MutationObserver sees every rewrite, however fast the server)
        page.evaluate("""() => {
            window.shown = [];
            new MutationObserver(records => { for (const r of records) {
                if (r.target.matches?.('.message.assistant .content') && !r.target.classList.contains('typing'))
                    window.shown.push(r.target.textContent === '' ? 0 : r.addedNodes[0]?.textContent.length);
            } }).observe(document.getElementById('messages'), { childList: true, subtree: true });
        }""")
        page.fill("#chat-input", "Hello, who are you?")
        page.keyboard.press("Enter")
        page.wait_for_selector(".message.assistant .content.streaming")
        page.wait_for_function(done)
        first = page.inner_text(".message.assistant .content")
        shown = page.evaluate("window.shown")
        final = page.eval_on_selector(".message.assistant .content", "e => e.textContent.length")
        assert first and shown[-1] == final and len(set(shown)) > 2, shown  # it grew in several steps: it streamed
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
        page.wait_for_selector(".error-message >> text=at most 8000 characters")
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


@needs_chromium
def test_ui_asks_for_the_api_key_once(keyed_server):
    from playwright.sync_api import sync_playwright
    prompts = []

    def answer(dialog):  # the first prompt gets the key, a later one is cancelled
        prompts.append(dialog.message)
        dialog.accept(API_KEY) if len(prompts) == 1 else dialog.dismiss()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("dialog", answer)
        page.goto(keyed_server)  # the page itself is public
        page.fill("#chat-input", "hello")
        page.keyboard.press("Enter")  # 401: the page asks, keeps the key, and sends again
        page.wait_for_function(DONE)
        assert len(prompts) == 1 and "API key" in prompts[0] and page.locator(".message.assistant").count() == 1
        assert page.evaluate("localStorage.getItem('nanochat-api-key')") == API_KEY
        page.reload()  # remembered: no second prompt
        page.fill("#chat-input", "hello again")
        page.keyboard.press("Enter")
        page.wait_for_function(DONE)
        assert len(prompts) == 1 and page.locator(".message.assistant").count() == 1
        page.evaluate("localStorage.setItem('nanochat-api-key', 'wrong')")  # a wrong key is asked for again
        page.fill("#chat-input", "and again")
        page.keyboard.press("Enter")
        page.wait_for_selector(".error-message >> text=missing or wrong API key")
        assert len(prompts) == 2 and page.input_value("#chat-input") == "and again"
        browser.close()
