"""
Load on a running chat_web server: N concurrent clients stream answers for a bounded time.
Prints requests/s, time to first token (p50, p99) and errors. Loopback only: point it at your own server.

    python -m scripts.chat_web -i sft --host 127.0.0.1 &
    python -m dev.bench_web --url http://127.0.0.1:8000 --clients 8 --seconds 30
"""

import json
import os
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from nanochat.common import Flags, UserError, print_result, run_cli


def one_request(url, max_tokens, timeout, api_key=None):
    """Stream one answer; returns (seconds to the first token, seconds in all)."""
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story about a river."}],
                       "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url + "/chat/completions", data=body, headers=headers)
    t0, first = time.time(), None
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if "token" in event and first is None:
                    first = time.time() - t0
                if event.get("done"):
                    break
    return first if first is not None else time.time() - t0, time.time() - t0


def main(argv=None):
    p = Flags(description="Concurrent streaming load on a chat_web server.")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0, help="clients start new requests until then")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY") or None,
                   help="for a server started with one (default: $NANOCHAT_API_KEY)")
    args = p.parse_args(argv)
    host = urllib.parse.urlsplit(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"--url must be a server on this machine (127.0.0.1 or localhost), not {host}")
    try:
        urllib.request.urlopen(args.url + "/health", timeout=5)
    except OSError as e:
        raise UserError(f"no server at {args.url} ({e}): start one with python -m scripts.chat_web") from None
    key = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        urllib.request.urlopen(urllib.request.Request(args.url + "/v1/models", headers=key), timeout=5)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise UserError(f"the server at {args.url} wants {'another' if args.api_key else 'an'} API key: pass the one "
                            "it was started with as --api-key (or NANOCHAT_API_KEY)") from None
        raise

    ttfts, durations, errors = [], [], []
    lock = threading.Lock()
    deadline = time.time() + args.seconds

    def client():
        while time.time() < deadline:
            try:
                ttft, total = one_request(args.url, args.max_tokens, timeout=args.seconds + 120, api_key=args.api_key)
                with lock:
                    ttfts.append(ttft)
                    durations.append(total)
            except Exception as e:
                with lock:
                    errors.append(repr(e))

    t0 = time.time()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    ms = lambda q: round(1000 * statistics.quantiles(ttfts, n=100)[q - 1], 1) if len(ttfts) > 1 else (round(1000 * ttfts[0], 1) if ttfts else None)
    result = {"clients": args.clients, "seconds": round(elapsed, 2), "requests": len(ttfts),
              "requests_per_second": round(len(ttfts) / elapsed, 3), "ttft_p50_ms": ms(50), "ttft_p99_ms": ms(99),
              "mean_request_seconds": round(statistics.mean(durations), 3) if durations else None, "errors": len(errors)}
    print(f"{result['requests']} requests in {elapsed:.1f}s from {args.clients} clients: {result['requests_per_second']} req/s, "
          f"TTFT p50 {result['ttft_p50_ms']} ms, p99 {result['ttft_p99_ms']} ms, errors {len(errors)}")
    for e in errors[:3]:
        print("error:", e)
    print_result("bench_web", **result)


if __name__ == "__main__":
    run_cli(main)
