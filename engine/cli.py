"""The `recipe` command line (click + rich). Imports nothing heavy at module level.

Exit codes: 0 ok, 1 a stage failed (see its log), 2 bad input (recipe, data, usage),
130 interrupted (committed work is kept).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.core.errors import CacheError, RecipeError, StageFailed, Terminated

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

STATUS_STYLE = {"cached": "green", "run": "yellow", "partial": "cyan", "failed": "red", "ok": "green",
                "interrupted": "magenta", "running": "yellow", "pending": "dim", "deleted by gc": "red",
                "skipped": "dim"}


def _styled(status) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/]" if style else escape(str(status))


class RecipeGroup(click.Group):
    """Turns user errors into a short message and exit 2, stage failures into exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RecipeError as exc:
            err.print(exc.format(), markup=False)
            sys.exit(2)
        except StageFailed as exc:
            err.print(f"[red]stage '{exc.stage}' failed[/]: {exc.cause}", markup=True)
            err.print(f"  log: {exc.log_path}", markup=False)
            err.print("  upstream stages are cached; fix the cause and run again to continue.", markup=False)
            sys.exit(1)
        except CacheError as exc:
            err.print(f"cache error: {exc}", markup=False)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            err.print(f"{what}: committed stages and shards are kept; run again to resume.")
            sys.exit(143 if isinstance(exc, Terminated) else 130)


def _runs_dir_option(f):
    return click.option("--runs-dir", type=click.Path(file_okay=False), default=None,
                        help="Output root (default: $RECIPE_RUNS_DIR or ./runs).")(f)


def _set_option(f):
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="Override a recipe key; VALUE is parsed as TOML (--set stages.sft.lr=1e-4).")(f)


def _runs_dir(value: str | None) -> Path:
    from engine.run.plan import runs_dir_default

    return Path(value or runs_dir_default())


def _load(path: str, sets) -> "Recipe":  # noqa: F821
    from engine.load.loader import load_recipe

    return load_recipe(path, sets)


@click.group(cls=RecipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recipe-engine")
def main() -> None:
    """recipe: declarative LLM alignment pipelines.

    A recipe is a TOML file declaring stages (generate, filter, sft, dpo, ...). The engine
    validates it before spending compute, caches every stage by content hash and resumes
    interrupted runs.
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
def validate(recipe: str, sets) -> None:
    """Check the schema, references, artifact types and templates of RECIPE."""
    r = _load(recipe, sets)
    kinds = ", ".join(f"{n} ({s.kind})" for n, s in r.stages.items())
    out.print(f"ok: {r.name}: {len(r.stages)} stages: {kinds}", markup=False)
    _remote_code_notes(r)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
@_runs_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--resolved", is_flag=True, help="Also print the resolved recipe (extends and --set applied).")
@click.option("--rehash", is_flag=True,
              help="Hash every input file again instead of trusting the memo of (inode, size, mtime): for files "
                   "edited in place with their size and mtime kept.")
def plan(recipe: str, sets, runs_dir, as_json: bool, resolved: bool, rehash: bool) -> None:
    """Show each stage, its fingerprint, whether it is cached, and why it would run."""
    from engine.run.plan import make_plan, memo_for
    from engine.core.toml import dump_toml

    r = _load(recipe, sets)
    items = make_plan(r, _runs_dir(runs_dir), memo_for(_runs_dir(runs_dir), rehash))
    if as_json:
        click.echo(json.dumps({"recipe": r.name, "stages": [i.as_json() for i in items]}, indent=2))
        return
    if resolved:
        out.print(dump_toml(r.raw), markup=False)
    _plan_table(r.name, items)
    _remote_code_notes(r)


def _remote_code_notes(r) -> None:
    for name, spec in r.models.items():
        if spec.trust_remote_code:
            out.print(f"[yellow]note[/]: model '{name}' ({escape(str(spec.path))}) has trust_remote_code = true: "
                      "loading it runs code from the model repository.")


def _plan_table(name: str, items) -> None:
    table = Table(title=f"plan: {name}", title_justify="left")
    for col in ("stage", "kind", "fingerprint", "status", "why"):
        table.add_column(col)
    for i in items:
        table.add_row(i.name, i.kind, i.fingerprint[:12], _styled(i.status), "; ".join(i.reasons))
    out.print(table)


@main.command(name="run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
@_runs_dir_option
@click.option("--only", multiple=True, metavar="STAGE", help="Run these stages (and what they need), nothing else.")
@click.option("--force", multiple=True, metavar="STAGE", help="Rebuild these stages even if cached.")
@click.option("--dry-run", is_flag=True, help="Print the plan; run nothing.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="Where stages run: this machine (default; or RECIPE_EXECUTOR), or a Ray cluster. Never changes "
                   "outputs.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="The Ray cluster to join (default: RAY_ADDRESS, else a local one).")
@click.option("--fail-fast", is_flag=True,
              help="Stop at the first failed stage (default: stages that do not need it still run, like make -k).")
@click.option("--rehash", is_flag=True,
              help="Hash every input file again instead of trusting the memo of (inode, size, mtime): for files "
                   "edited in place with their size and mtime kept.")
@click.option("--threads", default=None, metavar="N|auto",
              help="torch's threads (default: $RECIPE_THREADS, else auto: the cores this process may use). Give each "
                   "of several runs on one machine its share.")
def run_cmd(recipe: str, sets, runs_dir, only, force, dry_run: bool, executor, ray_address, fail_fast: bool,
            rehash: bool, threads) -> None:
    """Run RECIPE: cached stages are skipped, interrupted ones resume."""
    _terminate_like_interrupt()
    from engine.run.executor import EXECUTORS, executor_default, run
    from engine.run.plan import make_plan, select

    from engine.core.threads import ENV as THREADS_ENV
    from engine.core.threads import parse as parse_threads

    r = _load(recipe, sets)
    root = _runs_dir(runs_dir)
    raw_threads = threads if threads is not None else os.environ.get(THREADS_ENV)
    try:
        n_threads = parse_threads(raw_threads)
    except ValueError:
        raise RecipeError.single(f"--threads (or {THREADS_ENV}) is '{raw_threads}': expected a positive whole number "
                                 "or auto.", hint="For example --threads 1 for each of two runs on a 2-core machine.") \
            from None
    executor = executor or executor_default()
    if executor not in EXECUTORS:
        raise RecipeError.single(f"RECIPE_EXECUTOR is '{executor}'; known executors: {', '.join(EXECUTORS)}.",
                                 hint="Unset it, or set it to local or ray.")
    if dry_run:
        from engine.run.plan import memo_for

        chosen = select(r, list(only), list(force))
        _plan_table(r.name, [i for i in make_plan(r, root, memo_for(root, rehash)) if i.name in chosen])
        return
    console = Console(file=sys.stderr, highlight=False, soft_wrap=True)  # the real stderr: third parties go to
    progress = progress_bars(console)                                    # stage logs (engine.core.console)
    from engine.core.console import routed

    command = "recipe " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["run"] else None
    try:
        with progress.live, routed():
            record = run(r, root, only=list(only), force=list(force), console=console, progress=progress,
                         executor=executor, ray_address=ray_address, command=command, fail_fast=fail_fast,
                         rehash=rehash, threads=n_threads)
    except StageFailed as failed:  # the failed run still gets its report: which stage, why, where its log is
        run_dir = Path(failed.log_path).parent.parent
        if (run_dir / "record.json").is_file():
            _write_report(run_dir, quiet=True)
        raise
    table = Table(title=f"run {r.name}/{record.run_id}", title_justify="left")
    for col in ("stage", "status", "rows in", "rows out", "seconds"):
        table.add_column(col)
    for name, s in record.data["stages"].items():
        table.add_row(name, _styled(s.get("status")), _count(s.get("rows_in")), _count(s.get("rows_out")),
                      f"{s.get('duration_s', 0):.1f}")
    out.print(table)
    out.print(f"run record: {record.dir}", markup=False)
    _write_report(record.dir)


def _terminate_like_interrupt() -> None:
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread: the same path as Ctrl-C."""
    import signal
    import threading

    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _write_report(run_dir: Path, quiet: bool = False) -> list[Path]:
    """The run's report.md/report.html (engine/report/runreport.py). A report that cannot be written is a
    warning, never a failed run: every stage output is already committed."""
    from engine.report.runreport import write_run_report

    try:
        paths = write_run_report(Path(run_dir))
    except Exception as e:  # noqa: BLE001 - the run itself succeeded
        err.print(f"[yellow]warning:[/] the run report could not be written ({type(e).__name__}: {e}); "
                  f"try `recipe report {run_dir}`.")
        return []
    (err if quiet else out).print(f"report: {Path(run_dir) / 'report.md'}", markup=False)
    return paths


def progress_bars(console: Console) -> "_RateProgress":
    """The run's progress bars, made to fit 80 columns: a label cut to 24 characters, a short bar,
    done/total, the rate of this run's work (rows/s, steps/s) and the ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column

    return _RateProgress(Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=24)),
        BarColumn(bar_width=10), MofNCompleteColumn(),
        TextColumn("[progress.data.speed]{task.fields[rate]}", table_column=Column(no_wrap=True)),
        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
    ))


class _RateProgress:
    """A rich Progress whose tasks show their rate with a unit (rich's own speed column has none).
    A task's first advance (the rows of committed shards, when a stage resumes) is not in the
    rate: rich leaves a task's first sample out of its speed."""

    def __init__(self, progress) -> None:
        self.live = progress

    def add_task(self, description: str, total=None, unit: str = "rows") -> int:
        return self.live.add_task(description, total=total, rate="", unit=unit)

    def advance(self, task_id: int, n: int) -> None:
        self.live.advance(task_id, n)
        task = next(t for t in self.live.tasks if t.id == task_id)
        self.live.update(task_id, rate=f"{task.speed:,.1f} {task.fields['unit']}/s" if task.speed else "")


# --------------------------------------------------------------------------- runs


def _run_dirs(root: Path) -> list[Path]:
    runs = []
    if not root.exists():
        return runs
    for recipe_dir in sorted(root.iterdir()):
        if recipe_dir.name == "cache" or not recipe_dir.is_dir():
            continue
        for d in sorted(recipe_dir.iterdir()):
            if d.is_dir() and not d.is_symlink() and (d / "record.json").exists():
                runs.append(d)
    return runs


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


def find_run(root: Path, ref: str) -> Path:
    """RUN may be a run dir, RECIPE/RUN-ID, RECIPE (its latest run), RUN-ID, or `latest`."""
    candidates = [Path(ref), root / ref, root / ref / "latest"]
    for c in candidates:
        if (c / "record.json").exists():
            return c.resolve()
    runs = _run_dirs(root)
    if ref == "latest" and runs:
        return max(runs, key=lambda d: _record(d).get("started", "")).resolve()
    matches = [d for d in runs if d.name == ref]
    if len(matches) == 1:
        return matches[0].resolve()
    known = ", ".join(sorted({f"{d.parent.name}/{d.name}" for d in runs})[-8:]) or "none yet"
    raise RecipeError.single(f"no run '{ref}' under {root}.", hint=f"Runs: {known}. Try `recipe status`.")


@main.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@_runs_dir_option
def status(run_ref, runs_dir) -> None:
    """List runs and their stages (all recipes, or one RUN in detail)."""
    from engine.store.record import shown_status

    root = _runs_dir(runs_dir)
    if run_ref:
        run_dir = find_run(root, run_ref)
        rec = _record(run_dir)
        run_status = shown_status(run_dir, rec)
        table = Table(title=f"{rec['recipe']}/{rec['run']}: {run_status}", title_justify="left")
        for col, kw in (("stage", {"no_wrap": True}), ("kind", {"no_wrap": True}), ("status", {"no_wrap": True}),
                        ("rows", {"justify": "right", "no_wrap": True}), ("s", {"justify": "right"}),
                        ("why", {"overflow": "fold", "ratio": 1})):
            table.add_column(col, **kw)
        for name, s in rec["stages"].items():  # record order: the DAG's, rounds of a loop together
            st = s.get("status")
            if run_status == "interrupted" and st in ("running", "pending"):
                st = "interrupted" if st == "running" else st
            st = _entry_state(run_dir, name, st)
            rows = "-" if s.get("rows_out") is None and s.get("rows_in") is None else \
                f"{_count(s.get('rows_in'))}>{_count(s.get('rows_out'))}"
            table.add_row(name, s.get("kind", ""), _styled(st), rows, f"{s.get('duration_s', 0) or 0:.1f}",
                          "; ".join(s.get("reasons", [])) or s.get("error", ""))
        out.print(table)
        _round_table(rec["stages"])
        return
    runs = _run_dirs(root)
    if not runs:
        out.print(f"no runs under {root}", markup=False)
        return
    table = Table(title=f"runs in {root}", title_justify="left")
    for col in ("recipe", "run", "status", "started", "stages"):
        table.add_column(col)
    for d in runs:
        rec = _record(d)
        st = shown_status(d, rec)
        counts: dict[str, int] = {}
        for s in rec["stages"].values():
            state = "interrupted" if st == "interrupted" and s.get("status") == "running" else s.get("status", "?")
            counts[state] = counts.get(state, 0) + 1
        table.add_row(rec["recipe"], rec["run"], _styled(st),
                      rec.get("started", "")[:16].replace("T", " "), ", ".join(f"{v} {k}" for k, v in counts.items()))
    out.print(table)


@main.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("stage")
@click.option("-n", "--rows", "n_rows", default=5, show_default=True, help="How many rows to print.")
@_runs_dir_option
def show(run_ref: str, stage: str, n_rows: int, runs_dir) -> None:
    """Print the first rows of a stage's output and its report."""
    from engine.spec import registry
    from engine.spec.rounds import last_round, round_of
    from rich.markup import escape
    from rich.text import Text

    from engine.data.rows import count_rows, read_rows

    run_dir = find_run(_runs_dir(runs_dir), run_ref)
    rec = _record(run_dir)
    if stage not in rec["stages"] and last_round(rec["stages"], stage):
        stage = last_round(rec["stages"], stage)  # a loop stage's own name: its last round
    entry = run_dir / "stages" / stage
    if stage in rec["stages"] and entry.is_symlink() and not entry.exists():
        raise RecipeError.single(
            f"the output of stage '{stage}' in run {rec['recipe']}/{rec['run']} was deleted by gc.",
            hint="Run the recipe again to rebuild it (`recipe gc` keeps what recent runs and the recipe files use).")
    if stage not in rec["stages"] or not entry.exists():
        done = [n for n in rec["stages"] if (run_dir / "stages" / n).exists()]
        raise RecipeError.single(f"run {rec['recipe']}/{rec['run']} has no output for stage '{stage}'.",
                                 hint=f"Stages with output: {', '.join(done) or 'none'}.")
    info = rec["stages"][stage]
    out.print(f"[bold]{stage}[/] ({info.get('kind')}) fingerprint {info.get('fingerprint')}: {info.get('status')}")
    rows_file = entry / "rows.parquet"
    if rows_file.exists():
        rows = read_rows(rows_file)[:n_rows]
        table = Table(title=f"first {len(rows)} of {count_rows(rows_file)} rows", title_justify="left", show_lines=True)
        cols = list(dict.fromkeys(k for row in rows for k in row))
        for c in cols:
            table.add_column(c, overflow="fold", max_width=60 if c == "messages" else 30)
        for row in rows:
            table.add_row(*[_cell(row.get(c)) for c in cols])
        out.print(table)
    report_file = entry / "report.json"
    if report_file.exists():
        report = json.loads(report_file.read_text())
        module = registry.load(info["kind"]) if info.get("kind") in registry.kinds() else None
        from engine.spec.stage import hook

        if hook(module, "summary_table"):  # one column per model, say
            headers, rows = hook(module, "summary_table")(report)
            table = Table(title="report", title_justify="left")
            for i, h in enumerate(headers):
                table.add_column(h, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*[Text(printable(str(cell))) for cell in row])
            out.print(table)
            for line in (hook(module, "summary_notes") or (lambda r: []))(report):
                out.print(printable(line), markup=False)
        elif hook(module, "summary"):
            table = Table(title="report", title_justify="left")
            table.add_column("")
            table.add_column("")
            for k, v in hook(module, "summary")(report):
                table.add_row(Text(printable(str(k))), Text(printable(str(v))))
            out.print(table)
            for rule, examples in report.get("examples", {}).items():
                for ex in examples:
                    detail = escape(printable(f"{ex.get('id')}: {ex.get('detail')}"))
                    out.print(f"  [dim]{escape(rule)}[/] {detail}", markup=True)
        else:
            out.print_json(json.dumps(report))
    if round_of(stage):
        _round_table(rec["stages"], round_of(stage)[0])


def _round_table(stages: dict, base: str | None = None) -> None:
    """Iterative rounds: each round's output diversity (engine/spec/rounds.py), when the run has any."""
    from engine.spec.rounds import ROUND_COLUMNS, round_rows

    rows = round_rows(stages, base)
    if rows:
        table = Table(title="output diversity per round", title_justify="left")
        for col in ROUND_COLUMNS:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        out.print(table)


def _entry_state(run_dir: Path, stage: str, status: str | None) -> str | None:
    """A finished stage whose cache entry is gone (removed by `recipe gc`) says so."""
    link = run_dir / "stages" / stage
    if status in ("cached", "run") and link.is_symlink() and not link.exists():
        return "deleted by gc"
    return status


def _count(value) -> str:
    """A row count for the run tables: '-' where a stage gives no rows (a model) or has none yet."""
    return "-" if value is None else str(value)


def _cell(value) -> "Text":  # noqa: F821
    """A row value for the terminal: model output is data, not markup, and its control
    characters (ESC, NUL, ...) are shown escaped, never sent to the terminal."""
    from rich.text import Text

    if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
        text = "\n".join(f"{m.get('role')}: {printable(str(m.get('content')))[:120]}" for m in value)
    else:
        text = printable(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        text = text if len(text) < 300 else text[:297] + "..."
    return Text(text)


def printable(text: str) -> str:
    """`text` with control characters other than newline and tab written as escapes (\\x1b)."""
    import unicodedata

    return "".join(c if c in "\n\t\u200d" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co") else
                   repr(c)[1:-1] for c in text)


@main.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@_runs_dir_option
@click.option("--json", "as_json", is_flag=True)
def diff(a: str, b: str, runs_dir, as_json: bool) -> None:
    """Stages whose fingerprints differ between recipes A and B, and why."""
    from engine.run.plan import memo_for
    from engine.store.fingerprint import fingerprints, reasons

    memo = memo_for(_runs_dir(runs_dir))
    ra, rb = _load(a, ()), _load(b, ())
    fa, fb = fingerprints(ra, memo), fingerprints(rb, memo)
    memo.save()
    rows = []
    for name in list(dict.fromkeys([*fa, *fb])):
        if name not in fb:
            rows.append({"stage": name, "a": fa[name][0], "b": None, "reasons": ["only in A"]})
        elif name not in fa:
            rows.append({"stage": name, "a": None, "b": fb[name][0], "reasons": ["only in B"]})
        elif fa[name][0] != fb[name][0]:
            rows.append({"stage": name, "a": fa[name][0], "b": fb[name][0], "reasons": reasons(fa[name][1], fb[name][1])})
    if as_json:
        click.echo(json.dumps({"a": a, "b": b, "stages": rows}, indent=2))
        return
    if not rows:
        out.print("no differences: every stage has the same fingerprint")
        return
    table = Table(title=f"{a} -> {b}", title_justify="left")
    for col in ("stage", "A", "B", "why"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["stage"], (r["a"] or "-")[:12], (r["b"] or "-")[:12], "; ".join(r["reasons"]))
    out.print(table)


@main.command()
@click.argument("run_ref", metavar="RUN", default="latest")
@_runs_dir_option
def report(run_ref: str, runs_dir) -> None:
    """Write RUN's report (report.md, report.html, plots/): data funnel, training curves, evals."""
    run_dir = find_run(_runs_dir(runs_dir), run_ref)
    paths = _write_report(run_dir)
    if not paths:
        raise SystemExit(1)
    for p in paths:
        out.print(str(p), markup=False)


@main.command()
@_runs_dir_option
@click.option("--keep-runs", default=5, show_default=True, help="Entries used by each recipe's last N runs stay.")
@click.option("--yes", is_flag=True, help="Delete; without it gc only lists what it would delete.")
def gc(runs_dir, keep_runs: int, yes: bool) -> None:
    """Drop cache entries that neither a recent run nor a recipe file as written uses (dry run
    unless --yes). Kept: the entries of each recipe's last N runs, and those that every recipe
    file next to a recipe that ran here (and beside the runs dir) needs as it is written now, so
    experiments with --set never push out the recipe itself."""
    from engine.store.cache import Store

    root = _runs_dir(runs_dir)
    store = Store(root)
    keep: set[str] = set()
    by_recipe: dict[str, list[Path]] = {}
    for d in _run_dirs(root):
        by_recipe.setdefault(d.parent.name, []).append(d)
    files: set[Path] = set()
    for dirs in by_recipe.values():
        for d in sorted(dirs, key=lambda d: _record(d).get("started", ""))[-keep_runs:]:
            keep.update(s.get("fingerprint") for s in _record(d)["stages"].values())
        for d in dirs:
            recipe_file = Path(_record(d).get("recipe_file") or "")
            if recipe_file.name and recipe_file.parent.is_dir():
                files.update(_recipe_files(recipe_file.parent))
    files.update(_recipe_files(root.resolve().parent))
    written = _fingerprints_as_written(sorted(files), root)
    if written:
        out.print(f"keeping the entries that {len(written)} recipe files need as written "
                  f"({', '.join(p.name for p in sorted(written)[:5])}{', ...' if len(written) > 5 else ''})",
                  markup=False)
    for fps in written.values():
        keep.update(fps)
    if yes:  # half-built entries of crashed runs: their builder is gone
        swept = store.sweep_tmp()
        if swept:
            out.print(f"removed {len(swept)} half-built entries left by crashed runs", markup=False)
    doomed = [store.entry_path(fp) for fp in store.entries() if fp not in keep]
    if store.partial_root.exists():
        doomed += [p for p in store.partial_root.iterdir() if p.name not in keep]
    total = sum(_size(p) for p in doomed)
    for p in doomed:
        out.print(f"{'removing' if yes else 'would remove'} {p} ({_human(_size(p))})", markup=False)
    if yes:
        for p in doomed:
            store.remove(p.name)
        out.print(f"removed {len(doomed)} entries, {_human(total)}", markup=False)
    else:
        out.print(f"{len(doomed)} entries, {_human(total)}; run with --yes to delete", markup=False)


def _recipe_files(folder: Path) -> list[Path]:
    """The recipe files directly in `folder`: *.toml with a [recipe] table."""
    out = []
    for path in sorted(folder.glob("*.toml")):
        try:
            if path.is_file() and "[recipe]" in path.read_text(encoding="utf-8", errors="replace")[:200_000]:
                out.append(path.resolve())
        except OSError:
            continue
    return out


def _fingerprints_as_written(files: list[Path], root: Path) -> dict[Path, set[str]]:
    """Each recipe file that loads -> the fingerprints of its stages (a broken one keeps nothing)."""
    from engine.run.plan import memo_for
    from engine.store.fingerprint import fingerprints
    from engine.load.loader import load_recipe

    memo = memo_for(root)
    found = {}
    for path in files:
        try:
            found[path] = {fp for fp, _ in fingerprints(load_recipe(path), memo).values()}
        except RecipeError:
            continue
    memo.save()
    return found


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@main.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@click.option("--markdown", is_flag=True, help="The human reference (docs/recipe-reference.md) instead.")
@click.option("--constitution", is_flag=True,
              help="The constitution file format instead (docs/constitution-reference.md with --markdown).")
def schema(output, markdown, constitution) -> None:
    """JSON Schema of the recipe format (for editors: taplo, VS Code Even Better TOML), or the
    Markdown reference with --markdown; --constitution for the constitution file format."""
    if constitution and markdown:
        from engine.load.reference import constitution_markdown

        text = constitution_markdown().rstrip("\n")
    elif constitution:
        from engine.lib.constitution import Constitution

        text = json.dumps(Constitution.model_json_schema(), indent=2)
    elif markdown:
        from engine.load.reference import markdown as render

        text = render().rstrip("\n")
    else:
        from engine.load.schema import recipe_schema

        text = json.dumps(recipe_schema(), indent=2)
    if output:
        Path(output).write_text(text + "\n")
    else:
        click.echo(text)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False), default=".")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init(directory: str, force: bool) -> None:
    """Write a commented starter recipe (and a small data file) into DIRECTORY."""
    from engine.load.starter import write_starter

    written = write_starter(Path(directory), force=force)
    for p in written:
        out.print(f"wrote {p}", markup=False)
    out.print(f"next: recipe run {Path(directory) / 'recipe.toml'}", markup=False)


if __name__ == "__main__":  # pragma: no cover (python -m engine.cli)
    main()
