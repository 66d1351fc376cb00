"""Runs a plan: topological order, cache hits skipped, shards resumed, run records written.

The parts live apart: what a stage receives (engine/spec/artifact.py), model loading and backends
(engine/models/pool.py), run records and stage logs (engine/store/record.py); this module plans, builds the
Context a stage gets, and runs the stages.

    runs/<recipe>/<run-id>/recipe.toml        the resolved recipe
    runs/<recipe>/<run-id>/record.json        each stage: fingerprint, cached/run, time, rows
    runs/<recipe>/<run-id>/logs/<stage>.log   the stage's log (tracebacks land here)
    runs/<recipe>/<run-id>/stages/<stage>     link to the cache entry
    runs/<recipe>/latest                      link to the newest run
    runs/<recipe>/.last/<stage>.json          components last built and its output's identity, for
                                              `plan` reasons and "output unchanged"

A stage's key holds the content of its inputs (engine.store.fingerprint), so each key is
resolved when the stage's turn comes, from the entries of the stages before it: a stage that
re-ran and committed the same output leaves the stages after it cached (early cutoff).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.core import threads as threads_mod
from engine.core.console import stage_output
from engine.core.display import plural
from engine.core.errors import RecipeError, StageFailed
from engine.core.io import atomic_write_json
from engine.lib.roundstats import diversity_for
from engine.models import pool as loading
from engine.run.context import Context
from engine.run.outcome import cutoff_notes, last_output, models_used, report_dropped
from engine.run.plan import make_plan, memo_for, resolve, select
from engine.run.schedule import keep_going, side_by_side
from engine.spec.artifact import Artifact
from engine.spec.graph import artifact_type, edges, order
from engine.spec.recipe import Recipe
from engine.spec.rounds import round_of
from engine.spec.stage import hook
from engine.store.cache import Entry, Store
from engine.store.fingerprint import content_id, definition
from engine.store.record import RunRecord, close_logger, stage_logger, versions

# --------------------------------------------------------------------------- plan


# --------------------------------------------------------------------------- context


# --------------------------------------------------------------------------- run


EXECUTORS = ("local", "ray")


def executor_default() -> str:
    return os.environ.get("RECIPE_EXECUTOR", "local")


def run(
    recipe: Recipe,
    runs_dir: str | os.PathLike,
    *,
    only: Sequence[str] = (),
    force: Sequence[str] = (),
    console=None,
    progress=None,
    executor: str = "local",
    ray_address: str | None = None,
    command: str | None = None,
    fail_fast: bool = False,
    rehash: bool = False,
    threads: int | None = None,
) -> RunRecord:
    """Run every selected stage not in the cache. Raises StageFailed (exit 1) or RecipeError
    (exit 2); committed shards and upstream entries are kept either way. When a stage fails, the
    stages that need it are skipped and the others still run (like `make -k`); the first failure
    is raised at the end (`fail_fast` stops at once instead). `executor` = "ray" runs the stages'
    work on a Ray cluster (engine.run.rayexec); it never changes what a stage makes. `threads`: torch's
    intra-op threads (None: the cores this process may use; engine.core.threads)."""
    if executor not in EXECUTORS:
        raise RecipeError.single(
            f"unknown executor '{executor}'; known: {', '.join(EXECUTORS)}.",
            hint="Use --executor local or --executor ray (or RECIPE_EXECUTOR).",
        )
    runs_dir = Path(runs_dir)
    spread = [n for n, s in recipe.stages.items() if s.config.resources.nodes > 1]
    if spread and executor != "ray":
        raise RecipeError.single(
            f"stage '{spread[0]}' trains on {recipe.stages[spread[0]].config.resources.nodes} nodes, which needs "
            "the Ray executor.",
            **recipe.where(f"stages.{spread[0]}.resources.nodes"),
            hint="Run with --executor ray (and --ray-address), or remove [resources] nodes.",
        )
    if executor == "ray":
        from engine.run import rayexec

        rayexec.connect(ray_address)
        rayexec.check_shared_store(runs_dir)
    force = recipe.stage_names(list(force))
    chosen = select(recipe, list(only), force)
    memo = memo_for(runs_dir, rehash)
    store = Store(runs_dir)
    store.sweep_tmp()
    plan = {p.name: p for p in make_plan(recipe, runs_dir, memo)}
    record = RunRecord(runs_dir, recipe, command=command)
    n_threads = threads_mod.choose(threads)
    threads_mod.apply(n_threads)
    record.data["threads"] = n_threads
    registration = threads_mod.Registration(n_threads)
    sharing = threads_mod.others()
    cores = threads_mod.available_cores()
    if console is not None and threads_mod.oversubscribed(n_threads, sharing, cores):
        console.print(
            f"[yellow]warning[/]: {plural(len(sharing), 'other recipe run')} "
            f"{'is' if len(sharing) == 1 else 'are'} using this machine "
            f"(pid {', '.join(str(pid) for pid, _ in sharing)}); this one computes with {plural(n_threads, 'thread')} "
            f"on {plural(cores, 'core')}. Runs side by side on the same cores slow each other down many "
            f"times over: give each `--threads {max(1, cores // (len(sharing) + 1))}` (README: several "
            "recipes on one machine)."
        )
    entries: dict[str, Entry] = {}
    concurrent = executor == "ray"  # independent stages at once; Ray places their work by resources
    pool = None if concurrent else loading.ModelPool()  # a Ray driver loads models only to patch a hole
    steps = order(recipe)
    to_build = [n for n in steps if n in chosen and (n in force or plan[n].status != "cached")]
    shared = threading.Lock()  # the store's warnings list, when stages run side by side

    def build_stage(name: str) -> None:
        with shared:  # its key, now that the stages before it are built: their outputs' content
            ids: dict[str, str | None] = {n: content_id(e.manifest.get("checksums", {})) for n, e in entries.items()}
            item = resolve(recipe, name, ids, memo, runs_dir, store)
        assert item.fingerprint is not None, "every stage before it is built: its key is known"
        record.stage(name, kind=item.kind, fingerprint=item.fingerprint, status="pending")
        started = time.time()

        def waiting():
            if console is not None:
                console.print(f"{name}: another run is building this stage; waiting for it")

        with store.lock(item.fingerprint, on_wait=waiting):
            with shared:
                entry = None if name in force else store.get(item.fingerprint)
                for w in store.warnings:
                    if console is not None:
                        console.print(f"[yellow]warning[/]: {name}: {w}")
                store.warnings.clear()
            if entry is not None:
                rows = entry.manifest.get("rows", {})
                same = [] if plan[name].status == "cached" else ["its inputs came out the same"]
                record.stage(
                    name,
                    status="cached",
                    duration_s=0.0,
                    rows_in=rows.get("in"),
                    rows_out=rows.get("out"),
                    reasons=same,
                )
                if entry.manifest.get("dropped"):
                    report_dropped(
                        name,
                        entry.manifest["dropped"],
                        record,
                        lambda m: console is not None and console.print(f"[yellow]warning[/]: {name}: {m}"),
                    )
                if entry.manifest.get("warnings"):  # the report of a cached run tells them too
                    record.stage(name, warnings=entry.manifest["warnings"])
            else:
                why = ["forced"] if name in force else item.reasons
                if pool is not None:
                    later = [n for n in to_build if steps.index(n) > steps.index(name)]
                    pool.keep(models_used(recipe, [name, *later]))  # models no stage still to build reads go
                record.stage(name, start_s=round(started - record.t0, 3))  # when, within the run
                entry = _build_entry(recipe, name, item, entries, store, record, console, progress, why, pool, executor)
                record.stage(
                    name,
                    status="run",
                    duration_s=round(time.time() - started, 3),
                    rows_in=entry.manifest["rows"]["in"],
                    rows_out=entry.manifest["rows"]["out"],
                    reasons=why,
                )
                reuse = entry.manifest.get("reuse")
                if reuse and reuse.get("reused"):
                    record.stage(name, rows_reused=reuse["reused"], rows_computed=reuse["computed"])
                    if console is not None:
                        console.print(f"{name}: {reuse['reused']} rows reused, {reuse['computed']} computed")
                before = last_output(runs_dir, recipe.name, name)
                if before is not None and before == content_id(entry.manifest.get("checksums", {})):
                    record.stage(name, output="unchanged")
        if round_of(name):  # iterative rounds: each round's output diversity, so mode collapse shows
            record.stage(name, diversity=diversity_for(artifact_type(recipe, name), entry.path))  # type: ignore[arg-type]
        with shared:  # read by the key resolution of stages running side by side
            entries[name] = entry
        record.link(name, entry.path)
        atomic_write_json(
            runs_dir / recipe.name / ".last" / f"{name}.json",
            {
                "fingerprint": item.fingerprint,
                "components": item.components,
                "output": content_id(entry.manifest.get("checksums", {})),
            },
        )

    def on_failure(name: str, exc: Exception, left: list[str]) -> None:
        if console is not None and left:
            console.print(
                f"[red]{name} failed[/]; the stages that need it are skipped, the others go on: {', '.join(left)}"
            )

    def mark_skipped(name: str, because: str) -> None:
        record.stage(
            name,
            kind=plan[name].kind,
            fingerprint=plan[name].fingerprint,
            status="skipped",
            reasons=[f"needs '{because}', which failed"],
        )

    status = "failed"
    try:
        names = [n for n in steps if n in chosen]
        if concurrent:
            for name in names:  # the record lists stages in DAG order, whichever finishes first
                record.stage(name, kind=plan[name].kind, fingerprint=plan[name].fingerprint, status="pending")
            side_by_side(
                recipe, names, build_stage, record, fail_fast=fail_fast, on_failure=on_failure, skip=mark_skipped
            )
        else:
            keep_going(recipe, names, build_stage, fail_fast=fail_fast, on_failure=on_failure, skip=mark_skipped)
        status = "ok"
        cutoff_notes(recipe, plan, record, console)
        if recipe.tracking.report_to:  # once per run: the recipe, fingerprints, eval metrics
            from engine.lib.tracking import log_run

            log_run(
                record, recipe, runs_dir, lambda m: console is not None and console.print(f"[yellow]warning[/]: {m}")
            )
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if pool is not None:
            pool.clear()
        registration.close()
        record.finish(status)
    return record


def _inputs(recipe: Recipe, name: str, entries: dict[str, Entry]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stage = recipe.stages[name]
    for edge in edges(recipe, name):
        if edge.source == "stages":
            art = Artifact(edge.name, artifact_type(recipe, edge.name), "stages", path=entries[edge.name].path)  # type: ignore[arg-type]
        elif edge.source == "datasets":
            spec = recipe.datasets[edge.name]
            art = Artifact(edge.name, spec.type, "datasets", spec=spec, recipe=recipe)
        elif edge.source == "constitutions":
            art = Artifact(
                edge.name, "constitution", "constitutions", spec=recipe.constitutions[edge.name], recipe=recipe
            )
        else:
            art = Artifact(edge.name, "model", "models", spec=recipe.models[edge.name], recipe=recipe)
        if isinstance(getattr(stage.config, edge.field), list):
            out.setdefault(edge.field, []).append(art)
        else:
            out[edge.field] = art
    return out


def _dispatch(stage, inputs, ctx, log_path: Path, executor: str) -> None:
    """Where a stage's work happens: on a Ray cluster (row and training kinds), under `accelerate
    launch` (processes > 1), or in this process."""
    if executor == "ray":
        from engine.run.rayexec import run_stage

        if run_stage(stage, inputs, ctx, log_path):
            return
    if stage.config.resources.processes > 1 and "RANK" not in os.environ:
        from engine.run.launch import launch_stage

        launch_stage(stage, inputs, ctx, log_path)
    else:
        stage.module.run(stage.config, inputs, ctx)


def _build_entry(
    recipe, name, item, entries, store, record, console, progress, why, pool=None, executor="local"
) -> Entry:
    stage = recipe.stages[name]
    log_path = record.dir / "logs" / f"{name}.log"
    log = stage_logger(name, log_path)
    log.info(
        "stage %s (%s) fingerprint %s; runs because: %s; %s torch threads",
        name,
        stage.kind,
        item.fingerprint,
        "; ".join(why),
        record.data.get("threads", "default"),
    )
    record.stage(name, status="running", log=str(log_path.relative_to(record.dir)))
    manifest = {
        "stage": name,
        "recipe": recipe.name,
        "components": item.components,
        "versions": record.data.get("versions") or versions(),
    }  # read once per run, at its start
    try:
        inputs = _inputs(recipe, name, entries)
        with store.build(item.fingerprint, manifest) as out_dir:
            ctx = Context(
                name,
                item.fingerprint,
                recipe.meta.seed,
                out_dir,
                store.partial(item.fingerprint),
                log,
                recipe,
                console,
                progress,
                store.root,
                pool,
                definition=definition(item.components, stage.module),
                components=item.components,
            )
            if pool is not None and hook(stage.module, "TRAINS"):  # a training stage
                pool.before_training(log)
            with stage_output(log):  # third-party warnings and stray output: the stage log, not the console
                _dispatch(stage, inputs, ctx, log_path, executor)
            rows_in: int | None = None  # None: no row input (an eval reads its suites, a model its weights)
            dropped = {}
            for arts in inputs.values():
                for art in arts if isinstance(arts, list) else [arts]:
                    if art.type not in ("model", "constitution"):
                        rows_in = (rows_in or 0) + len(art)
                        if art.load_report and art.load_report["dropped"]:
                            dropped[art.name] = {
                                "total": art.load_report["total"],
                                "reasons": {
                                    reason: {"rows": n, "first_ids": art.load_report["examples"].get(reason, [])}
                                    for reason, n in art.load_report["dropped"].items()
                                },
                            }
            manifest["rows"] = {"in": rows_in, "out": ctx.rows_out}
            manifest["reuse"] = {"reused": ctx.shards.reuse.reused, "computed": ctx.shards.reuse.computed}
            if ctx.shards.memos:  # the row memos it read and wrote: `recipe gc` keeps them with the entry
                manifest["memos"] = sorted(ctx.shards.memos)
            if dropped:  # kept in the entry, so that a cached re-run reports them too
                manifest["dropped"] = dropped
                report_dropped(name, dropped, record, ctx.warn)
            if ctx.warnings:
                manifest["warnings"] = ctx.warnings
                record.stage(name, warnings=ctx.warnings)
        log.info("done: %s rows in, %s rows out", rows_in, ctx.rows_out)
        store.clear_partial(item.fingerprint)
    except RecipeError as exc:
        log.error("%s", exc.format())
        record.stage(name, status="failed", error=exc.format())
        raise
    except KeyboardInterrupt:
        log.warning("interrupted; committed shards are kept under %s", store.partial(item.fingerprint))
        record.stage(name, status="interrupted")
        raise
    except Exception as exc:
        log.error("stage failed:\n%s", traceback.format_exc())
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
        record.stage(name, status="failed", error=cause)
        raise StageFailed(name, cause, str(log_path)) from exc
    finally:
        close_logger(log)
    entry = store.peek(item.fingerprint)  # just checksummed while building: no need to hash again
    assert entry is not None, "an entry just committed must be readable"
    return entry
