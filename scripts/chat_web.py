"""
The web server: a ChatGPT-like UI at /, its streaming endpoint, and an OpenAI-compatible API.

    python -m scripts.chat_web                 # then open http://localhost:8000
    python -m scripts.chat_web -n 8            # one model replica per GPU; requests go to whichever is free
    python -m scripts.chat_web --api-key KEY   # or NANOCHAT_API_KEY=KEY: the API then needs "Authorization: Bearer KEY"
    python -m scripts.chat_web -i rl --kb wiki # the model may search knowledge base wiki (scripts/rag_index.py)

Endpoints: GET / (the UI), POST /chat/completions (server-sent events: {"token": ..., "index": ...} then {"done": true}),
POST /v1/chat/completions, POST /v1/completions (legacy text completion: a prompt to continue, or with a suffix an infill
by a model pretrained with fill-in-the-middle) and GET /v1/models (for OpenAI clients), GET /health, GET /stats,
GET /favicon.ico.
With an API key, only /, /health and /favicon.ico stay public (the page asks for the key), /openapi.json needs the key
and /docs is off. Requests outside the limits in nanochat/serving.py get 400 naming the field, bodies over
MAX_BODY_BYTES 413, and a full queue 503 with Retry-After. With --kb, the passages an answer read come with it:
{"citation": {"query", "passages"}} events in the UI's stream, "citations" in the API's message (or stream deltas).
"""

import asyncio
import contextlib
import errno
import json
import math
import os
import socket
import time
import uuid

import nanochat
from nanochat.common import Flags, UserError, compute_init, get_compute_dtype, print_result, run_cli
from nanochat.engine import add_decoding_flags
from nanochat.retrieval import add_kb_flags, open_kb
from nanochat.serving import (MAX_BODY_BYTES, MAX_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_K_RANGE, ChatRequest,
                              CompletionRequest, Generation, LimitBody, RequestError, RequireApiKey, Worker, WorkerPool,
                              add_error_handlers, add_passages, conversation, error_body, prepare, prepare_text,
                              protocol_with_header_deadline)

# Slow and busy clients. uvicorn bounds neither how long a request's headers nor its body may take to arrive.
READ_TIMEOUT = 30.0  # seconds to send the headers, then again to send the body; then the connection is dropped
MAX_QUEUE = 8  # requests that may wait for a busy worker; the next gets 503 and Retry-After

FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="4" fill="#1f2328"/>'
           '<text x="8" y="12" font-size="11" font-family="sans-serif" text-anchor="middle" fill="#fff">n</text></svg>')


# -----------------------------------------------------------------------------
# What the completion endpoints send, from a Generation's events

def sse(data):
    return f"data: {json.dumps(data)}\n\n"


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def ui_events(generation, req, prompt_tokens, gpu_id):
    """/chat/completions, the UI's stream: {"token", "index", "gpu"} per piece, {"citation", "index"} per search,
    the usage if asked, then {"done"}."""
    async for kind, index, value in generation.events():
        if kind == "text":
            yield sse({"token": value, "index": index, "gpu": gpu_id})
        elif kind == "citation":
            yield sse({"citation": value, "index": index})
        elif kind == "error":
            yield sse(error_body(value, status=500))
        elif kind == "done" and req.include_usage:
            yield sse({"usage": usage(prompt_tokens, value)})
    yield sse({"done": True})


async def openai_chunks(generation, req, prompt_tokens, base):
    """/v1/chat/completions with stream: OpenAI's chat.completion.chunk events (a search's passages as a delta's
    "citations", a field OpenAI's clients pass through), then [DONE]."""
    def chunk(choices, **extra):
        return sse({**base, "object": "chat.completion.chunk", "choices": choices, **extra})

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(req.choices)])
    async for kind, index, value in generation.events():
        if kind == "text":
            yield chunk([{"index": index, "delta": {"content": value}, "finish_reason": None}])
        elif kind == "citation":
            yield chunk([{"index": index, "delta": {"citations": [value]}, "finish_reason": None}])
        elif kind == "end":
            yield chunk([{"index": index, "delta": {}, "finish_reason": value}])
        elif kind == "error":
            yield sse(error_body(value, status=500))
        elif req.include_usage:  # done: OpenAI's last chunk has no choices, only the usage
            yield chunk([], usage=usage(prompt_tokens, value))
    yield "data: [DONE]\n\n"


async def collect(generation, request, choices):
    """A non-streaming answer: (texts, finish reasons, citations) per choice, and the completion tokens."""
    texts, finishes, completion_tokens = [""] * choices, [None] * choices, 0
    citations = [[] for _ in range(choices)]
    for kind, index, value in await generation.collect(request):
        if kind == "text":
            texts[index] += value
        elif kind == "citation":
            citations[index].append(value)
        elif kind == "end":
            finishes[index] = value
        elif kind == "error":
            raise RequestError(value, status=500)
        else:
            completion_tokens = value
    return texts, finishes, citations, completion_tokens


async def openai_completion(generation, request, req, prompt_tokens, base):
    """/v1/chat/completions without stream: one chat.completion once every choice has ended (a message that searched
    carries the passages it was shown as "citations")."""
    texts, finishes, citations, completion_tokens = await collect(generation, request, req.choices)
    return {**base, "object": "chat.completion",
            "choices": [{"index": i, "finish_reason": finish, "message": {"role": "assistant", "content": text,
                                                                          **({"citations": cited} if cited else {})}}
                        for i, (text, finish, cited) in enumerate(zip(texts, finishes, citations))],
            "usage": usage(prompt_tokens, completion_tokens)}


async def text_chunks(generation, req, prompt_tokens, base):
    """/v1/completions with stream: OpenAI's text_completion events, one piece of one choice each, then [DONE]."""
    def chunk(index, text, finish):
        return sse({**base, "object": "text_completion",
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]})

    async for kind, index, value in generation.events():
        if kind == "text":
            yield chunk(index, value, None)
        elif kind == "end":
            yield chunk(index, "", value)
        elif kind == "error":
            yield sse(error_body(value, status=500))
        elif kind == "done" and req.include_usage:
            yield sse({**base, "object": "text_completion", "choices": [], "usage": usage(prompt_tokens, value)})
    yield "data: [DONE]\n\n"


async def text_completion(generation, request, req, prompt_tokens, base):
    """/v1/completions without stream: one text_completion once every choice has ended."""
    texts, finishes, _, completion_tokens = await collect(generation, request, req.choices)
    return {**base, "object": "text_completion",
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                        for i, (text, finish) in enumerate(zip(texts, finishes))],
            "usage": usage(prompt_tokens, completion_tokens)}


# -----------------------------------------------------------------------------
# The app

def create_app(workers, default_temperature=0.8, default_top_k=50, default_max_tokens=512, model_name="nanochat",
               on_shutdown=None, api_key=None, cors_origins=None, max_queue=MAX_QUEUE, read_timeout=READ_TIMEOUT,
               rag_mode="search"):
    """
    The FastAPI app over a list of Workers. With a knowledge base on their engines, the model searches it (rag_mode
    search), or each question comes with the passages found for it (context). With api_key, every route but /, /health and /favicon.ico needs it and the
    docs are off; CORS then allows only cors_origins (none: same origin only), else cors_origins or any origin.
    on_shutdown(stats) runs when the server stops (uvicorn re-raises Ctrl-C/SIGTERM after, so nothing runs later).
    """
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown:
            on_shutdown(pool.stats)

    docs = {} if not api_key else {"docs_url": None, "redoc_url": None}  # a browser cannot send the key to /docs
    app = FastAPI(title="nanochat", lifespan=lifespan, **docs)
    # added innermost first: CORS answers preflights (which carry no key), then the key, then the body is read
    app.add_middleware(LimitBody, max_bytes=MAX_BODY_BYTES, timeout=read_timeout)
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)
    if cors_origins or not api_key:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins or ["*"], allow_methods=["*"], allow_headers=["*"])
    add_error_handlers(app)
    pool = WorkerPool(workers, max_queue)
    tokenizer = workers[0].tokenizer
    defaults = dict(temperature=default_temperature, top_k=default_top_k, max_tokens=default_max_tokens)
    with open(os.path.join(os.path.dirname(nanochat.__file__), "ui.html")) as f:
        ui_html = f.read()

    async def start(request, req):
        """Validate, wait for a worker, and start generating: (generation, worker, prompt tokens)."""
        messages = conversation(req)
        context = rag_mode == "context" and workers[0].engine.kb is not None
        citations = [await asyncio.to_thread(add_passages, messages, workers[0].engine)] if context else []
        tokens, settings = prepare(req, messages, tokenizer, workers[0].engine, defaults, "with the passages placed before its "
                                   "question, the conversation is" if context else "the conversation is")
        worker = await pool.acquire(request)
        return Generation(pool, worker, tokens, settings, req.choices, req.stops, citations), worker, tokens

    def stream(events, generation):  # the generation stops once the response ends, however it ends
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(generation.cancel))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return ui_html

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(FAVICON, media_type="image/svg+xml")

    @app.get("/health")
    async def health():
        # ready: a request sent now would be served or queued, not refused
        return {"status": "ok", "ready": pool.has_room(), "num_gpus": sum(w.device.type == "cuda" for w in workers),
                "available_workers": pool.free.qsize(), "queued": pool.queued(), "max_queue": max_queue}

    @app.get("/stats")
    async def worker_stats():
        return {"total_workers": len(workers), "available_workers": pool.free.qsize(),
                "busy_workers": len(workers) - pool.free.qsize(), "queued": pool.queued(),
                "requests_served": pool.stats["requests"], "tokens_generated": pool.stats["tokens"],
                "workers": [{"gpu_id": w.gpu_id, "device": str(w.device)} for w in workers]}

    @app.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        generation, worker, tokens = await start(request, req)
        return stream(ui_events(generation, req, len(tokens), worker.gpu_id), generation)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(req: ChatRequest, request: Request):
        generation, _, tokens = await start(request, req)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        if req.stream:
            return stream(openai_chunks(generation, req, len(tokens), base), generation)
        return await openai_completion(generation, request, req, len(tokens), base)

    @app.post("/v1/completions")
    async def openai_text_completions(req: CompletionRequest, request: Request):
        tokens, settings = prepare_text(req, tokenizer, workers[0].engine, defaults)
        worker = await pool.acquire(request)
        generation = Generation(pool, worker, tokens, settings, req.choices, req.stops)
        base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        if req.stream:
            return stream(text_chunks(generation, req, len(tokens), base), generation)
        return await text_completion(generation, request, req, len(tokens), base)

    return app


def listening_socket(host, port):
    """A socket bound to host:port for uvicorn to serve on; a bad --host or a port in use is one clear line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"--host={host!r} does not resolve ({e.strerror}): give an address of this machine, "
                        "like 127.0.0.1, or 0.0.0.0 for all of them") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart while old connections linger
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use: stop what is serving there, or pick another "
                            "port with -p") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): give a --host address of this machine, "
                        "and a -p port you may use") from None
    return sock


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
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on the API (default: $NANOCHAT_API_KEY; none: open to all)")
    p.add_argument("--cors-origins", default="", help="comma-separated origins whose pages may call the API "
                   "(default: any origin without an API key, only the server's own with one)")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests that may wait for a busy worker")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT, help="seconds a client has to send its headers, "
                   "and again its body")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    add_kb_flags(p)
    add_decoding_flags(p)
    p.add_argument("--rag-mode", default="search", choices=["search", "context"], help="with --kb: the model searches "
                   "it (a model trained to, as RAG SFT teaches), or each question gets its passages placed before it")
    args = p.parse_args(argv)
    if args.num_gpus < 1:
        raise UserError("--num-gpus must be at least 1")
    for flag, value, (lo, hi) in (("--temperature", args.temperature, TEMPERATURE_RANGE),
                                  ("--top-k", args.top_k, TOP_K_RANGE), ("--max-tokens", args.max_tokens, MAX_TOKENS_RANGE)):
        if not lo <= value <= hi:
            raise UserError(f"{flag}={value} is outside {lo}..{hi}, the range requests may ask for")
    if args.max_queue < 0 or not (math.isfinite(args.read_timeout) and args.read_timeout > 0):
        raise UserError("--max-queue must be 0 or more and --read-timeout a number of seconds more than 0")
    if not 1 <= args.port <= 65535:
        raise UserError(f"-p/--port={args.port} must be between 1 and 65535")
    if args.rag_mode == "context" and args.kb is None:
        raise UserError("--rag-mode=context places passages from a knowledge base before each question: give --kb NAME")
    kb = open_kb(args)
    import torch
    import uvicorn

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import engine_from_flags

    _, _, _, _, device = compute_init(args.device_type)
    dtype = get_compute_dtype(device.type)[0]
    if device.type == "cuda":
        if args.num_gpus > torch.cuda.device_count():
            raise UserError(f"--num-gpus={args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    elif args.num_gpus > 1:
        raise UserError(f"-n/--num-gpus={args.num_gpus} puts one replica on each GPU, and this server runs on "
                        f"{device.type}, with one worker: leave -n out")
    else:
        devices = [device]  # one worker on CPU or MPS
    sock = listening_socket(args.host, args.port)  # before the model loads: a taken port is one line at once
    workers = []
    for gpu_id, dev in enumerate(devices):
        model, tokenizer, meta = load_model(args.source, dev, dtype, model_tag=args.model_tag, step=args.step)
        workers.append(Worker(engine_from_flags(model, tokenizer, kb, args), dev, gpu_id))
    model_name = f"nanochat-{args.source}-{args.model_tag or 'd' + str(workers[0].model.config.n_layer)}-step{meta['step']}"
    def report(stats):
        print_result("chat_web", model=model_name, workers=len(workers), requests=stats["requests"],
                     tokens_generated=stats["tokens"])
    cors_origins = [o.strip() for o in args.cors_origins.split(",") if o.strip()]
    app = create_app(workers, args.temperature, args.top_k, args.max_tokens, model_name, on_shutdown=report,
                     api_key=args.api_key, cors_origins=cors_origins, max_queue=args.max_queue,
                     read_timeout=args.read_timeout, rag_mode=args.rag_mode)
    print(f"serving {model_name} on {len(workers)} worker(s): http://{'localhost' if args.host == '0.0.0.0' else args.host}:{args.port}",
          flush=True)
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: no --api-key, so anyone who can reach port {args.port} can use the model", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", http=protocol_with_header_deadline(args.read_timeout)))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C, re-raised by uvicorn once it has shut down (and reported)
        pass


if __name__ == "__main__":
    run_cli(main)
