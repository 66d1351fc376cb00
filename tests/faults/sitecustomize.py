"""The test-side fault seam: Python imports this file at start-up in every process whose
PYTHONPATH holds tests/faults (test subprocesses from conftest.fault_env, Ray workers started by
the Ray tests). With none of the variables below set it does nothing; with one set it wraps an
engine function so a test can kill a process at a chosen point. Product code has no test hooks.

- RECIPE_CRASH_AFTER_SHARDS=N: the process exits 137 (as if SIGKILLed) right after its N-th
  shard commit: a run killed mid-stage, for resume tests.
- RECIPE_CRASH_ONCE_IN_SHARD=FILE: the first worker of a row stage split over workers (part mode,
  Ray) to reach a shard dies before committing it; FILE records that it happened, so the retried
  worker goes on.
- RECIPE_PAUSE_AFTER_SHARDS=N:FILE: right after its N-th shard commit the process writes FILE and
  sleeps (up to 120 s): a test signals it there, at a known point, however loaded the machine is.
- RECIPE_RAY_PROBE_ROOT=DIR: a Ray worker writes its shared-store probe under DIR, as a worker
  that sees another filesystem would.
"""

from __future__ import annotations

import os

FAULTS = (
    "RECIPE_CRASH_AFTER_SHARDS",
    "RECIPE_CRASH_ONCE_IN_SHARD",
    "RECIPE_PAUSE_AFTER_SHARDS",
    "RECIPE_RAY_PROBE_ROOT",
)


def _crash_once(marker: str) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def install() -> None:
    from pathlib import Path

    from engine.store import shards

    commit = shards.ShardRunner._commit

    def faulty_commit(self, index, result):
        marker = os.environ.get("RECIPE_CRASH_ONCE_IN_SHARD")
        if marker and self.part is not None and _crash_once(marker):
            os._exit(137)
        commit(self, index, result)
        limit = os.environ.get("RECIPE_CRASH_AFTER_SHARDS")
        if limit and self.committed_here >= int(limit):
            os._exit(137)
        pause = os.environ.get("RECIPE_PAUSE_AFTER_SHARDS")
        if pause and self.committed_here == int(pause.split(":", 1)[0]):
            import time

            Path(pause.split(":", 1)[1]).write_text(str(os.getpid()))
            time.sleep(120)

    shards.ShardRunner._commit = faulty_commit

    if os.environ.get("RECIPE_RAY_PROBE_ROOT"):
        from engine.run import rayexec

        def elsewhere(path: str, token: str) -> str:
            target = Path(os.environ["RECIPE_RAY_PROBE_ROOT"]) / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(token)
            return str(target)

        rayexec._probe = elsewhere


if any(os.environ.get(name) for name in FAULTS):
    install()
