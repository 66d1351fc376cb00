"""What a run tells about its stages beyond building them: rows the datasets dropped, which
models the stages still to run need, and early cutoff (a stage that re-ran and committed the
output it had before, and the stages after it that stayed cached because of that)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.spec.graph import artifact_type, edges, order, upstream
from engine.spec.recipe import Recipe
from engine.store.record import RunRecord


def last_output(runs_dir: Path, recipe: str, stage: str) -> str | None:
    """The identity of the output the stage's last build committed (`.last/<stage>.json`)."""
    try:
        return json.loads((runs_dir / recipe / ".last" / f"{stage}.json").read_text()).get("output")
    except (OSError, ValueError, AttributeError):
        return None


def cutoff_notes(recipe: Recipe, plan: dict, record: RunRecord, console) -> None:
    """For each stage that re-ran and committed the output it had before: how many stages after
    it stayed cached because of that ("clean re-ran: output unchanged, 3 stages after it kept")."""
    stages: dict = record.data["stages"]  # type: ignore[assignment]
    for name in order(recipe):
        if stages.get(name, {}).get("output") != "unchanged":
            continue
        after = [n for n in order(recipe) if n != name and name in upstream(recipe, [n])]
        kept = [n for n in after if stages.get(n, {}).get("status") == "cached" and plan[n].status != "cached"]
        note = f"{name} re-ran: output unchanged, {len(kept)} stage{'' if len(kept) == 1 else 's'} after it kept"
        record.stage(name, note=note)
        if console is not None:
            console.print(note)


def report_dropped(stage: str, dropped: dict, record: RunRecord, warn) -> None:
    """Rows a stage's datasets dropped while loading (bad roles, empty content, ...): per dataset
    and reason, with the first row ids, into the run record and through `warn`."""
    record.stage(stage, dropped=dropped)
    for dataset, info in dropped.items():
        reasons = info["reasons"]
        parts = [
            f"{r}: {v['rows']} (first: {', '.join(v['first_ids'])})" if v["first_ids"] else f"{r}: {v['rows']}"
            for r, v in reasons.items()
        ]
        warn(
            f"dataset '{dataset}': dropped {sum(v['rows'] for v in reasons.values())} of {info['total']} rows; "
            + "; ".join(parts)
        )


def models_used(recipe: Recipe, names: list[str]) -> set[tuple[str, str]]:
    """(source, name) of every model the stages `names` read: [models] entries and stage-made models."""
    out: set[tuple[str, str]] = set()
    for name in names:
        for edge in edges(recipe, name):
            if edge.source == "models" or (edge.source == "stages" and artifact_type(recipe, edge.name) == "model"):
                out.add((edge.source.value, edge.name))
    return out
