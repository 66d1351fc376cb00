"""The content-addressed store under `runs/cache/`.

    cache/<fp>/manifest.json   what went into the fingerprint, versions, timings, checksums
    cache/<fp>/...             the artifact (rows.parquet, report.json, a model dir, ...)
    cache/partial/<fp>/        committed shards of an unfinished row stage; checkpoints
    cache/tmp/                 entries being built (renamed into place only when complete)
    cache/locks/<fp>.lock      one builder per fingerprint across processes
    cache/hashes.json          file-hash memo (see fingerprint.HashMemo)
    cache/rows/<ns>/           row memos of row stages (engine.store.memo)

An entry is trusted only if its manifest names its fingerprint and every file matches its
checksum; anything else is moved aside with a warning and rebuilt. Entries of earlier
fingerprints stay until `recipe gc`, so reverting a change is a cache hit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from engine.core.errors import CacheError
from engine.core.hashing import sha256_file
from engine.core.io import atomic_write_json

MANIFEST = "manifest.json"


@dataclass
class Entry:
    fp: str
    path: Path
    manifest: dict

    def file(self, name: str) -> Path:
        return self.path / name


def checksums(root: Path) -> dict[str, dict]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def mtimes(root: Path, files: dict[str, dict]) -> dict[str, int]:
    """Each of `files`' modification time (ns) at commit, kept apart from the checksums (which
    are the same for the same bytes, whenever they were written): `peek` hashes a file only when
    its time differs."""
    return {rel: (root / rel).stat().st_mtime_ns for rel in files}


class Store:
    def __init__(self, runs_dir: str | os.PathLike) -> None:
        self.root = Path(runs_dir) / "cache"
        self.tmp = self.root / "tmp"
        self.partial_root = self.root / "partial"
        self.locks = self.root / "locks"
        self.warnings: list[str] = []

    def entry_path(self, fp: str) -> Path:
        return self.root / fp

    def partial(self, fp: str) -> Path:
        return self.partial_root / fp

    def has_partial(self, fp: str) -> bool:
        p = self.partial(fp)
        return p.is_dir() and any(p.iterdir())

    # ----------------------------------------------------------------- reading

    def _manifest(self, fp: str) -> dict | None:
        try:
            manifest = json.loads((self.entry_path(fp) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("fingerprint") == fp else None

    def manifest(self, fp: str) -> dict:
        """An entry's manifest as written (empty when unreadable); for reading, not for trust."""
        return self._manifest(fp) or {}

    def peek(self, fp: str, memo=None) -> Entry | None:
        """What `get` will find, cheaply (for `plan`): the manifest, every file of its recorded
        size, and a file whose modification time differs from the one recorded at commit hashed
        and compared with its checksum (through `memo`, a fingerprint.HashMemo, when given).
        Only an edit that keeps size and modification time, or bit rot, passes here; `get`,
        which `run` uses, hashes every file."""
        manifest = self._manifest(fp)
        if manifest is None:
            return None
        root = self.entry_path(fp)
        for rel, info in manifest.get("checksums", {}).items():
            p = root / rel
            try:
                st = p.stat()
            except OSError:
                return None
            if not p.is_file() or st.st_size != info["size"]:
                return None
            if st.st_mtime_ns != manifest.get("mtimes", {}).get(rel):
                digest = memo.file(p) if memo is not None else sha256_file(p)
                if digest != info["sha256"]:
                    return None
        return Entry(fp, root, manifest)

    def get(self, fp: str) -> Entry | None:
        """The entry if complete and every checksum matches; a damaged one is moved aside
        (with a warning in `self.warnings`) so it gets rebuilt, never trusted."""
        root = self.entry_path(fp)
        if not root.exists():
            return None
        manifest = self._manifest(fp)
        problem = None if manifest else "manifest missing or unreadable"
        if manifest:
            found = checksums(root)
            expected = manifest.get("checksums", {})
            if set(found) != set(expected):
                problem = "files missing or unexpected"
            else:
                bad = [rel for rel, info in expected.items() if found[rel]["sha256"] != info["sha256"]]
                problem = f"checksum mismatch in {bad[0]}" if bad else None
        if problem:
            self._discard(root, problem)
            self.warnings.append(f"cache entry {fp} is damaged ({problem}); rebuilding it")
            return None
        return Entry(fp, root, manifest)  # type: ignore[arg-type]

    def entries(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / MANIFEST).exists())

    # ----------------------------------------------------------------- writing

    @contextmanager
    def lock(self, fp: str, on_wait=None) -> Iterator[None]:
        """Exclusive per fingerprint across processes. `on_wait()` is called if we must wait."""
        self.locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.locks / f"{fp}.lock"))
        try:
            lock.acquire(timeout=0.2)
        except Timeout:
            if on_wait:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def build(self, fp: str, manifest: dict) -> Iterator[Path]:
        """A fresh temporary directory for the artifact; on success the manifest (with
        checksums) is written last and the directory renamed into place in one step.
        Call under `lock(fp)`."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        work = self.tmp / f"{fp}~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"  # see sweep_tmp
        work.mkdir()
        started = time.time()
        try:
            yield work
            sums = checksums(work)
            manifest = dict(manifest, fingerprint=fp, checksums=sums, mtimes=mtimes(work, sums))
            manifest.setdefault("timings", {})["build_s"] = round(time.time() - started, 3)
            manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            atomic_write_json(work / MANIFEST, manifest)
            final = self.entry_path(fp)
            if final.exists():  # --force, or a damaged entry: move the old one aside first
                self._discard(final)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def discard(self, path: Path) -> None:
        """Remove a folder of the store (moved aside first, so a crash never leaves half of it)."""
        self._discard(path)

    def _discard(self, path: Path, why: str = "") -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        trash = self.tmp / f"discard.{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, trash)
        except OSError as exc:
            raise CacheError(
                (f"cache entry {path} is damaged ({why}), and " if why else f"{path} must go, but ")
                + f"it cannot be moved aside: {exc.strerror or exc}. Make the runs dir writable "
                f"(chmod -R u+w {self.root}) or delete {path} by hand, then run again; it will be rebuilt."
            ) from exc
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, fp: str) -> None:
        for p in (self.entry_path(fp), self.partial(fp)):
            if p.exists():
                self._discard(p)

    def clear_partial(self, fp: str) -> None:
        if self.partial(fp).exists():
            self._discard(self.partial(fp))
        (self.partial(fp).parent / f".{fp}.layout.lock").unlink(missing_ok=True)  # Ray workers' layout lock

    def sweep_tmp(self, older_than_s: float = 3600) -> list[Path]:
        """Remove what crashed processes left in the temporary area: a half-built entry whose
        builder (named in it: host and pid) is a process of this host that is gone, anything
        being discarded, and anything older than an hour (builders on other hosts of a shared
        store). Returns what was removed."""
        if not self.tmp.exists():
            return []
        now, host, removed = time.time(), socket.gethostname(), []
        for p in self.tmp.iterdir():
            parts = p.name.split("~")
            try:
                dead = len(parts) == 4 and parts[1] == host and not _alive(int(parts[2]))
                if dead or p.name.startswith("discard.") or now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
                    removed.append(p)
            except (OSError, ValueError):
                pass
        return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
