"""The stage contract: what a stage module is, written once. The registry checks every module
against it when a kind loads, and the engine reads optional hooks through `hook()` only.

A stage kind is a module (built in under `stages/`, or a plugin registered under the entry point
group `recipe.stages`). It never touches the cache, the DAG or the launcher: it gets its config,
its resolved inputs and a `Context`, and writes its artifact through the context.

Required:

- `Config`: a `engine.spec.config.StageConfig` subclass (pydantic, extra keys forbidden). Reference
  fields are marked `Ref(...)` (they build the DAG and are type-checked), execution-only fields
  `ExecOnly(...)` (left out of the fingerprint: they must never change the output), file paths
  `PathField(...)` (hashed by content).
- `VERSION: int`: part of the fingerprint. Bump it when the code's output changes for the same
  config and inputs.
- `GIVES: str`: the artifact type it produces (one of `engine.spec.config.ARTIFACT_TYPES`).
- `run(config, inputs, ctx) -> None`: does the work. `inputs` maps each reference field to an
  `Artifact` (or a list of them); `ctx` is an `engine.run.context.Context` (models, backends,
  templates, shards, progress, `seeds`, `save_rows`, `save_json`, `warn`, `log`). Every random
  stream comes from `ctx.seeds` (by row id, never by position). Bad input found while running is
  a `RecipeError` located at the stage's key (exit 2); anything else is a stage failure (exit 1).

Optional hooks:

- `gives(config) -> str`: the artifact type when it depends on the config (judge: preferences in,
  preferences out).
- `check(name, config, recipe) -> list[Problem]`: validation beyond the schema, run by `recipe
  validate` (template variables, knobs that do not apply, data the stage cannot use). Everything
  `run` would reject because of the recipe or its data belongs here.
- `templates(config, recipe) -> dict[str, str]`: config field -> template name for every prompt
  template the stage renders with this config; their bytes (and includes) enter the fingerprint.
- `uses(config) -> (fields, what)`: the config fields this configuration reads (by mode, scorer,
  method, ...) and how to name it ("scorer 'rules'"). A key the user set that is not among them is
  reported by `recipe validate` ("rubric is not used by scorer 'rules'"), never silently ignored.
- `TRAINS: bool`: a training stage: it changes weights, loads its own copy of a model (never a
  pooled one), and can run under `accelerate launch` on several processes and nodes
  (`[stages.X.resources]`); on Ray it runs as one task holding its GPUs.
- `ROW_STAGE: bool`: the stage's work is `ctx.shards.map` over rows, and everything before the map
  is cheap and deterministic: on Ray, workers run it with a share of the shards each
  (engine.run.rayexec), then the driver runs it again to assemble the committed shards.
- `code(config, recipe) -> dict`: user code the configuration runs (a scorer given as
  `file.py:function`), name -> identity (its source's sha256, its distribution): it enters the
  fingerprint, and editing it re-runs the stage with the reason "code changed: NAME".
- `definition(components) -> dict`: the stage's own definition, what a row's random streams and
  row memo derive from (engine.store.fingerprint.definition): by default its components without
  the `input` it maps over. A stage whose rows are its own work items (eval: model x suite item)
  drops what those rows carry instead.
- `report(name, entry) -> list[Block]`: the stage's section of the run report, drawn from its
  cache entry (`entry`, a folder) with the blocks of engine.core.document: examples, drop reasons,
  pairs, revisions. Memoized by the entry's fingerprint, so a cached re-run does not redraw it.
- `summary(report) -> list[(label, value)]`, `summary_table(report) -> (headers, rows)`,
  `summary_notes(report) -> list[str]`: what `recipe show` prints from the stage's report.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from engine.spec.config import ARTIFACT_TYPES, StageConfig


class StageModule(Protocol):
    """See the module docstring: the required part of the contract."""

    Config: type[StageConfig]
    VERSION: int
    GIVES: str

    def run(self, config: Any, inputs: dict, ctx: Any) -> None: ...


HOOKS: dict[str, str] = {  # optional hook -> what it must be
    "gives": "callable",
    "check": "callable",
    "templates": "callable",
    "uses": "callable",
    "TRAINS": "bool",
    "ROW_STAGE": "bool",
    "summary": "callable",
    "summary_table": "callable",
    "summary_notes": "callable",
    "report": "callable",
    "definition": "callable",
    "code": "callable",
}


def contract_problems(module: ModuleType) -> list[str]:
    """What is wrong with `module` as a stage module (empty when it keeps the contract)."""
    found = []
    config = getattr(module, "Config", None)
    if not (isinstance(config, type) and issubclass(config, StageConfig)):
        found.append("Config must be a StageConfig subclass")
    if not isinstance(getattr(module, "VERSION", None), int) or isinstance(getattr(module, "VERSION", None), bool):
        found.append("VERSION must be an int")
    if getattr(module, "GIVES", None) not in ARTIFACT_TYPES:
        found.append(f"GIVES must be one of {', '.join(ARTIFACT_TYPES)}")
    if not callable(getattr(module, "run", None)):
        found.append("run(config, inputs, ctx) is missing")
    for name, kind in HOOKS.items():
        if not hasattr(module, name):
            continue
        value = getattr(module, name)
        if kind == "callable" and not callable(value):
            found.append(f"{name} must be a function")
        if kind == "bool" and not isinstance(value, bool):
            found.append(f"{name} must be True or False")
    return found


ALWAYS_USED = {"kind", "resources"}


def unused_problems(name: str, config: Any, recipe: Any, used: set[str], what: str) -> list:
    """A problem for each key the user set that `what` (e.g. "method 'revision'") ignores."""
    from engine.core.errors import Problem

    return [
        Problem(f"{field} is not used by {what}.", hint=f"Remove {field}.", **recipe.where(f"stages.{name}.{field}"))
        for field in sorted(config.model_fields_set - used - ALWAYS_USED)
    ]


def uses_problems(recipe: Any) -> list:
    """Keys set in a stage table that its configuration does not read, for every stage with `uses`."""
    found = []
    for name, stage in recipe.stages.items():
        uses = hook(stage.module, "uses")
        if uses is not None:
            used, what = uses(stage.config)
            found += unused_problems(name, stage.config, recipe, set(used), what)
    return found


def hook(module: ModuleType | None, name: str) -> Callable | Any | None:
    """An optional hook of a stage module (None when the module does not define it)."""
    assert name in HOOKS, f"unknown stage hook {name!r}"
    return getattr(module, name, None) if module is not None else None


@dataclass
class Stage:
    name: str
    kind: str
    config: StageConfig
    module: ModuleType
    round: int | None = None  # in a loop: the round (the name is then `base@round`)
    loop: str | None = None  # in a loop: its [loops.*] name

    @property
    def base(self) -> str:
        """The name the user gave the stage (`dpo` for `dpo@2`)."""
        return self.name.rsplit("@", 1)[0] if self.round is not None else self.name
