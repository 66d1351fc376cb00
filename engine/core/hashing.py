"""Content hashes: of JSON-able objects (canonical JSON), of files and folders (memoized by
inode, size and mtime), and the commit a hub revision resolves to in the local hub cache.

Everything that identifies content by hash (fingerprints, shard checksums, builtin model
checksums) goes through here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from engine.core.io import atomic_write_text, canonical


def is_file(value: str) -> bool:
    """Whether a setting that may hold a file name or inline text (a chat template) names a
    file. Inline text can be too long for the OS to stat."""
    if "\n" in value or "{" in value:
        return False
    try:
        return Path(value).is_file()
    except (OSError, ValueError):
        return False


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class HashMemo:
    """File content hashes keyed by (device, inode, size, mtime_ns), persisted between runs.

    A file edited in place gets a new mtime and size, so the key changes. The state file is
    merged and replaced atomically under a lock, so concurrent runs only ever add entries."""

    MAX_ENTRIES = 100_000

    def __init__(self, state_file: str | os.PathLike | None, rehash: bool = False) -> None:
        """`rehash`: ignore the remembered hashes (each file is hashed again, then remembered):
        for files edited in place with their size and mtime kept."""
        self.path = Path(state_file) if state_file else None
        self.entries: dict[str, str] = {}
        self.dirty = False
        if self.path and self.path.exists() and not rehash:
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a damaged memo only costs re-hashing

    @staticmethod
    def key(st: os.stat_result) -> str:
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def file(self, path: str | os.PathLike) -> str:
        key = self.key(os.stat(path))
        if key not in self.entries:
            self.entries[key] = sha256_file(path)
            self.dirty = True
        return self.entries[key]

    def tree(self, root: str | os.PathLike) -> str:
        """Hash of a directory: relative paths and file contents, in sorted order."""
        root = Path(root)
        items = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                items.append((p.relative_to(root).as_posix(), self.file(p)))
        return digest(items)

    def content(self, path: str | os.PathLike) -> str:
        return self.tree(path) if Path(path).is_dir() else self.file(path)

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            merged = {}
            if self.path.exists():
                try:
                    merged = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    merged = {}
            merged.update(self.entries)
            if len(merged) > self.MAX_ENTRIES:  # oldest first (insertion order)
                merged = dict(list(merged.items())[-self.MAX_ENTRIES :])
            atomic_write_text(self.path, canonical(merged))
        self.dirty = False


def hub_cache_commit(repo_id: str, revision: str | None, kind: str = "models") -> str | None:
    """The commit a hub revision resolves to in the local hub cache, without importing
    huggingface_hub. None when the cache does not know it."""
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    ref = Path(hub) / f"{kind}--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None
