"""An OpenAI-compatible chat-completions server over any `Backend` (usually `HFBackend`).

    POST /v1/chat/completions   {"model", "messages", "n", "temperature", "top_p", "top_k",
                                 "max_tokens", "stop", "seed"} -> a standard chat.completion
    GET  /v1/models             the one model served

A test fixture, not part of the product: stdlib only (`http.server`), it exists so the `openai`
backend can be tested end to end against a real HTTP server with knobs no real server has.
Serving a local model to OpenAI clients is the job of vLLM's server (`vllm serve`) or
llama.cpp's (`llama-server`). By hand, from the checkout:

    PYTHONPATH=. python tests/chatserver.py --model builtin:tiny-chat --port 8000 [--api-key-env VAR]

Model calls are serialized with a lock (one model, one global torch RNG); requests are
accepted concurrently, so `in_flight` / `max_in_flight` show how many a client had open at
once. Test knobs: `fail_first=N` answers the first N chat requests with `fail_status`
(429 by default) before serving normally; `delay_s` holds each chat request that long;
`max_n` caps the choices per response (as some servers do), to test follow-up requests.
Every chat request received is counted in `requests` (failed and rejected ones included).

torch and transformers are imported only by `main`, when it loads a model.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from engine.models.backends import Completion, SamplingParams

MAX_BODY = 32 * 1024 * 1024


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def _content(value: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise _BadRequest(400, "only text content parts are supported")
        return "".join(parts)
    if value is None:
        return ""
    raise _BadRequest(400, "message content must be a string or a list of text parts")


def _number(body: dict, key: str, default: Any, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise _BadRequest(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _BadRequest(400, f"'{key}' is out of range ({value})")
    return value


def parse_request(body: Any) -> tuple[list[dict], SamplingParams, int]:
    """(messages, sampling params, seed) from a chat-completions request body."""
    if not isinstance(body, dict):
        raise _BadRequest(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(400, "'messages' must be a non-empty list")
    msgs = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _BadRequest(400, "each message must be an object with a 'role' and 'content'")
        msgs.append({"role": m["role"], "content": _content(m.get("content"))})
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _BadRequest(400, "'stop' must be a string or a list of strings")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = SamplingParams(
        n=_number(body, "n", 1, int, 1, 128),
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, int, 0) if body.get("top_k") != -1 else 0,  # vLLM: -1 = off
        max_new_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 256, int, 1),
        stop=stop,
    )
    if params.top_p == 0.0:
        raise _BadRequest(400, "'top_p' must be > 0")
    seed = body.get("seed")
    seed = random.randrange(2**31) if seed is None else _number(body, "seed", 0, int)
    return msgs, params, seed


class ChatServer:
    """Serve `backend` at http://host:port/v1 from a daemon thread. Use as a context manager,
    or call `start()` and `stop()`."""

    def __init__(
        self,
        backend: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        fail_first: int = 0,
        *,
        fail_status: int = 429,
        delay_s: float = 0.0,
        model_name: str | None = None,
        max_n: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.backend, self.host, self.port = backend, host, port
        self.api_key, self.fail_first, self.fail_status = api_key, fail_first, fail_status
        self.delay_s, self.model_name, self.verbose = delay_s, model_name, verbose
        self.max_n = max_n  # answer at most this many choices per request (like servers that cap n)
        self.requests = 0  # chat-completion requests received (all, failed ones included)
        self.in_flight = 0
        self.max_in_flight = 0
        self._counter_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> ChatServer:
        if self._httpd is not None:
            return self
        server = self

        class Handler(_Handler):
            chat = server

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            args=(0.05,),  # quick stop()
            name=f"chat-server:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base_url clients use: http://HOST:PORT/v1."""
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}/v1"

    @property
    def served_model(self) -> str:
        return self.model_name or "default"

    # -- requests --

    def _enter(self) -> int:
        with self._counter_lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.requests

    def _leave(self) -> None:
        with self._counter_lock:
            self.in_flight -= 1

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), self.api_key.encode())

    def complete(self, body: Any) -> dict:
        messages, params, seed = parse_request(body)
        model = body.get("model") or self.served_model
        if self.model_name and model != self.model_name:
            raise _BadRequest(
                404, f"The model '{model}' does not exist (this server serves '{self.model_name}')", "model_not_found"
            )
        if self.max_n is not None and params.n > self.max_n:
            params = replace(params, n=self.max_n)
        with self._model_lock:
            comps: list[Completion] = self.backend.generate([messages], params, seed)[0]
        prompt_tokens = comps[0].prompt_tokens if comps else 0
        completion_tokens = sum(c.completion_tokens for c in comps)
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": None,
                }
                for i, c in enumerate(comps)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


class _Handler(BaseHTTPRequestHandler):
    chat: ChatServer  # set on the subclass made by ChatServer.start
    server_version = "recipe-chat-server/1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.chat.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        # a request leaves the in-flight count before its answer goes out, so a client that sends
        # its next request on receipt is never counted twice
        self._done()
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timed out)
            pass

    def _error(
        self, status: int, message: str, type_: str = "invalid_request_error", headers: dict | None = None
    ) -> None:
        self._send(status, {"error": {"message": message, "type": type_, "param": None, "code": status}}, headers)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self) -> None:
        if self._path() in ("/v1/models", "/models"):
            if not self.chat.authorized(self.headers.get("Authorization")):
                return self._error(401, "Incorrect API key provided.", "authentication_error")
            name = self.chat.served_model
            return self._send(
                200, {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "recipe"}]}
            )
        if self._path() in ("", "/health"):
            return self._send(200, {"status": "ok"})
        self._error(404, f"no route GET {self.path}", "not_found")

    def do_POST(self) -> None:
        if self._path() not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route POST {self.path}", "not_found")
        chat = self.chat
        n = chat._enter()
        self._counted = chat
        try:
            try:  # read the body first, so even a rejected request leaves a clean connection
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise _BadRequest(413, "the request body is too large")
                raw = self.rfile.read(length) if length > 0 else b""
            except ValueError:
                return self._error(400, "bad Content-Length")
            except _BadRequest as exc:
                return self._error(exc.status, exc.message, exc.type)
            if chat.delay_s:
                time.sleep(chat.delay_s)
            if n <= chat.fail_first:
                return self._error(
                    chat.fail_status,
                    f"simulated failure {n} of {chat.fail_first}",
                    "rate_limit_error" if chat.fail_status == 429 else "server_error",
                    {"Retry-After": "0"},
                )
            if not chat.authorized(self.headers.get("Authorization")):
                return self._error(401, "Incorrect API key provided.", "authentication_error")
            try:
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise _BadRequest(400, "the request body is missing or not valid JSON") from None
                response = chat.complete(body)
            except _BadRequest as exc:
                return self._error(exc.status, exc.message, exc.type)
            except Exception as exc:  # a model failure: the client may retry a 500
                return self._error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
            self._send(200, response)
        finally:
            self._done()

    def _done(self) -> None:
        counted, self._counted = getattr(self, "_counted", None), None
        if counted is not None:
            counted._leave()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tests/chatserver.py", description="Serve a model over an OpenAI-compatible chat-completions API."
    )
    parser.add_argument("--model", required=True, help="builtin:NAME, a local model directory, or a hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key-env",
        default=None,
        help="require 'Authorization: Bearer $VAR' (the key is read from this environment variable)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the name clients must send as 'model' (default: the --model value)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--cache-root",
        default=None,
        help="where builtin models are built (default: $RECIPE_RUNS_DIR/cache or ./runs/cache)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is not set")
    cache_root = args.cache_root or os.path.join(os.environ.get("RECIPE_RUNS_DIR", "runs"), "cache")

    from engine.models.backends.hf import HFBackend
    from engine.models.weights import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, cache_root=cache_root)
    backend = HFBackend(model, tok, batch_size=args.batch_size)
    server = ChatServer(
        backend,
        args.host,
        args.port,
        api_key=api_key,
        model_name=args.served_model_name or args.model,
        verbose=not args.quiet,
    )
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly on kill, like on Ctrl-C
    print(f"serving {args.model} at {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
