"""Human-readable reports: the eval stage's report and the report of a whole run.

A report is a list of blocks (headings, paragraphs, tables, images) rendered twice: to
`report.md` (plots as files under `plots/`) and to a self-contained `report.html` (plots as
`data:` URIs, inline CSS, no external asset). Every text that comes from a model or a data
file is escaped in both renderings.

`write_run_report(run_dir)` builds `runs/<recipe>/<run-id>/report.{md,html}` from the run
record (`record.json`) and the stage entries linked under `stages/`: the data funnel, the
training curves of sft/dpo stages, critique -> revision examples with the share of revisions
that changed anything, the eval results (headline rates with 95% intervals and the differences
outside the noise, per-turn refusal curves, metric bars, composite, example conversations), and
an honest note on what the run can show. It works
with any subset of stages. matplotlib is imported inside engine/core/plots.py's functions only.
"""

from __future__ import annotations

import graphlib
import json
from pathlib import Path
from typing import Any

import tomllib

from engine.core import plots
from engine.core.document import _BLOCKS, Block, Bullets, Details, Grid, Heading, Image, Para, _slug, write_report
from engine.core.io import atomic_write_text
from engine.data.rows import read_rows
from engine.lib.entryblocks import _json, training_blocks
from engine.lib.evals.report import TINY_NOTE, eval_blocks, glance_blocks, honest_blocks
from engine.spec import registry
from engine.spec.stage import hook

TRAINING_KINDS = ("sft", "dpo", "kto", "orpo", "cpo", "grpo")


# --------------------------------------------------------------------------- blocks


# --------------------------------------------------------------------------- eval


# --------------------------------------------------------------------------- run


def _recipe(run_dir: Path) -> dict:
    try:
        return tomllib.loads((Path(run_dir) / "recipe.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def uses_builtin(run_dir: Path) -> bool:
    """Whether the run's resolved recipe loads builtin:tiny-chat (random weights; builtin:smollm2-135m is
    a real model)."""
    return any(
        isinstance(m, dict) and str(m.get("path", "")) == "builtin:tiny-chat"
        for m in (_recipe(run_dir).get("models") or {}).values()
    )


def stage_order(run_dir: Path, names: list[str]) -> list[str]:
    """`names` in the order the run built them: a stage after every stage its table names,
    ties in recipe order (record.json keeps its keys sorted, so it cannot tell)."""
    tables = {n: t for n, t in (_recipe(run_dir).get("stages") or {}).items() if isinstance(t, dict)}
    position = {n: i for i, n in enumerate([*tables, *sorted(set(names) - set(tables))])}

    def refs(table: dict) -> set[str]:
        values = [v for value in table.values() for v in (value if isinstance(value, list) else [value])]
        return {v for v in values if isinstance(v, str) and v in position}

    sorter = graphlib.TopologicalSorter({n: refs(tables.get(n, {})) - {n} for n in position})
    try:
        sorter.prepare()
    except graphlib.CycleError:
        return sorted(names, key=position.__getitem__)
    out: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=position.__getitem__)
        out += ready
        sorter.done(*ready)
    return [n for n in out if n in names]


def why(stage: dict) -> str:
    """Why a stage ran (its reasons), that it re-ran to the same output, or that its inputs came
    out the same; and the rows a row stage reused."""
    parts = [stage["note"]] if stage.get("note") else list(stage.get("reasons") or [])
    if stage.get("rows_reused"):
        parts.append(f"{stage['rows_reused']} rows reused, {stage.get('rows_computed', 0)} computed")
    if not parts and stage.get("status") == "cached":
        parts.append("cached: nothing it depends on changed")
    return "; ".join(parts)


def funnel_blocks(record: dict, order: list[str] | None = None) -> list[Block]:
    stages = record.get("stages") or {}
    stages = {n: stages[n] for n in order or stages}
    if not stages:
        return [Para("The run record lists no stages.")]

    def num(v: Any) -> str:
        return "-" if v is None else str(v)

    table = Grid(
        ["stage", "kind", "status", "rows in", "rows out", "seconds", "why"],
        [
            [
                n,
                s.get("kind", ""),
                s.get("status", ""),
                num(s.get("rows_in")),
                num(s.get("rows_out")),
                "-" if s.get("duration_s") is None else f"{s['duration_s']:.1f}",
                why(s),
            ]
            for n, s in stages.items()
        ],
    )
    blocks: list[Block] = [table]
    counted = {n: s for n, s in stages.items() if (s.get("rows_in") or s.get("rows_out")) and s.get("kind") != "eval"}
    if len(counted) == 1:  # one bar pair says less than a sentence
        ((n, s),) = counted.items()
        blocks.append(
            Para(f"One stage moved rows: {n} took {num(s.get('rows_in'))} and gave {num(s.get('rows_out'))}.")
        )
    elif counted:
        png = plots.bars(
            None,
            list(counted),
            {
                "rows in": [s.get("rows_in") for s in counted.values()],
                "rows out": [s.get("rows_out") for s in counted.values()],
            },
            title="rows in and out of each stage",
            ylabel="rows",
        )
        blocks.append(
            Image(
                "funnel.png",
                png,
                "The data funnel: rows into and out of every stage (cached stages "
                "show the counts recorded when they were built).",
            )
        )
    blocks.append(
        Para(
            "Rows in counts the rows of a stage's row inputs; rows out is what it wrote to "
            "rows.parquet (- for stages that give a model). Eval stages are left out of the chart: "
            "their rows are work items (model x suite item), not data flowing on."
        )
    )
    return blocks


def run_blocks(run_dir: Path) -> tuple[str, list[Block]]:
    run_dir = Path(run_dir)
    record = _json(run_dir / "record.json") or {}
    names = list(record.get("stages") or {})
    # records keep DAG order ("order"); runs recorded before that had sorted keys and are re-sorted
    order = (
        record["order"] if record.get("order") and set(record["order"]) == set(names) else stage_order(run_dir, names)
    )
    stages = {n: record["stages"][n] for n in order}
    title = f"Run report: {record.get('recipe', run_dir.parent.name)} / {record.get('run', run_dir.name)}"
    blocks: list[Block] = [
        Para(
            f"Status: {record.get('status', 'unknown')}; started {record.get('started', '?')}, "
            f"finished {record.get('finished', '-')}."
        )
    ]
    blocks += failure_blocks(stages, run_dir)
    blocks += about_blocks(record, run_dir)
    evals = {
        name: m
        for name in order
        if isinstance(m := _json(run_dir / "stages" / name / "metrics.json"), dict) and "per_model" in m
    }
    for name, metrics in evals.items():  # the behaviour change first: each eval's headline rates and differences
        glance = glance_blocks(metrics)
        if glance:
            blocks += [Heading(f"At a glance: {name}"), *glance[1:]]
    blocks += warning_blocks(stages)
    if evals or any(s.get("kind") == "eval" for s in stages.values()):
        blocks += honest_blocks(uses_builtin(run_dir))
    elif uses_builtin(run_dir):
        blocks += [Heading("What this run can show"), Bullets([TINY_NOTE])]
    blocks += [Heading("Data funnel"), *funnel_blocks(record, order)]

    def entry(name: str) -> Path | None:
        path = run_dir / "stages" / name
        return path if path.exists() else None

    def trains(name: str, kind: str) -> bool:  # a training kind, or any stage that logs per-step metrics
        path = entry(name)
        return path is not None and (kind in TRAINING_KINDS or "steps" in (_json(path / "metrics.json") or {}))

    def memo(name: str, part: str, make) -> list[Block]:  # blocks drawn from one entry: by its fingerprint
        return _memo_blocks(stages[name].get("fingerprint"), name, part, make)

    trained = [(n, s.get("kind", "")) for n, s in stages.items() if trains(n, s.get("kind", ""))]
    if trained:
        blocks.append(Heading("Training curves"))
        for name, kind in trained:
            blocks += memo(name, "training", lambda name=name, kind=kind: training_blocks(name, kind, entry(name)))  # type: ignore[arg-type]
    for name, s in stages.items():  # each stage kind's own blocks (its `report` hook, engine/spec/stage.py)
        report = hook(_module(s.get("kind")), "report")
        if report is not None and entry(name):
            blocks += memo(name, "stage", lambda name=name, report=report: report(name, entry(name)))
    for name, metrics in evals.items():

        def results(name=name, metrics=metrics):
            path = entry(name)
            rows = read_rows(path / "rows.parquet") if (path / "rows.parquet").exists() else []
            return eval_blocks(metrics, rows, prefix=name, glance=False)  # its glance table opens the report

        blocks += [Heading(f"Eval: {name}"), *memo(name, "eval", results)]
    if not evals:
        blocks.append(Para("This run has no eval stage: the report shows the data funnel and training only."))
    return title, blocks


REPORT_STYLE = 4  # bump when a stage's report blocks change: memoized blocks of older styles are not reused


def _memo_blocks(fingerprint: str | None, name: str, part: str, make) -> list[Block]:
    """The blocks `make()` draws from one cache entry, kept beside the figure cache by the entry's
    fingerprint: a cached re-run rewrites its report without reading rows or drawing."""
    import base64
    import dataclasses

    directory = plots.cache_dir()
    if directory is None or not fingerprint:
        return make()
    path = directory / f"blocks-{fingerprint}-{_slug(name)}-{part}-{REPORT_STYLE}.{plots.STYLE}.json"
    try:
        return [
            _BLOCKS[d.pop("type")](**{k: base64.b64decode(v) if k == "png" else v for k, v in d.items()})  # type: ignore[arg-type]
            for d in json.loads(path.read_text(encoding="utf-8"))
        ]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    blocks = make()
    data = [
        {
            "type": type(b).__name__,
            **{k: base64.b64encode(v).decode() if k == "png" else v for k, v in dataclasses.asdict(b).items()},
        }
        for b in blocks
    ]
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data))
    return blocks


def failure_blocks(stages: dict, run_dir: Path) -> list[Block]:
    """A failed run says first which stage failed, its one-line cause and where its log is."""
    failed = [(n, s) for n, s in stages.items() if s.get("status") == "failed"]
    if not failed:
        return []
    return [
        Heading("Failed"),
        Bullets(
            [
                f"stage '{n}' ({s.get('kind', '')}) failed: {s.get('error', 'see its log').splitlines()[0]}; "
                f"log: {run_dir / s['log'] if s.get('log') else run_dir / 'logs' / (n + '.log')}"
                for n, s in failed
            ]
        ),
    ]


def about_blocks(record: dict, run_dir: Path) -> list[Block]:
    """What the run was: the command that reproduces it, the seed, the models, the versions, and
    the resolved recipe (collapsed)."""
    recipe = _recipe(run_dir)
    models = recipe.get("models") or {}
    rows = [
        [name, str(m.get("path", "")), str(m.get("backend", "hf"))] for name, m in models.items() if isinstance(m, dict)
    ]
    blocks: list[Block] = [
        Heading("What this run was"),
        Bullets(
            [
                f"command: {record.get('command') or 'recipe run ' + str(record.get('recipe_file', ''))}",
                f"seed: {record.get('seed', (recipe.get('recipe') or {}).get('seed', '?'))}",
                "versions: "
                + (", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items()) or "not recorded"),
            ]
        ),
    ]
    if rows:
        blocks.append(Grid(["model", "path", "backend"], rows))
    try:
        text = (run_dir / "recipe.toml").read_text(encoding="utf-8")
    except OSError:
        text = ""
    if text:
        blocks.append(Details("the resolved recipe (extends and --set applied)", text))
    return blocks


def warning_blocks(stages: dict) -> list[Block]:
    """Every warning the run's stages gave (cached stages: those of the run that built them)."""
    items = [f"{n}: {w}" for n, s in stages.items() for w in s.get("warnings") or []]
    return [Heading("Warnings"), Bullets(items)] if items else []


def write_run_report(run_dir: Path) -> list[Path]:
    """Write `run_dir/report.md`, `run_dir/report.html` (self-contained) and `run_dir/plots/*.png`
    from the run's record and stage entries; returns the paths written. Figures drawn before from
    the same data are reused from the store's figure cache (runs/cache/figures), so a cached
    re-run neither draws nor imports matplotlib."""
    run_dir = Path(run_dir)
    cache = run_dir.parent.parent / "cache" / "figures" if (run_dir.parent.parent / "cache").is_dir() else None
    with plots.figure_cache(cache):
        title, blocks = run_blocks(run_dir)
    return write_report(run_dir, title, blocks)


def _module(kind: str | None):
    """The stage module of `kind` (None for a kind not installed here: its blocks are left out)."""
    return registry.load(kind) if kind in registry.kinds() else None
