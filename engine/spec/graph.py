"""References -> DAG: every reference resolves, no cycles, artifact types match.

The graph has no edge list of its own: a stage depends on whatever its reference fields
(`input`, `model`, ... marked with `Ref` in its Config) name. A name is a dataset, a model,
or another stage.
"""

from __future__ import annotations

import difflib
import graphlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import Problem
from engine.spec.config import ref_fields
from engine.spec.stage import hook

if TYPE_CHECKING:
    from engine.spec.recipe import Recipe


class Source(str, Enum):
    """The kinds of thing a reference can name: the recipe table that defines it. The one list
    the graph, the fingerprint's input identities and the re-run reasons all read, so a new kind
    of input cannot be forgotten in one of them (engine.store.fingerprint checks it covers every one).
    The value is the recipe section (and what fingerprints hold); `label` is how a re-run
    reason names a changed input of this kind."""

    STAGES = "stages"
    DATASETS = "datasets"
    MODELS = "models"
    CONSTITUTIONS = "constitutions"

    def __hash__(self) -> int:  # as the plain string hashes: Source.MODELS and "models" are one key
        return str.__hash__(self)

    @property
    def label(self) -> str:
        return {"stages": "input", "datasets": "data", "models": "model", "constitutions": "constitution"}[self.value]

    @property
    def singular(self) -> str:
        return self.value[:-1]

    def table(self, recipe: Recipe) -> dict:
        """The recipe's definitions of this kind (name -> spec)."""
        return getattr(recipe, self.value)


@dataclass(frozen=True)
class Edge:
    field: str  # the Config field holding the reference
    name: str  # what it names
    source: Source


def refs_of(config) -> Iterator[tuple[str, str]]:
    """(field, name) for every reference in a stage config, lists flattened in order."""
    for fname in ref_fields(type(config)):
        value = getattr(config, fname)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                yield fname, item


def source_of(recipe: Recipe, name: str) -> Source | None:
    """What `name` is in this recipe (stages first, then datasets, models, constitutions)."""
    for source in Source:
        if name in source.table(recipe):
            return source
    return None


def artifact_type(recipe: Recipe, name: str) -> str | None:
    if name in recipe.stages:
        stage = recipe.stages[name]
        gives = hook(stage.module, "gives")  # kinds whose output type follows their config
        return gives(stage.config) if gives else stage.module.GIVES
    if name in recipe.datasets:
        return recipe.datasets[name].type
    if name in recipe.models:
        return "model"
    if name in recipe.constitutions:
        return "constitution"
    return None


def edges(recipe: Recipe, stage: str) -> list[Edge]:
    out = []
    for fname, name in refs_of(recipe.stages[stage].config):
        src = source_of(recipe, name)
        if src:
            out.append(Edge(fname, name, src))
    return out


def _missing(recipe: Recipe, stage: str, fname: str, ref: str) -> Problem:
    if (
        ref_fields(type(recipe.stages[stage].config)).get(fname) == ["constitution"]
        if stage in recipe.stages
        else False
    ):
        known_c = sorted(recipe.constitutions)
        close = difflib.get_close_matches(ref, known_c, n=1)
        return Problem(
            f"stage '{stage}' uses constitution '{ref}', which is not defined.",
            hint=(f"Did you mean '{close[0]}'? " if close else "")
            + (
                f"Defined: {', '.join(known_c)}."
                if known_c
                else f'Add [constitutions.{ref}] with path = "constitutions/{ref}.toml".'
            ),
            **recipe.where(f"stages.{stage}.{fname}"),
        )
    known = {
        s.value: sorted(s.table(recipe)) for s in (Source.DATASETS, Source.MODELS, Source.STAGES, Source.CONSTITUTIONS)
    }
    everything = [n for names in known.values() for n in names]
    close = difflib.get_close_matches(ref, everything, n=1)
    listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in known.items() if v) or "none defined"
    return Problem(
        f"stage '{stage}' refers to '{ref}', which is not defined.",
        hint=(f"Did you mean '{close[0]}'? " if close else "") + f"Known names: {listing}.",
        **recipe.where(f"stages.{stage}.{fname}"),
    )


def graph_problems(recipe: Recipe, invalid: dict[str, list[tuple[str, str]]] | None = None) -> list[Problem]:
    """Missing references, type mismatches and cycles, all of them. `invalid` holds the raw
    references of stages that failed their own validation: they are checked for existence,
    and references to those stages are not reported as missing."""
    invalid = invalid or {}
    problems: list[Problem] = []
    deps: dict[str, set[str]] = {}
    for name, refs in invalid.items():
        problems += [_missing(recipe, name, f, r) for f, r in refs if r not in invalid and not source_of(recipe, r)]
    for name, stage in recipe.stages.items():
        deps[name] = set()
        accepted = ref_fields(type(stage.config))
        for fname, ref in refs_of(stage.config):
            if ref in invalid:
                deps[name].add(ref)
                continue
            src = source_of(recipe, ref)
            if src is None:
                problems.append(_missing(recipe, name, fname, ref))
                continue
            gives = artifact_type(recipe, ref)
            if gives not in accepted[fname]:
                what = (
                    f"stage '{ref}' ({recipe.stages[ref].kind})" if src is Source.STAGES else f"{src.singular} '{ref}'"
                )
                problems.append(
                    Problem(
                        f"stage '{name}' ({stage.kind}) takes {' or '.join(accepted[fname])} as {fname}, "
                        f"but {what} gives {gives}.",
                        hint="Point it at a stage or dataset of the right type.",
                        **recipe.where(f"stages.{name}.{fname}"),
                    )
                )
            if src is Source.STAGES:
                deps[name].add(ref)
    problems += resource_problems(recipe)
    try:
        list(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        problems.append(
            Problem(
                f"stages form a cycle: {' -> '.join(cycle)}.",
                hint="A stage cannot consume its own output, directly or through others.",
                **recipe.where(f"stages.{cycle[0]}"),
            )
        )
    return problems


def resource_problems(recipe: Recipe) -> list[Problem]:
    """`[stages.X.resources]`: several processes only for kinds that support them; config files exist."""
    from engine.spec.paths import resolve_path

    problems = []
    for name, stage in recipe.stages.items():
        res = stage.config.resources
        if res.processes > 1 and not hook(stage.module, "TRAINS"):
            problems.append(
                Problem(
                    f"stage '{name}' ({stage.kind}) cannot run on {res.processes} processes: only training stages "
                    "(sft, dpo, kto, orpo) run under accelerate.",
                    hint="Remove [resources] processes, or set it to 1.",
                    **recipe.where(f"stages.{name}.resources.processes"),
                )
            )
        if res.nodes > 1 and not hook(stage.module, "TRAINS"):
            problems.append(
                Problem(
                    f"stage '{name}' ({stage.kind}) cannot run on {res.nodes} nodes: only training stages "
                    "(sft, dpo, kto, orpo) train across machines; row stages spread over `replicas` workers.",
                    hint="Remove [resources] nodes, or use `replicas`.",
                    **recipe.where(f"stages.{name}.resources.nodes"),
                )
            )
        if res.accelerate_config:
            key = f"stages.{name}.resources.accelerate_config"
            path = resolve_path(res.accelerate_config, key, recipe.locations, recipe.path)
            if not Path(path).is_file():
                problems.append(
                    Problem(
                        f"accelerate_config '{res.accelerate_config}' of stage '{name}' is not a file.",
                        hint="Give a path relative to the recipe file (make one with `accelerate config`).",
                        **recipe.where(key),
                    )
                )
    return problems


def order(recipe: Recipe) -> list[str]:
    """Stage names in a deterministic topological order (ties broken by recipe order)."""
    position = {n: i for i, n in enumerate(recipe.stages)}
    sorter = graphlib.TopologicalSorter(
        {n: {e.name for e in edges(recipe, n) if e.source is Source.STAGES} for n in recipe.stages}
    )
    sorter.prepare()
    out: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=position.__getitem__)
        for n in ready:
            out.append(n)
            sorter.done(n)
    return out


def upstream(recipe: Recipe, names: list[str]) -> set[str]:
    """The named stages and every stage they depend on."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(e.name for e in edges(recipe, n) if e.source is Source.STAGES)
    return seen
