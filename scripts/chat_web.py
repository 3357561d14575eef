"""
The web server: a ChatGPT-like UI at /, its streaming endpoint, and an OpenAI-compatible API.

    python -m scripts.chat_web                 # then open http://localhost:8000
    python -m scripts.chat_web -n 8            # one model replica per GPU; requests go to whichever is free

Endpoints: GET / (the UI), POST /chat/completions (server-sent events: {"token": ...} then {"done": true}),
POST /v1/chat/completions and GET /v1/models (for OpenAI clients), GET /health, GET /stats.
"""

import asyncio
import contextlib
import json
import logging
import os
import random
import threading
import time
import uuid
from typing import Optional, Union

import nanochat
from nanochat.common import Flags, UserError, compute_init, get_compute_dtype, print_result, run_cli

log = logging.getLogger("chat_web")

# Abuse limits: a request outside them gets HTTP 400 naming the field
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)  # 0 = the whole vocabulary
MAX_TOKENS_RANGE = (1, 4096)


class Worker:
    """One model replica on one device, with its Engine. A worker serves one request at a time."""

    def __init__(self, model, tokenizer, device, gpu_id):
        from nanochat.engine import Engine
        self.model, self.tokenizer, self.device, self.gpu_id = model, tokenizer, device, gpu_id
        self.engine = Engine(model, tokenizer)


class RequestError(Exception):
    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message, param=None):
    return {"error": {"message": message, "type": "invalid_request_error", "param": param}}


def check_limits(messages, temperature, top_k, max_tokens):
    if not 1 <= len(messages) <= MAX_MESSAGES:
        raise RequestError(f"messages: between 1 and {MAX_MESSAGES} messages", "messages")
    total = 0
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be user, assistant or system, not {m['role']!r}", f"messages[{i}].role")
        if not m["content"].strip() and m["role"] != "assistant":
            raise RequestError(f"messages[{i}].content is empty", f"messages[{i}].content")
        if len(m["content"]) > MAX_MESSAGE_CHARS:
            raise RequestError(f"messages[{i}].content is longer than {MAX_MESSAGE_CHARS} characters", f"messages[{i}].content")
        total += len(m["content"])
    if total > MAX_CONVERSATION_CHARS:
        raise RequestError(f"messages: the conversation is longer than {MAX_CONVERSATION_CHARS} characters", "messages")
    for name, value, (lo, hi) in (("temperature", temperature, TEMPERATURE_RANGE), ("top_k", top_k, TOP_K_RANGE),
                                  ("max_tokens", max_tokens, MAX_TOKENS_RANGE)):
        if not lo <= value <= hi:
            raise RequestError(f"{name} must be between {lo} and {hi}", name)


def create_app(workers, default_temperature=0.8, default_top_k=50, default_max_tokens=512, model_name="nanochat",
               on_shutdown=None):
    """
    The FastAPI app over a list of Workers. Generation runs in threads, so the event loop stays responsive.
    on_shutdown(stats) runs when the server stops (uvicorn re-raises Ctrl-C/SIGTERM after, so nothing runs later).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel

    from nanochat.engine import TextStream

    class Message(BaseModel):
        role: str
        content: Union[str, list]  # OpenAI clients may send a list of {"type": "text", "text": ...} parts

    class ChatRequest(BaseModel):
        messages: list[Message]
        temperature: Optional[float] = None
        top_k: Optional[int] = None
        max_tokens: Optional[int] = None
        max_completion_tokens: Optional[int] = None
        seed: Optional[int] = None
        stream: bool = False
        model: Optional[str] = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown:
            on_shutdown(stats)

    stats = {"requests": 0, "tokens": 0}
    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    pool = asyncio.Queue()
    for w in workers:
        pool.put_nowait(w)
    with open(os.path.join(os.path.dirname(nanochat.__file__), "ui.html")) as f:
        ui_html = f.read()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"),
                                status_code=400)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'request'}: {first.get('msg', 'invalid request')}", param), status_code=422)

    @app.exception_handler(RequestError)
    async def request_error(request, exc):
        return JSONResponse(error_body(exc.message, exc.param), status_code=exc.status)

    def prepare(req):
        """Validate a request and turn it into (prompt tokens, sampling settings)."""
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(
                p.get("text", "") for p in m.content if isinstance(p, dict) and p.get("type") == "text")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        temperature = default_temperature if req.temperature is None else req.temperature
        top_k = default_top_k if req.top_k is None else req.top_k
        max_tokens = next((m for m in (req.max_tokens, req.max_completion_tokens) if m is not None), default_max_tokens)
        check_limits(messages, temperature, top_k, max_tokens)
        tokenizer = workers[0].tokenizer
        try:
            tokens = tokenizer.render_for_completion({"messages": messages})
        except ValueError as e:
            raise RequestError(f"messages: {e}", "messages") from None
        limit = workers[0].model.config.sequence_len
        if len(tokens) >= limit:
            raise RequestError(f"messages: the conversation is {len(tokens)} tokens, more than this model reads "
                               f"({limit}): start a new conversation", "messages")
        max_tokens = min(max_tokens, 10 * limit - len(tokens))  # the rotary tables cover 10x the training context
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        return tokens, dict(temperature=temperature, top_k=top_k or None, max_tokens=max_tokens, seed=seed)

    def release(worker, count, seconds, prompt_len):
        pool.put_nowait(worker)
        stats["requests"] += 1
        stats["tokens"] += count
        log.info("request: %d prompt tokens -> %d tokens in %.2fs on %s", prompt_len, count, seconds, worker.device)

    async def generate(tokens, settings):
        """Yield (worker, text piece, None) as pieces come, then (worker, None, finish_reason)."""
        worker = await pool.get()
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        stop = threading.Event()
        tokenizer = worker.tokenizer
        stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

        def send(*item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        def run():  # in a thread, so the model never blocks the event loop
            finish, count, t0 = "length", 0, time.time()
            try:
                text = TextStream(tokenizer)
                for column, _ in worker.engine.generate(tokens, num_samples=1, **settings):
                    if stop.is_set():  # the client went away
                        finish = "cancelled"
                        break
                    if column[0] in stops:
                        finish = "stop"
                        break
                    count += 1
                    send("text", text.push(column[0]))
            except Exception as e:  # reported to the client, never a silent hang
                log.exception("generation failed")
                finish = f"error: {e}"
            finally:
                send("end", finish)
                # the worker goes back only once its model is idle again
                loop.call_soon_threadsafe(release, worker, count, time.time() - t0, len(tokens))

        threading.Thread(target=run, daemon=True).start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    yield worker, None, value
                    return
                if value:
                    yield worker, value, None
        finally:
            stop.set()  # if the client disconnected, this ends the generation thread at its next token

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return ui_html

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": True, "num_gpus": sum(w.device.type == "cuda" for w in workers),
                "available_workers": pool.qsize()}

    @app.get("/stats")
    async def worker_stats():
        return {"total_workers": len(workers), "available_workers": pool.qsize(), "busy_workers": len(workers) - pool.qsize(),
                "requests_served": stats["requests"], "tokens_generated": stats["tokens"],
                "workers": [{"gpu_id": w.gpu_id, "device": str(w.device)} for w in workers]}

    @app.post("/chat/completions")
    async def chat_completions(req: ChatRequest):
        tokens, settings = prepare(req)

        async def events():
            async for worker, text, finish in generate(tokens, settings):
                if text is not None:
                    yield f"data: {json.dumps({'token': text, 'gpu': worker.gpu_id})}\n\n"
                elif finish.startswith("error"):
                    yield f"data: {json.dumps(error_body(finish))}\n\n"
            yield f"data: {json.dumps({'done': True})}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(req: ChatRequest):
        tokens, settings = prepare(req)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": completion_id, "created": created, "model": model_name}

        def openai_finish(finish):
            return "stop" if finish in ("stop", "cancelled") else finish if finish == "length" else "error"

        if req.stream:
            async def chunks():
                first = {**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                yield f"data: {json.dumps(first)}\n\n"
                async for _, text, finish in generate(tokens, settings):
                    delta = {"content": text} if text is not None else {}
                    choice = {"index": 0, "delta": delta, "finish_reason": None if text is not None else openai_finish(finish)}
                    yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")

        pieces, finish = [], "stop"
        async for _, text, end in generate(tokens, settings):
            if text is not None:
                pieces.append(text)
            else:
                finish = end
        if finish.startswith("error"):
            raise RequestError(finish, status=500)
        completion_tokens = len(workers[0].tokenizer.encode("".join(pieces)))
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": openai_finish(finish)}],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": completion_tokens,
                          "total_tokens": len(tokens) + completion_tokens}}

    return app


def main(argv=None):
    p = Flags(description="Serve a nanochat model: web UI and OpenAI-compatible API.")
    p.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU")
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default answer length limit")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("-p", "--port", type=int, default=8000)
    p.add_argument("--host", default="0.0.0.0", help="0.0.0.0 listens on every interface; 127.0.0.1 on this machine only")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    args = p.parse_args(argv)
    if args.num_gpus < 1:
        raise UserError("--num-gpus must be at least 1")
    import torch
    import uvicorn

    from nanochat.checkpoint_manager import load_model

    _, _, _, _, device = compute_init(args.device_type)
    dtype = get_compute_dtype(device.type)[0]
    if device.type == "cuda":
        if args.num_gpus > torch.cuda.device_count():
            raise UserError(f"--num-gpus={args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    else:
        devices = [device]  # one worker on CPU or MPS
    workers = []
    for gpu_id, dev in enumerate(devices):
        model, tokenizer, meta = load_model(args.source, dev, dtype, model_tag=args.model_tag, step=args.step)
        workers.append(Worker(model, tokenizer, dev, gpu_id))
    model_name = f"nanochat-{args.source}-{args.model_tag or 'd' + str(workers[0].model.config.n_layer)}-step{meta['step']}"
    def report(stats):
        print_result("chat_web", model=model_name, workers=len(workers), requests=stats["requests"],
                     tokens_generated=stats["tokens"])
    app = create_app(workers, args.temperature, args.top_k, args.max_tokens, model_name, on_shutdown=report)
    print(f"serving {model_name} on {len(workers)} worker(s): http://{'localhost' if args.host == '0.0.0.0' else args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run_cli(main)
