"""Resume inside a stage: row stages work in shards, each committed atomically.

    partial/<fp>/layout.json        rows and shard size; a different layout starts over
    partial/<fp>/shard-000003/      rows.parquet + stats.json, renamed into place when whole

A restarted stage skips committed shards. Random streams derive per row (engine.core.seeds), never
from a shard's index or size, so an interrupted-then-resumed run produces exactly the rows of an
uninterrupted one, whatever the shard size, the process or the order in which shards ran.

Several processes can work on one stage (the Ray executor): each runs the stage with `part =
(rank, k)` and does the uncommitted shards whose index is rank mod k, then stops (PartDone) before
the stage assembles anything; the driver then runs the stage over the committed shards. A shard
committed twice (a retried task racing the one it replaced) keeps the first commit.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.hashing import sha256_file
from engine.core.io import atomic_write_json
from engine.core.seeds import Seeds, derive, row_digest
from engine.data.rows import read_rows, write_rows
from engine.store.memo import RowMemo, namespace, plain

# Test hooks: exit abruptly (as SIGKILL would) after this many shard commits in one process; or,
# once per marker file, in the middle of a shard (before its commit).


class PartDone(Exception):
    """A worker of a multi-process stage has done its share of the shards (see ShardRunner.part)."""

    def __init__(self, committed: int, shards: int) -> None:
        super().__init__(f"committed {committed} of {shards} shards")
        self.committed, self.shards = committed, shards


def shard_seed(recipe_seed: int, fp: str, index: int) -> int:
    """A shard's own seed (kept for plugins; the engine's stages seed by row through engine.core.seeds)."""
    return derive(recipe_seed, fp, "shard", index)


@dataclass
class Shard:
    index: int
    start: int  # index of the shard's first row in the stage input
    rows: list[dict]
    seed: int
    advance: Callable[[int], None] = field(default=lambda n: None, repr=False)
    advanced: int = 0

    def progress(self, n: int = 1) -> None:
        """Report n rows done inside the shard (optional; commit reports the rest)."""
        self.advanced += n
        self.advance(n)


@dataclass
class ShardResult:
    rows: list[dict]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reuse:
    """How many input rows a `map_rows` reused from the row memo, and how many it computed."""

    reused: int = 0
    computed: int = 0


class ShardRunner:
    def __init__(
        self,
        root: Path,
        fp: str,
        recipe_seed: int,
        progress,
        log,
        *,
        seeds: Seeds | None = None,
        memo_root: Path | None = None,
        definition: str = "",
    ) -> None:
        self.root, self.fp, self.recipe_seed = root, fp, recipe_seed
        self.progress, self.log = progress, log
        self.seeds, self.memo_root, self.definition = seeds, memo_root, definition
        self.memos: set[str] = set()  # row memo namespaces this stage read or wrote (the manifest lists them)
        self.reuse = Reuse()
        self.committed_here = 0
        self.part: tuple[int, int] | None = None  # (rank, k): do only shards with index % k == rank
        self.announce: Callable[[str], None] | None = None  # tells the user a stage resumes (the console)

    def _shard_dir(self, index: int) -> Path:
        return self.root / f"shard-{index:06d}"

    def _load(self, index: int) -> ShardResult | None:
        d = self._shard_dir(index)
        if not d.is_dir():
            return None
        try:
            stats = json.loads((d / "stats.json").read_text())
            rows = read_rows(d / "rows.parquet")
        except Exception as exc:  # a damaged shard is redone, never trusted
            self.log.warning("shard %d is unreadable (%s); redoing it", index, exc)
            shutil.rmtree(d, ignore_errors=True)
            return None
        if stats.get("_rows") != len(rows):
            self.log.warning("shard %d has %d rows, expected %s; redoing it", index, len(rows), stats.get("_rows"))
            shutil.rmtree(d, ignore_errors=True)
            return None
        if stats.get("_sha256") != sha256_file(d / "rows.parquet"):  # an edited or damaged shard is redone
            self.log.warning("shard %d does not match the checksum it was committed with; redoing it", index)
            shutil.rmtree(d, ignore_errors=True)
            return None
        stats.pop("_rows", None)
        stats.pop("_sha256", None)
        return ShardResult(rows, stats)

    def _commit(self, index: int, result: ShardResult) -> None:
        work = self.root / f".tmp-{index:06d}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        work.mkdir(parents=True)
        write_rows(work / "rows.parquet", result.rows)
        atomic_write_json(
            work / "stats.json", dict(result.stats, _rows=len(result.rows), _sha256=sha256_file(work / "rows.parquet"))
        )
        try:
            os.replace(work, self._shard_dir(index))
        except OSError:  # committed meanwhile by another attempt: the same rows, keep the first
            if not self._shard_dir(index).is_dir():
                raise
            shutil.rmtree(work, ignore_errors=True)
            self.log.info("shard %d was committed by another worker; keeping that commit", index)
            return
        self.committed_here += 1

    def _check_layout(self, total: int, shard_size: int) -> None:
        if self.part is None:  # one process per stage (the store's build lock): nothing to agree on
            return self._check_layout_locked(total, shard_size)
        from filelock import FileLock

        self.root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root.parent / f".{self.root.name}.layout.lock")):  # workers of one stage agree
            self._check_layout_locked(total, shard_size)

    def _check_layout_locked(self, total: int, shard_size: int) -> None:
        layout = {"rows": total, "shard_size": shard_size}
        path = self.root / "layout.json"
        if path.exists():
            try:
                same = json.loads(path.read_text()) == layout
            except ValueError:
                same = False
            if not same:
                self.log.warning("committed shards have another layout; starting this stage over")
                shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            atomic_write_json(path, layout)

    def map(
        self, rows: list[dict], fn: Callable[[Shard], ShardResult], *, shard_size: int, desc: str = "rows"
    ) -> tuple[list[dict], list[dict]]:
        """Run `fn` on every uncommitted shard of `rows`; return all output rows in input
        order and each shard's stats, committed ones included."""
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self._check_layout(len(rows), shard_size)
        n_shards = (len(rows) + shard_size - 1) // shard_size
        out_rows: list[dict] = []
        stats: list[dict] = []
        committed = [i for i in range(n_shards) if self._shard_dir(i).is_dir()] if self.part is None else []
        if committed and self.announce is not None:
            self.announce(f"resuming: {len(committed)} of {n_shards} shards committed")
        task = self.progress(len(rows), desc)
        # committed rows count as done at once: a first jump, which the rate and ETA leave out
        task.advance(sum(len(rows[i * shard_size : (i + 1) * shard_size]) for i in committed))
        resumed = 0
        for index in range(n_shards):
            start = index * shard_size
            chunk = rows[start : start + shard_size]
            if self.part is not None:
                if index % self.part[1] == self.part[0] and not self._shard_dir(index).is_dir():
                    self._commit(index, fn(Shard(index, start, chunk, shard_seed(self.recipe_seed, self.fp, index))))
                continue
            result = self._load(index)
            if result is None:
                shard = Shard(index, start, chunk, shard_seed(self.recipe_seed, self.fp, index), task.advance)
                result = fn(shard)
                self._commit(index, result)
                task.advance(max(0, len(chunk) - shard.advanced) - (len(chunk) if index in committed else 0))
            else:
                resumed += 1
            out_rows.extend(result.rows)
            stats.append(result.stats)
        if self.part is not None:
            raise PartDone(self.committed_here, n_shards)
        if resumed:
            self.log.info("resumed: %d of %d shards were already committed", resumed, n_shards)
        return out_rows, stats

    def map_rows(
        self,
        rows: list[dict],
        fn: Callable[[Shard], list[tuple[list[dict], dict]]],
        *,
        shard_size: int,
        desc: str = "rows",
        purpose: str = "",
        key: Callable[[dict], Any] | None = None,
    ) -> tuple[list[dict], list[dict]]:
        """`map` with each input row's result memoized (engine.store.memo). `fn` gets a Shard of
        the rows still to compute and returns, for each of them in order, (its output rows, its
        stats). Returns every output row in input order and one stats dict per input row.

        A row's memo key and its random streams (`seeds.know`) come from its content (or from
        `key(row)`, what the row's result depends on when that is not the whole row) and the
        stage's definition; `purpose` tells apart two maps of one stage."""
        digests = [row_digest(key(r) if key else r) for r in rows]
        if self.seeds is not None:
            self.seeds.know(rows, digests)
        memo = None
        if self.memo_root is not None and self.definition:
            ns = namespace(self.definition, purpose)
            self.memos.add(ns)
            memo = RowMemo(self.memo_root, ns, self.log)

        def run_shard(shard: Shard) -> ShardResult:
            keys = digests[shard.start : shard.start + len(shard.rows)]
            found = {i: memo.get(k) for i, k in enumerate(keys)} if memo is not None else {}
            results = {i: r for i, r in found.items() if r is not None}
            todo = [i for i in range(len(shard.rows)) if i not in results]
            if todo:
                sub = Shard(shard.index, shard.start, [shard.rows[i] for i in todo], shard.seed, shard.advance)
                made = fn(sub)
                shard.advanced += sub.advanced  # what fn reported is done: map() counts only the rest
                if len(made) != len(todo):
                    raise RuntimeError(f"the stage gave {len(made)} results for {len(todo)} rows")
                fresh = {keys[i]: plain({"out": out, "stats": stats}) for i, (out, stats) in zip(todo, made)}
                if memo is not None:
                    memo.put(fresh)
                results.update({i: fresh[keys[i]] for i in todo})
            ordered = [results[i] for i in range(len(shard.rows))]
            return ShardResult(
                [r for res in ordered for r in res["out"]],
                {"per_row": [res["stats"] for res in ordered], "reused": len(shard.rows) - len(todo)},
            )

        out, stats = self.map(rows, run_shard, shard_size=shard_size, desc=desc)
        reused = sum(s.get("reused", 0) for s in stats)
        self.reuse.reused += reused
        self.reuse.computed += len(rows) - reused
        if reused:
            self.log.info("%s: %d of %d rows reused from the row memo", desc, reused, len(rows))
        return out, [st for s in stats for st in s["per_row"]]
