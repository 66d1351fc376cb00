"""Run records: `runs/<recipe>/<run-id>/` with the resolved recipe, record.json (each stage:
fingerprint, cached or run, time, rows; in DAG order), the stage logs and links to the cache
entries; `runs/<recipe>/latest` points to the newest run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
import time
from importlib import metadata
from pathlib import Path

from filelock import FileLock, Timeout

from engine import __version__
from engine.core.errors import RecipeError
from engine.core.io import atomic_write_text
from engine.core.toml import dump_toml
from engine.spec.recipe import Recipe


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "recipe-engine": __version__}
    for dist in ("torch", "transformers", "trl", "peft", "datasets", "pyarrow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


class RunRecord:
    def __init__(self, runs_dir: Path, recipe: Recipe, command: str | None = None) -> None:
        base = runs_dir / recipe.name
        base.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            run_id = stamp if i == 0 else f"{stamp}-{i}"
            try:
                (base / run_id).mkdir()
                break
            except FileExistsError:
                continue
        self.base, self.run_id, self.dir = base, run_id, base / run_id
        self._lock = threading.RLock()
        self.t0 = time.time()
        (self.dir / "logs").mkdir()
        (self.dir / "stages").mkdir()
        atomic_write_text(self.dir / "recipe.toml", dump_toml(recipe.raw))
        self._alive = FileLock(str(self.dir / ALIVE))  # held while this process runs (see `is_dead`)
        self._alive.acquire()
        self.data = {
            "recipe": recipe.name,
            "run": run_id,
            "recipe_file": str(recipe.path),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
            "command": command or f"recipe run {recipe.path}",
            "seed": recipe.meta.seed,
            "versions": versions(),
            "stages": {},
        }
        self.save()
        link = base / f".latest.{os.getpid()}"
        if link.is_symlink():
            link.unlink()
        os.symlink(run_id, link)
        os.replace(link, base / "latest")

    def stage(self, name: str, **info) -> None:
        with self._lock:  # stages may finish side by side (the Ray executor)
            self.data["stages"].setdefault(name, {}).update(info)  # type: ignore[attr-defined]
            self.save()

    def link(self, name: str, entry: Path) -> None:
        target = os.path.relpath(entry, self.dir / "stages")
        dst = self.dir / "stages" / name
        if dst.is_symlink():
            dst.unlink()
        os.symlink(target, dst)

    def finish(self, status: str) -> None:
        with self._lock:
            self.data["status"] = status
            self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.save()
        self._alive.release()

    def save(self) -> None:
        """record.json keeps the stages in the order they were planned (DAG order), so readers
        (the report, `status`) never re-sort them: not sorted-key JSON."""
        self.data["order"] = list(self.data["stages"])  # type: ignore[call-overload]
        atomic_write_text(self.dir / "record.json", json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")


ALIVE = ".running.lock"


def shown_status(run_dir: Path, record: dict) -> str:
    """A run's status for `recipe status` and reports: a record that says "running" while no
    process holds its lock (killed with SIGKILL, power lost) is "interrupted"."""
    status = record.get("status", "?")
    if status != "running":
        return status
    lock = FileLock(str(Path(run_dir) / ALIVE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return "running"
    lock.release()
    return "interrupted"


def stage_logger(name: str, path: Path, tag: str | None = None) -> logging.Logger:
    """A stage's file logger; `tag` marks the lines of one process of a multi-process stage."""
    log = logging.getLogger(f"recipe.stage.{name}.{id(path)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s " + (f"[{tag}] " if tag else "") + "%(message)s"))
    log.addHandler(handler)
    return log


def close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)


def run_dirs(root: Path) -> list[Path]:
    runs: list[Path] = []
    if not root.exists():
        return runs
    for recipe_dir in sorted(root.iterdir()):
        if recipe_dir.name == "cache" or not recipe_dir.is_dir():
            continue
        for d in sorted(recipe_dir.iterdir()):
            if d.is_dir() and not d.is_symlink() and (d / "record.json").exists():
                runs.append(d)
    return runs


def read_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


def find_run(root: Path, ref: str) -> Path:
    """RUN may be a run dir, RECIPE/RUN-ID, RECIPE (its latest run), RUN-ID, or `latest`."""
    candidates = [Path(ref), root / ref, root / ref / "latest"]
    for c in candidates:
        if (c / "record.json").exists():
            return c.resolve()
    runs = run_dirs(root)
    if ref == "latest" and runs:
        return max(runs, key=lambda d: read_record(d).get("started", "")).resolve()
    matches = [d for d in runs if d.name == ref]
    if len(matches) == 1:
        return matches[0].resolve()
    known = ", ".join(sorted({f"{d.parent.name}/{d.name}" for d in runs})[-8:]) or "none yet"
    raise RecipeError.single(f"no run '{ref}' under {root}.", hint=f"Runs: {known}. Try `recipe status`.")
