"""
Serving a chat model over HTTP: what scripts/chat_web.py builds its app from. The request as the OpenAPI schema
declares it, the checks the schema cannot say, and errors in OpenAI's shape; ASGI guards for the API key and for huge or
slow requests; the workers and the queue in front of them; and one request's generation, streamed from a worker's thread.

The engine (and with it torch), starlette, FastAPI and uvicorn are imported where they are used, so a script that imports
this module checks its flags before any of them load.
"""

import asyncio
import dataclasses
import hmac
import logging
import math
import os
import random
import threading
import time
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, Field

log = logging.getLogger("chat_web")  # the server's log, under the name of the script that serves

# What a request may ask for: declared in the OpenAPI schema (ChatRequest below) and refused with 400 naming the field
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)  # 0 = the whole vocabulary
MAX_TOKENS_RANGE = (1, 4096)
N_RANGE = (1, 8)  # answers per request, sampled side by side from one prefill
MAX_STOPS, MAX_STOP_CHARS = 4, 100  # stop strings, as many as OpenAI takes
SEED_RANGE = (-2**63, 2**63 - 1)  # what torch's generator takes
# The largest body a valid request needs: every character JSON-escaped as a surrogate pair (12 bytes), plus keys and
# punctuation for every message, plus the other fields. Anything bigger is refused (413) before it is parsed.
MAX_BODY_BYTES = 12 * MAX_CONVERSATION_CHARS + 200 * MAX_MESSAGES + 16_384  # 500 KB

DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


# -----------------------------------------------------------------------------
# The request: as the OpenAPI schema declares it, the checks it cannot declare, and errors in OpenAI's shape

Text = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class TextPart(BaseModel):
    type: Literal["text"]  # the only kind of part a text model reads
    text: Text


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer is OpenAI's newer name for system
    content: Union[Text, list[TextPart]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What both completion endpoints take besides their prompt: how to sample, and how much."""
    temperature: Optional[float] = Field(None, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1], allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=TOP_K_RANGE[0], le=TOP_K_RANGE[1])
    max_tokens: Optional[int] = Field(None, ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1])
    n: Optional[int] = Field(None, ge=N_RANGE[0], le=N_RANGE[1])
    stop: Union[Stop, Annotated[list[Stop], Field(max_length=MAX_STOPS)], None] = None
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    model: Optional[str] = None

    @property
    def choices(self):
        return self.n or 1

    @property
    def stops(self):
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    @property
    def include_usage(self):
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def token_limit(self):
        return self.max_tokens


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(None, ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1])

    @property
    def token_limit(self):  # OpenAI's newer name, if the old one is not given
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class CompletionRequest(SamplingRequest):
    """OpenAI's legacy /v1/completions: a text prompt (a list of prompts or token ids is not taken), and with suffix an
    infill between the two (a model pretrained with fill-in-the-middle tokens)."""
    prompt: Annotated[str, Field(max_length=MAX_CONVERSATION_CHARS)]
    suffix: Optional[Annotated[str, Field(max_length=MAX_CONVERSATION_CHARS)]] = None


class RequestError(Exception):
    def __init__(self, message, param=None, status=400, headers=None):
        super().__init__(message)
        self.message, self.param, self.status, self.headers = message, param, status, headers


def error_body(message, param=None, status=400, code=None):
    """OpenAI's error shape. Its clients retry server errors, so only those are typed server_error."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_param(loc):
    """pydantic's ('body', 'messages', 0, 'content') -> 'messages[0].content'. pydantic also names the member of a
    union it tried ('constrained-str', 'list[TextPart]'); those are not fields, so they are left out."""
    param = ""
    for part in loc[1:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier():
            param += f".{part}" if param else part
    return param or None


def validation_error(errors):
    """The one error worth reading: a value of the right type but out of bounds over a type mismatch (for a union,
    pydantic reports every member's complaint), then the deepest."""
    first = max(errors, key=lambda e: (not e["type"].endswith("_type"), len(e["loc"]))) if errors else {}
    if first.get("type") == "json_invalid":
        return RequestError(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
    param = error_param(first.get("loc", ()))
    return RequestError(f"{param or 'request body'}: {first.get('msg', 'invalid request')}", param)


def add_error_handlers(app):
    """Every error a FastAPI app answers, in OpenAI's shape: the request's (400 naming the field), FastAPI's own (404,
    405, a body it cannot parse), and a bug of ours (500, typed so that clients may retry)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return await request_error(request, validation_error(exc.errors()))

    @app.exception_handler(RequestError)
    async def request_error(request, exc):
        return JSONResponse(error_body(exc.message, exc.param, exc.status), exc.status, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse(error_body(str(exc.detail), status=exc.status_code), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        return JSONResponse(error_body(f"internal error: {exc}", status=500), 500)


def conversation(req):
    """The request's messages as the tokenizer takes them, checked for what the schema cannot say."""
    messages, total = [], 0
    for i, m in enumerate(req.messages):
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        if not content.strip() and m.role != "assistant":
            raise RequestError(f"messages[{i}].content is empty", f"messages[{i}].content")
        if len(content) > MAX_MESSAGE_CHARS:  # text parts joined
            raise RequestError(f"messages[{i}].content is longer than {MAX_MESSAGE_CHARS} characters",
                               f"messages[{i}].content")
        total += len(content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if total > MAX_CONVERSATION_CHARS:
        raise RequestError(f"messages: the conversation is longer than {MAX_CONVERSATION_CHARS} characters", "messages")
    asking = messages[:-1] if messages[-1]["role"] == "assistant" else messages  # a final assistant message is dropped
    if not asking or asking[-1]["role"] != "user":
        raise RequestError("messages: the conversation needs a user message to answer, last (or before a final "
                           "assistant message)", "messages")
    return messages


def citation(query, passages):
    """{"query", "passages": [{"id", "title", "text", "source"}]}: a source is named by its file (and row), without
    the server's folders."""
    return {"query": query, "passages": [{**dataclasses.asdict(p), "source": os.path.basename(p.source)} for p in passages]}


def add_passages(messages, engine):
    """Single-shot RAG: place the passages a search for the last user message finds before it. Returns its citation."""
    from nanochat.retrieval import with_passages
    i = max(i for i, m in enumerate(messages) if m["role"] == "user")
    query = messages[i]["content"]
    passages = engine.search(query)
    messages[i] = {**messages[i], "content": with_passages(query, passages)}
    return citation(query, passages)


def prepare(req, messages, tokenizer, engine, defaults, conversation_is="the conversation is"):
    """Turn a valid request and its conversation(req) into (prompt tokens, sampling settings)."""
    try:
        tokens = tokenizer.render_for_completion({"messages": messages})
    except ValueError as e:
        raise RequestError(f"messages: {e}", "messages") from None
    return tokens, sampling(req, tokens, engine, defaults, "messages", f"{conversation_is} {len(tokens)} tokens",
                            "start a new conversation")


def prepare_text(req, tokenizer, engine, defaults):
    """Turn a valid CompletionRequest into (prompt tokens, sampling settings): <bos> prompt to continue, or with a
    suffix the fill-in-the-middle prompt (nanochat/fim.py)."""
    from nanochat.fim import NO_FIM_MODEL, fim_prompt
    if len(req.prompt) + len(req.suffix or "") > MAX_CONVERSATION_CHARS:  # so a valid body stays under MAX_BODY_BYTES
        raise RequestError(f"prompt and suffix are together longer than {MAX_CONVERSATION_CHARS} characters", "prompt")
    if req.suffix is None:
        tokens = tokenizer.encode(req.prompt, prepend=tokenizer.get_bos_token_id())
    elif not tokenizer.has_fim():
        raise RequestError(f"suffix: {NO_FIM_MODEL}; or leave suffix out to continue the prompt", "suffix")
    else:
        tokens = fim_prompt(tokenizer, req.prompt, req.suffix)
    what = "the prompt is" if req.suffix is None else "prompt and suffix are"
    return tokens, sampling(req, tokens, engine, defaults, "prompt", f"{what} {len(tokens)} tokens", "shorten it")


def sampling(req, tokens, engine, defaults, param, too_long, what_to_do):
    """The sampling settings for a prompt of these tokens; 400 on param when it leaves no room in the context."""
    sequence_len = engine.model.config.sequence_len
    if len(tokens) >= sequence_len:
        raise RequestError(f"{param}: {too_long}, more than this model reads ({sequence_len}): {what_to_do}", param)
    max_tokens = req.token_limit if req.token_limit is not None else defaults["max_tokens"]
    max_tokens = engine.answer_budget(len(tokens), max_tokens)  # an answer that reaches it ends with "length"
    temperature = defaults["temperature"] if req.temperature is None else req.temperature
    top_k = defaults["top_k"] if req.top_k is None else req.top_k
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    return dict(temperature=temperature, top_k=top_k or None, max_tokens=max_tokens, seed=seed)


# -----------------------------------------------------------------------------
# Guards in front of the app: the API key, then the body's size and pace

async def send_error(scope, receive, send, status, message, code=None, headers=None):
    from starlette.responses import JSONResponse
    await JSONResponse(error_body(message, status=status, code=code), status, headers)(scope, receive, send)


class RequireApiKey:
    """ASGI middleware: every path but the public ones needs 'Authorization: Bearer KEY', which OpenAI clients send."""
    PUBLIC = ("/", "/health", "/favicon.ico")  # the page (it asks for the key), load balancers' probe, the icon

    def __init__(self, app, api_key):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.PUBLIC:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: the key cannot be guessed byte by byte
                return await send_error(scope, receive, send, 401, "missing or wrong API key: send 'Authorization: "
                                        "Bearer <key>' with the key the server was started with (--api-key)",
                                        "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class LimitBody:
    """
    ASGI middleware: reads each request's whole body before the app parses it. A declared Content-Length over max_bytes
    is refused at once and a chunked body as soon as it grows past it (413), so a huge body is never parsed; a body
    slower than timeout seconds gets 408, so a client cannot hold a connection by sending half a request.
    """

    def __init__(self, app, max_bytes, timeout):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is over {self.max_bytes} bytes: this server's limits are {MAX_MESSAGES} messages " \
                  f"and {MAX_CONVERSATION_CHARS} characters"
        close = {"Connection": "close"}  # the rest of the body is not read, so the connection cannot be reused
        if int(dict(scope["headers"]).get(b"content-length", 0)) > self.max_bytes:
            return await send_error(scope, receive, send, 413, too_big, headers=close)
        body, more = bytearray(), True
        deadline = time.monotonic() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return await send_error(scope, receive, send, 408,
                                        f"the request body took over {self.timeout:g}s to arrive", headers=close)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await send_error(scope, receive, send, 413, too_big, headers=close)

        replayed = False

        async def replay():  # the body once, then the client's own messages (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def protocol_with_header_deadline(timeout):
    """
    uvicorn's h11 protocol with a deadline on headers: uvicorn has none, so a client that sends half a request line
    would hold its socket forever. A connection gets `timeout` seconds, from when it opens and again after each answer
    (keep-alive), for its next request's headers to arrive; otherwise it is closed. The body's deadline is LimitBody's.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.close_unless_a_request_begins()

        def on_response_complete(self):
            self.close_unless_a_request_begins()  # first: a pipelined request may begin inside super()'s call
            super().on_response_complete()

        def close_unless_a_request_begins(self):
            cycle = self.cycle  # uvicorn starts a new cycle when a request's headers are complete
            self.loop.call_later(timeout, lambda: self.cycle is cycle and self.transport.close())

    return Protocol


# -----------------------------------------------------------------------------
# Workers, the queue in front of them, and one request's generation

class Worker:
    """One model replica on one device, with its Engine. A worker serves one request at a time."""

    def __init__(self, engine, device, gpu_id):
        self.engine, self.device, self.gpu_id = engine, device, gpu_id
        self.model, self.tokenizer = engine.model, engine.tokenizer


class WorkerPool:
    """The free workers and the requests waiting for one: at most max_queue wait, the next is told when to retry."""

    def __init__(self, workers, max_queue):
        self.workers, self.max_queue = workers, max_queue
        self.free = asyncio.Queue()
        for w in workers:
            self.free.put_nowait(w)
        self.admitted = 0  # requests holding a worker or waiting for one
        self.stats = {"requests": 0, "tokens": 0, "seconds": 0.0}

    def has_room(self):
        """Would a request be served now, or queued within the cap?"""
        return self.admitted < len(self.workers) + self.max_queue

    def queued(self):
        return max(0, self.admitted - (len(self.workers) - self.free.qsize()))

    async def acquire(self, request):
        """A free worker, after waiting in line if need be. 503 if the line is full; 400 if the client leaves."""
        if not self.has_room():
            # a place frees when any worker finishes: tell the client about one request's time, spread over the workers
            seconds = self.stats["seconds"] / self.stats["requests"] if self.stats["requests"] else 1.0
            raise RequestError(f"the server is busy ({self.queued()} requests waiting): retry shortly", status=503,
                               headers={"Retry-After": str(max(1, math.ceil(seconds / len(self.workers))))})
        self.admitted += 1
        get = asyncio.ensure_future(self.free.get())
        while True:
            await asyncio.wait([get], timeout=DISCONNECT_POLL)
            if await request.is_disconnected():  # checked once more after getting a worker: no work for a gone client
                if not get.cancel():  # get had taken a worker: hand it back
                    self.free.put_nowait(get.result())
                self.admitted -= 1
                raise RequestError("the client left while waiting for a worker")
            if get.done():
                return get.result()

    def release(self, worker, tokens, seconds):
        self.free.put_nowait(worker)
        self.admitted -= 1
        self.stats["requests"] += 1
        self.stats["tokens"] += tokens
        self.stats["seconds"] += seconds


class Answer:
    """One choice's text as its tokens arrive. It ends at a stop string, which is not sent (as OpenAI does), so text
    that could be the start of one is held back until it is not."""

    def __init__(self, engine, stops):
        from nanochat.engine import TextStream
        self.engine, self.stops = engine, stops
        self.text = TextStream(engine.tokenizer, engine.search if engine.kb is not None else None)
        self.held, self.tokens, self.finish, self.cited = "", 0, None, 0

    def push(self, token):
        """Take one generated token; return the text that is safe to send."""
        self.tokens += 1
        self.held += self.text.push(token)
        cuts = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if cuts:
            return self.end("stop")[:min(cuts)]
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        sendable, self.held = self.held[:len(self.held) - hold], self.held[len(self.held) - hold:]
        return sendable

    def end(self, finish):
        """Finish the answer; return the text still held (and a tool call it was in the middle of)."""
        self.finish, held, self.held = finish, self.held + self.text.flush(), ""
        return held

    def citations(self):
        """The searches shown since the last call, each {"query", "passages": [{"id", "title", "text", "source"}]}."""
        new, self.cited = self.text.searches[self.cited:], len(self.text.searches)
        return [citation(q, self.engine.search(q)) for q in new if self.engine.kb is not None]


class Generation:
    """
    One request's answers (n choices sampled together from one prefill), generated on a worker in a thread so the model
    never blocks the event loop. events() yields ("text", index, piece), ("end", index, finish_reason) per choice, then
    ("done", None, completion_tokens), or ("error", None, message) if the model failed; with a knowledge base, also
    ("citation", index, {"query", "passages"}) after each search that choice's text shows, and first the citations
    given (the passages placed in the prompt).
    """

    def __init__(self, pool, worker, tokens, settings, n, stops, citations=()):
        self.loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.cancelled = threading.Event()
        for i in range(n):
            for citation in citations:
                self.send("citation", i, citation)
        threading.Thread(target=self.run, args=(pool, worker, tokens, settings, n, stops), daemon=True).start()

    def cancel(self):
        """Stop at the next token (the client went away)."""
        self.cancelled.set()

    def send(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def run(self, pool, worker, tokens, settings, n, stops):
        tokenizer, t0 = worker.tokenizer, time.time()
        ends = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        answers = [Answer(worker.engine, stops) for _ in range(n)]
        try:
            for column, _ in worker.engine.generate(tokens, num_samples=n, **settings):
                if self.cancelled.is_set():
                    break
                for i, (answer, token) in enumerate(zip(answers, column)):
                    if answer.finish:  # the engine samples on for every row until all have ended
                        continue
                    text = answer.end("stop") if token in ends else answer.push(token)
                    if text:
                        self.send("text", i, text)
                    for citation in answer.citations():
                        self.send("citation", i, citation)
                    if answer.finish:
                        self.send("end", i, answer.finish)
                if all(a.finish for a in answers):
                    break
            for i, answer in enumerate(answers):
                if not answer.finish:
                    if text := answer.end("length"):
                        self.send("text", i, text)
                    for citation in answer.citations():
                        self.send("citation", i, citation)
                    self.send("end", i, "length")
            self.send("done", None, sum(a.tokens for a in answers))
        except Exception as e:  # reported to the client, never a silent hang
            log.exception("generation failed")
            self.send("error", None, f"generation failed: {e}")
        finally:
            count, seconds = sum(a.tokens for a in answers), time.time() - t0
            # the worker goes back only once its model is idle again
            self.loop.call_soon_threadsafe(pool.release, worker, count, seconds)
            log.info("request: %d prompt tokens -> %d tokens in %.2fs on %s", len(tokens), count, seconds, worker.device)

    async def events(self):
        try:
            while True:
                event = await self.queue.get()
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            self.cancel()  # ends the thread at its next token if the client disconnected mid-stream

    async def collect(self, request):
        """For a non-streaming answer: every event, cancelling if the client leaves meanwhile."""
        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL)
            self.cancel()
        watcher = asyncio.ensure_future(watch())
        try:
            return [event async for event in self.events()]
        finally:
            watcher.cancel()
