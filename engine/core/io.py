"""Atomic writes and canonical JSON, written once for the whole engine.

Every file the engine writes goes through here: a temporary file in the same folder
(`.NAME.PID.RAND.tmp`), flushed and fsync'ed, then `os.replace`d over the target, so a reader
or a crash sees the old file or the new one, never half of one. A failed write leaves no
temporary file behind.

- `canonical(obj)`: the JSON that hashes and cache keys are computed from (sorted keys, no
  whitespace, no NaN).
- `atomic_path(path)`: a context manager yielding the temporary path, for writers that want a
  file name (Parquet, images); replaced into place when the block ends without an error.
- `atomic_write_bytes`, `atomic_write_text`, `atomic_write_json` (pretty, sorted keys).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write to the yielded temporary path; it replaces `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
