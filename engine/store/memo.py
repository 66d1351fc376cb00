"""Row memos: what a row stage made of each input row, kept across runs and keys.

    cache/rows/<ns>/<sha256>.json   {"rows": {row key: {"out": [output rows], "stats": {...}}}}

`ns` names the stage's own definition and what it maps (engine.store.fingerprint.definition,
plus a purpose: preferences maps twice); a row key is the digest of the input row's content.
Random streams derive from the same parts (engine.core.seeds), so a memoized row is exactly what
computing it again would give: a re-run with two new prompts computes those two and reuses the
rest, and an eval with a new tuned model asks only that model.

A file is written once (temporary name, then renamed) and named by the sha256 of its bytes; a
file whose bytes no longer match its name is removed when read and its rows are computed again.
Files hold rows and numbers, never a path. `recipe gc` keeps the namespaces its kept entries
list in their manifests (`memos`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from engine.core.hashing import digest

ROOT = "rows"  # under the store's root (runs/cache/rows)


def namespace(definition: str, purpose: str = "") -> str:
    return digest({"definition": definition, "purpose": purpose})[:24]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as the Python values Parquet would store."""
    for attr in ("item", "tolist"):
        if hasattr(value, attr):
            return getattr(value, attr)()
    return str(value)


def plain(obj: Any) -> Any:
    """`obj` as it comes back from a memo (JSON, key order kept): fresh rows are handed on in this
    form too, so a reused row and a computed one are the same values."""
    return json.loads(json.dumps(obj, ensure_ascii=False, default=_plain))


class RowMemo:
    def __init__(self, root: Path, ns: str, log: logging.Logger | None = None) -> None:
        self.dir = Path(root) / ns
        self.log = log or logging.getLogger(__name__)
        self._index: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        index: dict[str, dict] = {}
        if not self.dir.is_dir():
            return index
        for path in sorted(self.dir.glob("*.json")):
            try:
                blob = path.read_bytes()
                if hashlib.sha256(blob).hexdigest() != path.stem:
                    raise ValueError("its bytes do not match its name")
                index.update(json.loads(blob)["rows"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.log.warning("row memo %s is damaged (%s); its rows will be computed again", path.name, exc)
                path.unlink(missing_ok=True)
        return index

    def get(self, key: str) -> dict | None:
        if self._index is None:
            self._index = self._load()
        return self._index.get(key)

    def put(self, results: dict[str, dict]) -> None:
        """Keep `results` (row key -> {"out": rows, "stats": dict}) in one new file."""
        if not results:
            return
        blob = json.dumps({"rows": results}, ensure_ascii=False, default=_plain).encode("utf-8")
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{hashlib.sha256(blob).hexdigest()}.json"
        tmp = self.dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(blob)
        os.replace(tmp, final)
        if self._index is not None:
            self._index.update(json.loads(blob)["rows"])
