"""The order stages run in: one after another in DAG order (local), or side by side as soon as
what they read is committed (Ray). A failed stage does not stop independent ones unless
--fail-fast; the stages that need it are marked skipped.
"""

from __future__ import annotations

import queue
import threading

from engine.core.errors import RecipeError, StageFailed
from engine.spec.graph import edges
from engine.spec.recipe import Recipe
from engine.store.record import RunRecord


def _needs(recipe: Recipe, names: list[str]) -> dict[str, set[str]]:
    wanted = set(names)
    return {n: {e.name for e in edges(recipe, n) if e.source == "stages" and e.name in wanted} for n in names}


def keep_going(recipe: Recipe, names: list[str], build_stage, *, fail_fast: bool, on_failure, skip) -> None:
    """`build_stage(name)` for each stage in order. A stage that fails (StageFailed, RecipeError) blocks
    the stages that need it, directly or not (`skip(name, failed_one)`); the others still run.
    The first failure is raised at the end, or at once with `fail_fast`."""
    needs = _needs(recipe, names)
    failures: list[Exception] = []
    blocked: dict[str, str] = {}  # stage -> the failed stage it needs
    for i, name in enumerate(names):
        cause = next((blocked[n] for n in sorted(needs[name]) if n in blocked), None)
        if cause is not None:
            blocked[name] = cause
            skip(name, cause)
            continue
        try:
            build_stage(name)
        except (StageFailed, RecipeError) as exc:
            if fail_fast:
                raise
            failures.append(exc)
            blocked[name] = name
            on_failure(name, exc, [n for n in names[i + 1 :] if not _reaches(needs, n, set(blocked))])
    if failures:
        raise failures[0]


def _reaches(needs: dict[str, set[str]], name: str, bad: set[str]) -> bool:
    """Whether `name` needs (directly or not) a stage in `bad`."""
    todo, seen = list(needs.get(name, ())), set()
    while todo:
        n = todo.pop()
        if n in bad:
            return True
        if n not in seen:
            seen.add(n)
            todo += needs.get(n, ())
    return False


def side_by_side(
    recipe: Recipe,
    names: list[str],
    build_stage,
    record: RunRecord,
    *,
    fail_fast: bool = False,
    on_failure=None,
    skip=None,
) -> None:
    """Run `build_stage(name)` for every stage in `names`, each as soon as the stages it reads are done,
    in threads: a stage's thread mostly waits on the cluster. A failed stage blocks the stages
    that need it; the others go on (with `fail_fast` nothing new starts), then the first failure
    is raised. The threads are daemons: on Ctrl-C the main thread leaves at once and the cluster
    drops the tasks of a driver that is gone; committed shards stay for the next run."""
    needs = _needs(recipe, names)
    results: queue.Queue = queue.Queue()
    waiting: list[str] = list(names)
    running: set[str] = set()
    done: set[str] = set()
    failures: list = []
    bad: set[str] = set()

    def work(name: str) -> None:
        try:
            build_stage(name)
            results.put((name, None))
        except BaseException as exc:  # handed to the main thread, which raises it
            results.put((name, exc))

    try:
        while waiting or running:
            for name in [n for n in waiting if _reaches(needs, n, bad)]:
                waiting.remove(name)
                if skip is not None:
                    skip(name, next(b for b in names if b in bad and _reaches(needs, name, {b})))
            if not (failures and fail_fast):
                for name in [n for n in waiting if needs[n] <= done]:
                    waiting.remove(name)
                    running.add(name)
                    threading.Thread(target=work, args=(name,), name=f"stage-{name}", daemon=True).start()
            if not running:
                break
            name, exc = results.get()
            running.discard(name)
            if exc is None:
                done.add(name)
            elif isinstance(exc, (StageFailed, RecipeError)):
                failures.append(exc)
                bad.add(name)
                if on_failure is not None and not fail_fast:
                    on_failure(name, exc, [n for n in [*running, *waiting] if not _reaches(needs, n, bad)])
            else:
                raise exc
    except KeyboardInterrupt:
        for name in running:
            record.stage(name, status="interrupted")
        raise
    if failures:
        raise failures[0]
