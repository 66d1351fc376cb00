"""The `recipe` command line (click + rich). Imports nothing heavy at module level.

Exit codes: 0 ok, 1 a stage failed (see its log), 2 bad input (recipe, data, usage),
130 interrupted (committed work is kept).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from engine.core.console import progress_bars, terminate_like_interrupt
from engine.core.display import plural
from engine.core.errors import CacheError, RecipeError, StageFailed, Terminated
from engine.report.console import plan_table, print_run_summary, remote_code_notes
from engine.store.record import find_run

if TYPE_CHECKING:
    from engine.spec.recipe import Recipe

from engine.cli.common import _runs_dir, _runs_dir_option, err, out


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


def _set_option(f):
    f = click.option(  # kept on the context (no new parameter): _load reads it
        "--unset",
        multiple=True,
        metavar="KEY",
        expose_value=False,
        callback=lambda ctx, _p, v: ctx.meta.__setitem__("unsets", v),
        help="Remove a recipe key (before --set): --unset stages.judge.function.",
    )(f)
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a recipe key; VALUE is parsed as TOML (--set stages.sft.lr=1e-4).",
    )(f)


def _load(path: str, sets) -> Recipe:
    from engine.load.loader import load_recipe

    return load_recipe(path, sets, click.get_current_context().meta.get("unsets", ()))


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
    out.print(f"ok: {r.name}: {plural(len(r.stages), 'stage')}: {kinds}", markup=False)
    remote_code_notes(out, r)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
@_runs_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--resolved", is_flag=True, help="Also print the resolved recipe (extends and --set applied).")
@click.option(
    "--rehash",
    is_flag=True,
    help="Hash every input file again instead of trusting the memo of (inode, size, mtime): for files "
    "edited in place with their size and mtime kept.",
)
def plan(recipe: str, sets, runs_dir, as_json: bool, resolved: bool, rehash: bool) -> None:
    """Show each stage, its fingerprint, whether it is cached, and why it would run."""
    from engine.core.toml import dump_toml
    from engine.report.console import print_plan
    from engine.run.plan import make_plan, memo_for

    r = _load(recipe, sets)
    items = make_plan(r, _runs_dir(runs_dir), memo_for(_runs_dir(runs_dir), rehash))
    if as_json:
        click.echo(json.dumps({"recipe": r.name, "stages": [i.as_json() for i in items]}, indent=2))
        return
    if resolved:
        out.print(dump_toml(r.raw), markup=False)
    print_plan(out, r, items)


@main.command(name="run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
@_runs_dir_option
@click.option("--only", multiple=True, metavar="STAGE", help="Run these stages (and what they need), nothing else.")
@click.option("--force", multiple=True, metavar="STAGE", help="Rebuild these stages even if cached.")
@click.option("--dry-run", is_flag=True, help="Print the plan; run nothing.")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where stages run: this machine (default; or RECIPE_EXECUTOR), or a Ray cluster. Never changes outputs.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="The Ray cluster to join (default: RAY_ADDRESS, else a local one).",
)
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Stop at the first failed stage (default: stages that do not need it still run, like make -k).",
)
@click.option(
    "--rehash",
    is_flag=True,
    help="Hash every input file again instead of trusting the memo of (inode, size, mtime): for files "
    "edited in place with their size and mtime kept.",
)
@click.option(
    "--threads",
    default=None,
    metavar="N|auto",
    help="torch's threads (default: $RECIPE_THREADS, else auto: the cores this process may use). Give each "
    "of several runs on one machine its share.",
)
def run_cmd(
    recipe: str,
    sets,
    runs_dir,
    only,
    force,
    dry_run: bool,
    executor,
    ray_address,
    fail_fast: bool,
    rehash: bool,
    threads,
) -> None:
    """Run RECIPE: cached stages are skipped, interrupted ones resume."""
    terminate_like_interrupt()
    from engine.core.threads import choose as choose_threads
    from engine.core.threads import parse as parse_threads
    from engine.run.executor import EXECUTORS, executor_default, run
    from engine.run.plan import make_plan, select

    r = _load(recipe, sets)
    root = _runs_dir(runs_dir)
    try:
        n_threads = choose_threads(parse_threads(threads))  # else $RECIPE_THREADS, else the cores
    except ValueError:
        raise RecipeError.single(
            f"--threads is '{threads}': expected a positive whole number or auto.",
            hint="For example --threads 1 for each of two runs on a 2-core machine.",
        ) from None
    executor = executor or executor_default()
    if executor not in EXECUTORS:
        raise RecipeError.single(
            f"RECIPE_EXECUTOR is '{executor}'; known executors: {', '.join(EXECUTORS)}.",
            hint="Unset it, or set it to local or ray.",
        )
    if dry_run:
        from engine.run.plan import memo_for

        chosen = select(r, list(only), list(force))
        plan_table(out, r.name, [i for i in make_plan(r, root, memo_for(root, rehash)) if i.name in chosen])
        return
    console = Console(file=sys.stderr, highlight=False, soft_wrap=True)  # the real stderr: third parties go to
    progress = progress_bars(console)  # stage logs (engine.core.console)
    from engine.core.console import routed

    command = "recipe " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["run"] else None
    try:
        with progress.live, routed():
            record = run(
                r,
                root,
                only=list(only),
                force=list(force),
                console=console,
                progress=progress,
                executor=executor,
                ray_address=ray_address,
                command=command,
                fail_fast=fail_fast,
                rehash=rehash,
                threads=n_threads,
            )
    except StageFailed as failed:  # the failed run still gets its report: which stage, why, where its log is
        run_dir = Path(failed.log_path).parent.parent
        if (run_dir / "record.json").is_file():
            _write_report(run_dir, quiet=True)
        raise
    print_run_summary(out, r.name, record)
    out.print(f"run record: {record.dir}", markup=False)
    _write_report(record.dir)


def _write_report(run_dir: Path, quiet: bool = False, announce: bool = True) -> list[Path]:
    """The run's report.md/report.html (engine/report/runreport.py). A report that cannot be written is a
    warning, never a failed run: every stage output is already committed."""
    from engine.report.runreport import write_run_report

    try:
        paths = write_run_report(Path(run_dir))
    except Exception as e:
        err.print(
            f"[yellow]warning:[/] the run report could not be written ({type(e).__name__}: {e}); "
            f"try `recipe report {run_dir}`."
        )
        return []
    if announce:
        (err if quiet else out).print(f"report: {Path(run_dir) / 'report.md'}", markup=False)
    return paths


# --------------------------------------------------------------------------- runs


@main.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@_runs_dir_option
def status(run_ref, runs_dir) -> None:
    """List runs and their stages (all recipes, or one RUN in detail)."""
    from engine.report.console import print_runs, print_status
    from engine.store.record import find_run

    root = _runs_dir(runs_dir)
    if run_ref:
        print_status(out, find_run(root, run_ref))
    else:
        print_runs(out, root)


@main.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("stage")
@click.option("-n", "--rows", "n_rows", type=int, default=None, help="Rows to print (default 5; eval: none).")
@_runs_dir_option
def show(run_ref: str, stage: str, n_rows: int | None, runs_dir) -> None:
    """Print the first rows of a stage's output and its report."""
    from engine.report.console import print_stage
    from engine.store.record import find_run

    print_stage(out, find_run(_runs_dir(runs_dir), run_ref), stage, n_rows)


@main.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@_runs_dir_option
@click.option("--json", "as_json", is_flag=True)
def diff(a: str, b: str, runs_dir, as_json: bool) -> None:
    """Stages whose fingerprints differ between recipes A and B, and why."""
    from engine.report.console import print_diff
    from engine.run.plan import memo_for
    from engine.store.fingerprint import differences, fingerprints

    memo = memo_for(_runs_dir(runs_dir))
    rows = differences(fingerprints(_load(a, ()), memo), fingerprints(_load(b, ()), memo))
    memo.save()
    if as_json:
        click.echo(json.dumps({"a": a, "b": b, "stages": rows}, indent=2))
    else:
        print_diff(out, a, b, rows)


@main.command()
@click.argument("run_ref", metavar="RUN", default="latest")
@_runs_dir_option
def report(run_ref: str, runs_dir) -> None:
    """Write RUN's report (report.md, report.html, plots/): data funnel, training curves, evals."""
    run_dir = find_run(_runs_dir(runs_dir), run_ref)
    paths = _write_report(run_dir, announce=False)  # each path once, below
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
    from engine.store.gc import collect

    root = _runs_dir(runs_dir)
    collect(
        root,
        keep_runs,
        yes,
        lambda files: _fingerprints_as_written(files, root),
        lambda line: out.print(line, markup=False),
    )


def _fingerprints_as_written(files: list[Path], root: Path) -> dict[Path, set[str]]:
    """Each recipe file that loads -> the keys of its stages the store can resolve (a broken file keeps nothing)."""
    from engine.load.loader import load_recipe
    from engine.run.plan import make_plan, memo_for

    memo = memo_for(root)
    found = {}
    for path in files:
        try:
            found[path] = {i.fingerprint for i in make_plan(load_recipe(path), root, memo) if i.fingerprint}
        except RecipeError:
            continue
    memo.save()
    return found


@main.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@click.option("--markdown", is_flag=True, help="The human reference (docs/recipe-reference.md) instead.")
@click.option("--constitution", is_flag=True, help="The constitution file format instead (with --markdown: its docs).")
def schema(output, markdown, constitution) -> None:
    """JSON Schema of the recipe format (for editors: taplo, VS Code Even Better TOML), or the
    Markdown reference with --markdown; --constitution for the constitution file format."""
    from engine.load.reference import schema_text

    text = schema_text(markdown, constitution)
    if output:
        Path(output).write_text(text + "\n")
    else:
        click.echo(text)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False), default=".")
@click.option("--example", metavar="NAME", help="A shipped example recipe with its data instead (caI_multiturn, ...).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init(directory: str, example: str | None, force: bool) -> None:
    """Write a commented starter recipe (and a small data file) into DIRECTORY, or an example."""
    from engine.load.starter import write_example, write_starter

    written = write_example(Path(directory), example, force) if example else write_starter(Path(directory), force)
    for p in written:
        out.print(f"wrote {p}", markup=False)
    out.print(f"next: recipe run {written[0]}", markup=False)


from engine.cli.export import export as _export  # noqa: E402

main.add_command(_export)
