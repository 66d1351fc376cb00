"""The plan: each stage's fingerprint, whether its entry is in the store, and why it would run
(the components it was last built with, diffed against today's). `select` turns --only/--force
into the stages to build.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.errors import RecipeError
from engine.core.hashing import HashMemo
from engine.spec.graph import upstream
from engine.spec.recipe import Recipe
from engine.store.cache import Store
from engine.store.fingerprint import fingerprints, reasons


def runs_dir_default() -> str:
    return os.environ.get("RECIPE_RUNS_DIR", "runs")


def memo_for(runs_dir: str | os.PathLike, rehash: bool = False) -> HashMemo:
    return HashMemo(Path(runs_dir) / "cache" / "hashes.json", rehash=rehash)


@dataclass
class PlanItem:
    name: str
    kind: str
    fingerprint: str
    status: str  # cached | partial | run
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


def last_components(runs_dir: Path, recipe: str, stage: str) -> dict | None:
    try:
        return json.loads((runs_dir / recipe / ".last" / f"{stage}.json").read_text())["components"]
    except (OSError, ValueError, KeyError):
        return None


def make_plan(recipe: Recipe, runs_dir: str | os.PathLike, memo: HashMemo | None = None) -> list[PlanItem]:
    runs_dir = Path(runs_dir)
    memo = memo or memo_for(runs_dir)
    store = Store(runs_dir)
    items = []
    for name, (fp, comps) in fingerprints(recipe, memo).items():
        if store.peek(fp, memo):
            status, why = "cached", []
        else:
            status = "partial" if store.has_partial(fp) else "run"
            why = reasons(last_components(runs_dir, recipe.name, name), comps)
            if store.entry_path(fp).is_dir():
                why = ["its cache entry is damaged (a file changed since it was built); it will be rebuilt"]
        items.append(PlanItem(name, recipe.stages[name].kind, fp, status, why, comps))
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
