"""The `openai` backend: any OpenAI-compatible chat-completions server (vLLM, TGI, llama.cpp,
the OpenAI API itself, or a local model behind vLLM's or llama.cpp's server).

- One POST {base_url}/chat/completions per prompt with `n` = params.n; a server that returns
  fewer choices gets follow-up requests (for the missing ones, with a derived seed).
- Each prompt has its own seed (a list, or `seed + i` for an int), so results do not depend on
  concurrency or order.
- At most `max_concurrency` requests in flight (a thread pool).
- 429, 408, 5xx, connection errors, timeouts and garbled responses are retried with
  exponential backoff and jitter (0.5 s doubling, capped at 8 s, at least Retry-After), up to
  `max_retries` times; any other 4xx fails at once. Failures raise `BackendError`, one line
  naming the URL, the cause and what to do.
- With `cache_dir`, every response is stored as `<sha256 of the request>.json` (the request
  is the canonical JSON of model, messages, sampling params and seed; never the API key),
  written atomically, so a killed stage resumes request by request and a rerun sends nothing.
- The API key is read from `os.environ[api_key_env]` when a request is sent; it is never
  stored on the object, in a cache file or in a cache key, and is scrubbed from messages.

Transport is the `openai` SDK (its HTTP client, auth, timeouts and error types), imported when
the first request is sent; the retry policy above stays the engine's (the SDK's own retries are
off): it stops waiting when another prompt's request has failed, takes an injectable clock for
tests, and reports every attempt in one line. The raw response JSON is what the cache keeps,
exactly as the server sent it. Importing this module imports neither the SDK nor torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from engine.core.errors import CacheError, RecipeError
from engine.models.backends import BuildRequest, Completion, SamplingParams
from engine.models.backends.requests import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    RETRY_STATUSES,
    BackendError,
    _is_loopback,
    _Retryable,
    canonical_json,
    derived_seed,
    one_line,
    request_key,
)


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_concurrency: int = 4,
        timeout_s: float = 60,
        max_retries: int = 5,
        cache_dir: Path | str | None = None,
        sleep: Callable[[float], Any] = time.sleep,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        parsed = urllib.parse.urlsplit(str(base_url).strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise BackendError(
                f"openai backend: base_url '{base_url}' is not an http(s) URL; use e.g. http://127.0.0.1:8000/v1."
            )
        self.base_url = str(base_url).strip().rstrip("/")
        self.endpoint = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self._sleep = sleep
        self._jitter = random.Random()  # private: never disturb the global RNG that seeds sampling
        self._loopback = _is_loopback(parsed.hostname)  # reached directly even when an http(s)_proxy is set
        self._sdk: Any = None  # the openai client, made on the first request (it holds no key: see _post)
        self._stats_lock = threading.Lock()
        self.http_requests = 0  # attempts sent (retries included)
        self.cache_hits = 0

    # -- the Backend protocol --

    def generate(self, prompts: list[list[dict]], params: SamplingParams, seed) -> list[list[Completion]]:
        if not prompts:
            return []
        if params.n < 1:
            raise BackendError(f"openai backend: n must be >= 1 (got {params.n}).")
        from engine.models.backends import prompt_seeds

        seeds = prompt_seeds(seed, len(prompts))
        abort = threading.Event()
        pool = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(prompts)), thread_name_prefix="openai-backend"
        )
        try:
            futures: dict[Future, int] = {
                pool.submit(self._prompt, messages, params, seeds[i], abort): i for i, messages in enumerate(prompts)
            }
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = sorted((futures[f], f) for f in done if f.exception() is not None)
            if failed:
                raise failed[0][1].exception()  # type: ignore[misc]
            results = {futures[f]: f.result() for f in futures}
        except BaseException:
            abort.set()  # running workers stop before their next attempt; queued ones never start
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return [results[i] for i in range(len(prompts))]

    def close(self) -> None:
        """Nothing to release: the model lives on the server."""

    # -- one prompt --

    def payload(self, messages: list[dict], params: SamplingParams, n: int, seed: int) -> dict:
        """The request body (also what the cache key hashes). Never holds the API key."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "n": int(n),
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "max_tokens": int(params.max_new_tokens),
            "seed": int(seed),
        }
        if params.top_k:  # not in the OpenAI API; vLLM and others accept it
            body["top_k"] = int(params.top_k)
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _prompt(
        self, messages: list[dict], params: SamplingParams, seed: int, abort: threading.Event
    ) -> list[Completion]:
        comps: list[Completion] = []
        round_ = 0
        while len(comps) < params.n:
            want = params.n - len(comps)
            payload = self.payload(messages, params, want, derived_seed(seed, round_))
            response = self._cached(payload, abort)
            got = self._completions(response, params)[:want]
            if not got:
                raise BackendError(
                    f"openai backend: {self.endpoint} returned no choices for a request with "
                    f"n={want}; check that the server supports chat completions for model '{self.model}'."
                )
            comps += got
            round_ += 1
        return comps

    def _completions(self, response: dict, params: SamplingParams) -> list[Completion]:
        choices = sorted(response["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        usage = response.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        total = int(usage.get("completion_tokens") or 0)
        k = len(choices)
        out = []
        for j, choice in enumerate(choices):
            message = choice.get("message") or {}
            text = message.get("content") or ""
            raw = choice.get("finish_reason")
            finish = "length" if raw == "length" else "stop"
            for stop in params.stop:  # in case the server ignored `stop`
                if stop and stop in text:
                    text, finish = text[: text.index(stop)], "stop"
            # usage counts all choices together; split it evenly when there are several
            tokens = total // k + (1 if j < total % k else 0)
            meta: dict[str, Any] = {}
            if raw not in ("stop", "length"):
                meta["finish_reason"] = raw
            if k > 1:
                meta["completion_tokens_estimated"] = True
            out.append(Completion(text.strip(), prompt_tokens, tokens, finish, meta))
        return out

    # -- cache --

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key}.json" if self.cache_dir is not None else None

    def _cached(self, payload: dict, abort: threading.Event) -> dict:
        key = request_key(payload)
        path = self._cache_path(key)
        if path is not None and path.is_file():
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
                if entry.get("request") == payload and self._valid(entry.get("response")):
                    with self._stats_lock:
                        self.cache_hits += 1
                    return entry["response"]
            except (OSError, ValueError, AttributeError):
                pass  # unreadable or torn: ask again and overwrite it
        response = self._request(payload, abort)
        if path is not None:
            self._store(path, {"key": key, "request": payload, "response": response})
        return response

    def _store(self, path: Path, entry: dict) -> None:
        from engine.core.io import atomic_write_text

        try:
            atomic_write_text(path, canonical_json(entry))
        except OSError as exc:
            raise CacheError(f"cannot write the request cache file {path}: {exc}") from None

    # -- HTTP --

    @staticmethod
    def _valid(response: Any) -> bool:
        return (
            isinstance(response, dict)
            and isinstance(response.get("choices"), list)
            and all(isinstance(c, dict) for c in response["choices"])
        )

    def _api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise BackendError(
                f"openai backend: environment variable {self.api_key_env} (api_key_env) is not set; "
                f"export it with the API key for {self.base_url}."
            )
        return key

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.backoff_cap_s, self.backoff_base_s * (2**attempt))
        backoff *= 0.5 + 0.5 * self._jitter.random()  # jitter: spread clients that failed together
        if retry_after is not None:
            backoff = max(backoff, retry_after)
        return min(self.backoff_cap_s, backoff)

    def _request(self, payload: dict, abort: threading.Event) -> dict:
        key = self._api_key()
        attempts = self.max_retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            if abort.is_set():
                raise BackendError(f"openai backend: POST {self.endpoint} cancelled (another request failed).")
            try:
                return self._post(payload, key)
            except _Retryable as exc:
                last = exc
                if attempt + 1 < attempts and not abort.is_set():
                    self._sleep(self._delay(attempt, exc.retry_after))
        assert last is not None
        raise BackendError(
            self._scrub(
                f"openai backend: POST {self.endpoint} failed after {attempts} attempt{'s' * (attempts > 1)}: "
                f"{last.cause}. {last.hint}",
                key,
            )
        )

    def _client(self) -> Any:
        import openai

        with self._stats_lock:
            if self._sdk is None:
                self._sdk = openai.OpenAI(
                    base_url=self.base_url,
                    api_key="unused",  # never the key: it goes in each request's headers (_post)
                    max_retries=0,  # the engine's retry policy (_request)
                    timeout=self.timeout_s,
                    default_headers={"User-Agent": "recipe-engine/openai-backend"},
                    http_client=openai.DefaultHttpxClient(trust_env=not self._loopback),
                )
            return self._sdk

    def _post(self, payload: dict, key: str | None) -> dict:
        import openai

        body = dict(payload)
        extra = {k: body.pop(k) for k in ("top_k",) if k in body}  # not in the OpenAI API; vLLM takes it
        auth = {"Authorization": f"Bearer {key}" if key else openai.Omit()}
        with self._stats_lock:
            self.http_requests += 1
        try:
            raw = self._client().chat.completions.with_raw_response.create(
                **body, extra_body=extra or None, extra_headers=auth
            )
            text = raw.http_response.text
        except openai.APITimeoutError:
            raise self._timeout() from None
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc.__cause__ or exc) from None
        except openai.APIStatusError as exc:
            raise self._http_error(exc, key) from None
        try:
            response = json.loads(text)
        except ValueError:
            raise _Retryable(
                f"the response is not JSON ({one_line(text[:120])!r})",
                "Check that base_url points at an OpenAI-compatible API (it usually ends in /v1).",
            ) from None
        if not self._valid(response):
            raise BackendError(
                f"openai backend: {self.endpoint} returned JSON without a 'choices' list; "
                f"check that base_url points at an OpenAI-compatible API (it usually ends in /v1)."
            )
        return response

    def _timeout(self) -> _Retryable:
        return _Retryable(
            f"no response within timeout_s={self.timeout_s:g}s",
            "The server is overloaded or the generations are long: raise timeout_s, "
            "or lower max_concurrency or max_new_tokens.",
        )

    def _connection_error(self, reason: Any) -> _Retryable:
        if isinstance(reason, TimeoutError) or "timed out" in str(reason).lower():
            return self._timeout()
        text = f"{type(reason).__name__}: {reason}"
        if isinstance(reason, ConnectionRefusedError) or "refused" in text.lower():
            cause = "connection refused"
        elif "name or service not known" in text.lower() or "nodename nor servname" in text.lower():
            cause = f"cannot resolve the host ({reason})"
        else:
            cause = one_line(text)
        return _Retryable(cause, f"Is the server running? Check base_url ({self.base_url}).")

    def _http_error(self, exc: Any, key: str | None) -> Exception:
        """The exception for an HTTP error status (an openai.APIStatusError): _Retryable, or
        BackendError (fail now)."""
        status = exc.status_code
        err = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else exc.body
        message = err.get("message", "") if isinstance(err, dict) else str(err or "")
        message = self._scrub(one_line(message)[:200], key)
        cause = f"HTTP {status}" + (f" ({message})" if message else "")
        if status in RETRY_STATUSES or 500 <= status < 600:
            retry_after = None
            with contextlib.suppress(TypeError, ValueError):
                retry_after = max(0.0, float(exc.response.headers.get("Retry-After")))
            hint = (
                "The server is rate limiting: lower max_concurrency, or try again later."
                if status == 429
                else "The server is failing or overloaded: check its logs."
            )
            return _Retryable(cause, hint, retry_after)
        if status in (401, 403):
            hint = (
                f"Check the API key in ${self.api_key_env}."
                if self.api_key_env
                else "The server requires an API key: set api_key_env to the environment variable holding it."
            )
        elif status == 404:
            hint = f"Check base_url (it usually ends in /v1) and that the server serves model '{self.model}'."
        else:
            hint = "The server rejected the request; check the model name and sampling settings."
        return BackendError(f"openai backend: POST {self.endpoint} failed: {cause}. {hint}")

    def _scrub(self, text: str, key: str | None) -> str:
        return text.replace(key, "***") if key else text


__all__ = ["BackendError", "OpenAIBackend", "canonical_json", "derived_seed", "request_key"]


def build(request: BuildRequest) -> OpenAIBackend:
    """The [models] spec's server; its request cache lives in the stage's partial folder (resume)."""
    spec, name = request.model.spec, request.model.name
    if not spec.base_url:
        raise RecipeError.single(
            f"model '{name}' uses the openai backend but has no base_url.",
            **request.recipe.where(f"models.{name}.base_url"),
        )
    return OpenAIBackend(
        spec.base_url,
        spec.model_name or spec.path,
        api_key_env=spec.api_key_env,
        max_concurrency=spec.max_concurrency,
        timeout_s=spec.timeout_s,
        cache_dir=request.partial_dir / "requests",
    )
