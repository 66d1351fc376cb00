"""The plan: each stage's cache key, whether its entry is in the store, and why it would run
(the components it was last built with, diffed against today's). `select` turns --only/--force
into the stages to build.

A key holds the content of the stage's inputs (engine.store.fingerprint), so the plan resolves
keys in order: a stage whose upstream stages are all in the store has a key now; one after a
stage that will run has none until that stage has committed its output. Such a stage is `run`
when its own definition changed, else `pending`: "runs if clean's output changes". The executor
resolves each key as it goes (`resolve`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.errors import RecipeError
from engine.core.hashing import HashMemo
from engine.spec.graph import order, upstream
from engine.spec.recipe import Recipe
from engine.store.cache import Store
from engine.store.fingerprint import content_id, fingerprint, reasons, stage_components, waiting_on


def runs_dir_default() -> str:
    return os.environ.get("RECIPE_RUNS_DIR", "runs")


def memo_for(runs_dir: str | os.PathLike, rehash: bool = False) -> HashMemo:
    return HashMemo(Path(runs_dir) / "cache" / "hashes.json", rehash=rehash)


@dataclass
class PlanItem:
    name: str
    kind: str
    fingerprint: str | None  # None: not known until the stages it waits on have run
    status: str  # cached | partial | run | pending (runs only if an upstream output changes)
    reasons: list[str]
    components: dict = field(repr=False, default_factory=dict)

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "status": self.status,
            "reasons": self.reasons,
        }


def last_built(runs_dir: Path, recipe: str, stage: str) -> dict:
    """What the stage's last build recorded (`.last/<stage>.json`): fingerprint, components, output."""
    try:
        found = json.loads((runs_dir / recipe / ".last" / f"{stage}.json").read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def last_components(runs_dir: Path, recipe: str, stage: str) -> dict | None:
    return last_built(runs_dir, recipe, stage).get("components")


def resolve(
    recipe: Recipe, name: str, ids: dict[str, str | None], memo: HashMemo, runs_dir: Path, store: Store
) -> PlanItem:
    """The plan item of one stage, given the output identities of the stages before it (`ids`,
    None where not known yet); sets `ids[name]` when the stage's entry is in the store."""
    comps = stage_components(recipe, name, ids, memo)
    kind = recipe.stages[name].kind
    last = last_components(runs_dir, recipe.name, name)
    waiting = waiting_on(comps)
    ids[name] = None
    if waiting:
        own = [r for r in reasons(last, comps) if not r.startswith("input changed: ")]
        if own and own != ["not in cache"]:
            return PlanItem(name, kind, None, "run", own, comps)
        return PlanItem(name, kind, None, "pending", [f"runs if {', '.join(waiting)}'s output changes"], comps)
    fp = fingerprint(comps)
    entry = store.peek(fp, memo)
    if entry is not None:
        ids[name] = content_id(entry.manifest.get("checksums", {}))
        return PlanItem(name, kind, fp, "cached", [], comps)
    before = last_built(runs_dir, recipe.name, name)
    if before.get("fingerprint") == fp:  # the same key gives the same output (a damaged or gc'd entry)
        ids[name] = before.get("output")
    why = reasons(last, comps)
    if store.entry_path(fp).is_dir():
        why = ["its cache entry is damaged (a file changed since it was built); it will be rebuilt"]
    return PlanItem(name, kind, fp, "partial" if store.has_partial(fp) else "run", why, comps)


def make_plan(recipe: Recipe, runs_dir: str | os.PathLike, memo: HashMemo | None = None) -> list[PlanItem]:
    runs_dir = Path(runs_dir)
    memo = memo or memo_for(runs_dir)
    store = Store(runs_dir)
    ids: dict[str, str | None] = {}
    items = [resolve(recipe, name, ids, memo, runs_dir, store) for name in order(recipe)]
    memo.save()
    return items


def select(recipe: Recipe, only: list[str], force: list[str]) -> set[str]:
    only, force = recipe.stage_names(only), recipe.stage_names(force)  # `dpo` in a loop: its last round
    unknown = [n for n in [*only, *force] if n not in recipe.stages]
    if unknown:
        raise RecipeError.single(
            f"no stage named {', '.join(repr(u) for u in unknown)}.",
            file=str(recipe.path),
            hint=f"Stages: {', '.join(recipe.stages)}.",
        )
    return upstream(recipe, only) if only else set(recipe.stages)
