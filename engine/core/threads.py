"""How many threads torch computes with, and which other recipe runs share this machine.

`recipe run --threads N` (or RECIPE_THREADS) sets torch's intra-op threads for the run; the
default, "auto", is the cores this process may use: its CPU affinity (taskset, a cpuset) and
a cgroup CPU quota (a container's --cpus), whichever is smaller. A stage launched on several
processes gives each its share (cores / processes), and Ray workers hold the cores their
threads use (engine.run.rayexec).

"auto" does not shrink itself when other runs share the machine: the thread count changes how
float sums are split, hence the last bits of losses, trained weights and perplexities, and a
run's bytes must not depend on what else happens to run beside it. Instead every run registers
itself (a locked file per process under the temp dir) and a run that starts while others are
running says so, with the fix: give each run `--threads` = cores / runs. Two 2-thread evals on
2 cores took about 400 s each; with one thread each, 10 s.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

ENV = "RECIPE_THREADS"


def available_cores() -> int:
    """Cores this process may use: its affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def parse(value: str | int | None) -> int | None:
    """A --threads / RECIPE_THREADS value: a positive integer, or None for auto."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    n = int(value)
    if n < 1:
        raise ValueError("threads must be at least 1")
    return n


def choose(setting: int | None) -> int:
    """The threads a run computes with: `setting`, else $RECIPE_THREADS, else the available cores
    (the CLI's --threads default, and the library's `run(threads=None)`)."""
    if setting is not None:
        return setting
    try:
        from_env = parse(os.environ.get(ENV))
    except ValueError:
        from engine.core.errors import RecipeError

        raise RecipeError.single(
            f"{ENV} is '{os.environ.get(ENV)}': expected a positive whole number or auto.",
            hint="For example RECIPE_THREADS=1 for each of two runs on a 2-core machine.",
        ) from None
    return from_env if from_env is not None else available_cores()


def apply(n: int) -> None:
    """Use `n` intra-op threads: for torch imported later (OMP/MKL variables) and for torch
    already imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


# --------------------------------------------------------------------------- other runs


def _registry() -> Path:
    return Path(tempfile.gettempdir()) / f"recipe-runs-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


class Registration:
    """This process, registered as a running recipe run until `close()` (or its death)."""

    def __init__(self, threads: int) -> None:
        from filelock import FileLock

        self.lock = None
        folder = _registry()
        self.path = folder / f"{os.getpid()}.lock"
        try:  # a temp dir we cannot write only costs the warning about other runs
            folder.mkdir(parents=True, exist_ok=True)
            self.path.with_suffix(".threads").write_text(str(threads))
            self.lock = FileLock(str(self.path))
            self.lock.acquire(timeout=5)
        except Exception:
            self.lock = None

    def close(self) -> None:
        if self.lock is None:
            return
        self.lock.release()
        for p in (self.path, self.path.with_suffix(".threads")):
            p.unlink(missing_ok=True)


def others() -> list[tuple[int, int]]:
    """(pid, threads) of the other recipe runs alive on this machine (their lock is held)."""
    from filelock import FileLock, Timeout

    found: list = []
    folder = _registry()
    if not folder.is_dir():
        return found
    for path in folder.glob("*.lock"):
        try:
            pid = int(path.stem)
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            try:
                threads = int(path.with_suffix(".threads").read_text())
            except (OSError, ValueError):
                threads = 0
            found.append((pid, threads))
            continue
        lock.release()  # its process is gone (a crash leaves the file; harmless)
    return sorted(found)


def oversubscribed(threads: int, sharing: list[tuple[int, int]], cores: int) -> bool:
    """Whether this run's threads and those of the other runs (`others()`) exceed the cores."""
    return bool(sharing) and threads + sum(t for _, t in sharing) > cores
