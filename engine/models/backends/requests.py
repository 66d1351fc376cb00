"""The openai backend's requests: retry policy (429/5xx with capped backoff), the key a request is
cached under for resume, per-request seeds, and errors that never show an API key.
"""

from __future__ import annotations

import hashlib
from typing import Any

BACKOFF_BASE_S = 0.5


BACKOFF_CAP_S = 8.0


RETRY_STATUSES = frozenset({408, 429})  # and every 5xx


class BackendError(Exception):
    """A generation backend could not produce completions (server down, rejected request,
    retries exhausted). The message is one line: the URL, the cause and what to do."""


class _Retryable(Exception):
    def __init__(self, cause: str, hint: str, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause, self.hint, self.retry_after = cause, hint, retry_after


def canonical_json(obj: Any) -> str:
    """The engine's one canonical JSON (engine.core.io.canonical): request cache keys and files."""
    from engine.core.io import canonical

    return canonical(obj)


def request_key(payload: dict) -> str:
    """The cache key of a request: sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def derived_seed(seed: int, round_: int) -> int:
    """The seed of the round-th follow-up request of one prompt (round 0 uses `seed`)."""
    if round_ == 0:
        return seed
    from engine.core.seeds import derive

    return derive(seed, "follow-up", round_) & 0x7FFFFFFF


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_loopback(host: str | None) -> bool:
    return bool(host) and (host == "localhost" or host == "::1" or host.startswith("127."))  # type: ignore[union-attr]
