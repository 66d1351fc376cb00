"""What `recipe status` and `recipe show` print: run and stage tables for the terminal, with
model text escaped (control characters shown, never sent to the terminal)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from engine.core.display import printable
from engine.core.errors import RecipeError
from engine.store.record import read_record, run_dirs

STATUS_STYLE = {
    "cached": "green",
    "run": "yellow",
    "partial": "cyan",
    "failed": "red",
    "ok": "green",
    "interrupted": "magenta",
    "running": "yellow",
    "pending": "dim",
    "deleted by gc": "red",
    "skipped": "dim",
}


def _styled(status) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/]" if style else escape(str(status))


def _round_table(out: Console, stages: dict, base: str | None = None) -> None:
    """Iterative rounds: each round's output diversity (engine/spec/rounds.py), when the run has any."""
    from engine.lib.roundstats import ROUND_COLUMNS, round_rows

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


def _cell(value) -> Text:
    """A row value for the terminal: model output is data, not markup, and its control
    characters (ESC, NUL, ...) are shown escaped, never sent to the terminal."""
    from rich.text import Text

    if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
        text = "\n".join(f"{m.get('role')}: {printable(str(m.get('content')))[:120]}" for m in value)
    else:
        text = printable(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        text = text if len(text) < 300 else text[:297] + "..."
    return Text(text)


def print_status(out: Console, run_dir: Path) -> None:
    """`recipe status RUN`: each stage of the run, its status, rows, time and why it ran."""
    from engine.store.record import shown_status

    rec = read_record(run_dir)
    run_status = shown_status(run_dir, rec)
    table = Table(title=f"{rec['recipe']}/{rec['run']}: {run_status}", title_justify="left")
    for col, kw in (
        ("stage", {"no_wrap": True}),
        ("kind", {"no_wrap": True}),
        ("status", {"no_wrap": True}),
        ("rows", {"justify": "right", "no_wrap": True}),
        ("s", {"justify": "right"}),
        ("why", {"overflow": "fold", "ratio": 1}),
    ):
        table.add_column(col, **kw)
    for name, s in rec["stages"].items():  # record order: the DAG's, rounds of a loop together
        st = s.get("status")
        if run_status == "interrupted" and st in ("running", "pending"):
            st = "interrupted" if st == "running" else st
        st = _entry_state(run_dir, name, st)
        rows = (
            "-"
            if s.get("rows_out") is None and s.get("rows_in") is None
            else f"{_count(s.get('rows_in'))}>{_count(s.get('rows_out'))}"
        )
        table.add_row(
            name,
            s.get("kind", ""),
            _styled(st),
            rows,
            f"{s.get('duration_s', 0) or 0:.1f}",
            "; ".join(s.get("reasons", [])) or s.get("error", ""),
        )
    out.print(table)
    _round_table(out, rec["stages"])


def print_runs(out: Console, root: Path) -> None:
    """`recipe status`: every run under the runs dir, a line each."""
    from engine.store.record import shown_status

    runs = run_dirs(root)
    if not runs:
        out.print(f"no runs under {root}", markup=False)
        return
    table = Table(title=f"runs in {root}", title_justify="left")
    for col in ("recipe", "run", "status", "started", "stages"):  # names and ids whole, to copy them
        table.add_column(col, no_wrap=col in ("recipe", "run"), min_width=22 if col == "run" else None)
    for d in runs:
        rec = read_record(d)
        st = shown_status(d, rec)
        counts: dict[str, int] = {}
        for s in rec["stages"].values():
            state = "interrupted" if st == "interrupted" and s.get("status") == "running" else s.get("status", "?")
            counts[state] = counts.get(state, 0) + 1
        table.add_row(
            rec["recipe"],
            rec["run"],
            _styled(st),
            rec.get("started", "")[:16].replace("T", " "),
            ", ".join(f"{v} {k}" for k, v in counts.items()),
        )
    out.print(table)


def print_stage(out: Console, run_dir: Path, stage: str, n_rows: int | None = None) -> None:
    """`recipe show RUN STAGE`: the stage's report, then the first rows of its output (`n_rows`;
    by default 5, and none for a stage whose report is a table of models, such as eval: its rows
    are whole conversations, and the metrics come first)."""
    from rich.markup import escape
    from rich.text import Text

    from engine.data.rows import count_rows, read_rows
    from engine.lib.roundstats import last_round
    from engine.spec import registry
    from engine.spec.rounds import round_of
    from engine.spec.stage import hook

    rec = read_record(run_dir)
    if stage not in rec["stages"] and last_round(rec["stages"], stage):
        stage = last_round(rec["stages"], stage)  # type: ignore[assignment]  # a loop stage's own name: its last round
    entry = run_dir / "stages" / stage
    if stage in rec["stages"] and entry.is_symlink() and not entry.exists():
        raise RecipeError.single(
            f"the output of stage '{stage}' in run {rec['recipe']}/{rec['run']} was deleted by gc.",
            hint="Run the recipe again to rebuild it (`recipe gc` keeps what recent runs and the recipe files use).",
        )
    if stage not in rec["stages"] or not entry.exists():
        done = [n for n in rec["stages"] if (run_dir / "stages" / n).exists()]
        runs = sorted(d for d in run_dir.parent.iterdir() if d.is_dir() and not d.is_symlink())
        other = next((d for d in reversed(runs) if d != run_dir and (d / "stages" / stage).exists()), None)
        raise RecipeError.single(
            f"run {rec['recipe']}/{rec['run']} has no output for stage '{stage}'.",
            hint=f"Stages with output: {', '.join(done) or 'none'}."
            + (f" Run {other.name} has one: recipe show {rec['recipe']}/{other.name} {stage}." if other else ""),
        )
    info = rec["stages"][stage]
    out.print(f"[bold]{stage}[/] ({info.get('kind')}) fingerprint {info.get('fingerprint')}: {info.get('status')}")
    report_file = entry / "report.json"
    if report_file.exists():
        report = json.loads(report_file.read_text())
        module = registry.load(info["kind"]) if info.get("kind") in registry.kinds() else None

        if hook(module, "summary_table"):  # one column per model, say
            headers, rows = hook(module, "summary_table")(report)  # type: ignore[misc]
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
            for k, v in hook(module, "summary")(report):  # type: ignore[misc]
                table.add_row(Text(printable(str(k))), Text(printable(str(v))))
            out.print(table)
            for rule, examples in report.get("examples", {}).items():
                for ex in examples:
                    detail = escape(printable(f"{ex.get('id')}: {ex.get('detail')}"))
                    out.print(f"  [dim]{escape(rule)}[/] {detail}", markup=True)
            for line in (hook(module, "summary_notes") or (lambda r: []))(report):
                out.print(printable(line), markup=False)
        else:
            out.print_json(json.dumps(report))
    rows_file = entry / "rows.parquet"
    if rows_file.exists():
        tabled = info.get("kind") in registry.kinds() and hook(registry.load(info["kind"]), "summary_table")
        if n_rows is None and tabled:
            out.print(f"rows: {count_rows(rows_file)} (print some with -n N)", markup=False)
        else:
            rows = read_rows(rows_file)[: 5 if n_rows is None else n_rows]
            table = Table(
                title=f"first {len(rows)} of {count_rows(rows_file)} rows", title_justify="left", show_lines=True
            )
            cols = list(dict.fromkeys(k for row in rows for k in row))
            for c in cols:
                table.add_column(c, overflow="fold", max_width=60 if c == "messages" else 30)
            for row in rows:
                table.add_row(*[_cell(row.get(c)) for c in cols])
            out.print(table)
    if round_of(stage):
        _round_table(out, rec["stages"], round_of(stage)[0])  # type: ignore[index]


def print_plan(out: Console, recipe, items) -> None:
    """`recipe plan`: each stage, its fingerprint, cached or to run, and why; notes on remote code."""
    plan_table(out, recipe.name, items)
    remote_code_notes(out, recipe)


def remote_code_notes(out: Console, r) -> None:
    for name, spec in r.models.items():
        if spec.trust_remote_code:
            out.print(
                f"[yellow]note[/]: model '{name}' ({escape(str(spec.path))}) has trust_remote_code = true: "
                "loading it runs code from the model repository."
            )


def plan_table(out: Console, name: str, items) -> None:
    table = Table(title=f"plan: {name}", title_justify="left")
    for col in ("stage", "kind", "fingerprint", "status", "why"):
        table.add_column(col)
    for i in items:
        key = i.fingerprint[:12] if i.fingerprint else "-"  # not known until the stages before it have run
        table.add_row(i.name, i.kind, key, _styled(i.status), "; ".join(i.reasons))
    out.print(table)


def print_diff(out: Console, a: str, b: str, rows: list[dict]) -> None:
    """`recipe diff A B`: the stages whose fingerprints differ, and why."""
    if not rows:
        out.print("no differences: every stage has the same fingerprint")
        return
    table = Table(title=f"{a} -> {b}", title_justify="left")
    for col in ("stage", "A", "B", "why"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["stage"], (r["a"] or "-")[:12], (r["b"] or "-")[:12], "; ".join(r["reasons"]))
    out.print(table)


def print_run_summary(out: Console, name: str, record) -> None:
    """The table `recipe run` ends with: each stage, its status, rows in and out, seconds, and why it ran."""
    from engine.report.runreport import why

    table = Table(title=f"run {name}/{record.run_id}", title_justify="left")
    for col in ("stage", "status", "rows in", "rows out", "seconds", "why"):
        table.add_column(col, overflow="fold", max_width=48 if col == "why" else None)
    for name, s in record.data["stages"].items():
        table.add_row(
            name,
            _styled(s.get("status")),
            _count(s.get("rows_in")),
            _count(s.get("rows_out")),
            f"{s.get('duration_s', 0):.1f}",
            Text(printable(why(s) or "-")),
        )
    out.print(table)
