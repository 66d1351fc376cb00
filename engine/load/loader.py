"""TOML recipe -> validated pydantic models, with every error located (file, line, dotted key).

Loading order: read the file (and what it `extends`, recursively; tables merge, later keys
win), apply `--set` overrides, resolve relative paths against the directory of the file that
set them, then validate every table. All problems are gathered and raised together as one
`RecipeError`. The graph checks (references, cycles, artifact types) live in engine/spec/graph.py.

`[loops.NAME]` tables (iterative rounds, engine/spec/rounds.py) unroll after the stages are parsed
and before the graph checks: `recipe.stages` holds `dpo@1` .. `dpo@N`, while `recipe.raw` keeps
the user's loop table. Problems in an unrolled stage point at the user's own key and line, with
the round (`stages.dpo.model (round 2)`).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.core.errors import Problem, RecipeError
from engine.load.layers import apply_sets, apply_unsets, load_layers
from engine.load.problems import _keys_hint, describe, pydantic_problems, shape_problems
from engine.spec import registry
from engine.spec.backends import BACKENDS
from engine.spec.config import PATH, StageConfig, Table, marker, ref_fields
from engine.spec.locations import _display, locate
from engine.spec.paths import resolve_path
from engine.spec.recipe import NAME_PATTERN, SECTIONS, Recipe, RecipeMeta, TrackingSpec
from engine.spec.rounds import LoopSpec, Rounds, loop_problems, merge_round_problems
from engine.spec.stage import Stage, hook


def _resolve_paths(data: dict, locations: dict, top: Path) -> None:
    for section, spec_keys in (("models", ("path", "adapter")), ("datasets", ("path",)), ("constitutions", ("path",))):
        for name, table in (data.get(section) or {}).items():
            if not isinstance(table, dict):
                continue
            for k in (*spec_keys, "chat_template") if section == "models" else spec_keys:
                if k == "chat_template" and ("{" in str(table.get(k)) or "\n" in str(table.get(k))):
                    continue  # inline Jinja, not a file name
                if isinstance(table.get(k), str):
                    table[k] = resolve_path(table[k], f"{section}.{name}.{k}", locations, top)


def _resolve_stage_paths(name: str, table: dict, config_cls: type[StageConfig], locations: dict, top: Path) -> None:
    for fname in config_cls.model_fields:
        if marker(config_cls, fname, PATH) and isinstance(table.get(fname), str):
            table[fname] = resolve_path(table[fname], f"stages.{name}.{fname}", locations, top)


def _alias_round_locations(locations: dict[str, tuple[str, int]], stages: dict[str, Stage]) -> None:
    """`stages.dpo@2.*` keys located where the user wrote `stages.dpo.*`, so that paths read late
    (resources.accelerate_config) resolve against the file that set them."""
    for name, stage in stages.items():
        if stage.round is None:
            continue
        prefix = f"stages.{stage.base}"
        for key, where in list(locations.items()):
            if key == prefix or key.startswith(prefix + "."):
                locations.setdefault(f"stages.{name}{key[len(prefix) :]}", where)


def load_recipe(
    path: str | Path, sets: list[str] | tuple[str, ...] = (), unsets: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """Read, merge, override (`unsets`, then `sets`), resolve and validate a recipe. Raises
    RecipeError with every problem."""
    top = Path(path)
    data, locations = load_layers(top)
    apply_unsets(data, locations, list(unsets))
    apply_sets(data, locations, list(sets))
    if shape := shape_problems(data, locations, top):
        raise RecipeError(shape)
    _resolve_paths(data, locations, top)
    problems: list[Problem] = []

    def check(key: str, model: type[Table], value: Any) -> Any:
        if not isinstance(value, dict):
            problems.append(Problem(f"expected a table, found {describe(value)}.", **locate(locations, key, top)))
            return None
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, key, model, locations, top))
            return None

    for section in data:
        if section not in SECTIONS:
            problems.append(
                Problem(
                    f"unknown table '{section}'.",
                    hint=_keys_hint(section, list(SECTIONS)),
                    **locate(locations, section, top),
                )
            )
    if "recipe" not in data:
        problems.append(
            Problem("missing the [recipe] table.", file=_display(top), hint='Add [recipe] with at least name = "...".')
        )
    meta = check("recipe", RecipeMeta, data.get("recipe", {})) if "recipe" in data else None
    if isinstance(data.get("tracking"), dict) and isinstance(data["tracking"].get("dir"), str):
        data["tracking"]["dir"] = resolve_path(data["tracking"]["dir"], "tracking.dir", locations, top)
    tracking = check("tracking", TrackingSpec, data["tracking"]) if "tracking" in data else TrackingSpec()

    parsed: dict[str, dict] = {}
    previews: dict[str, list[dict] | None] = {}  # rows of small local dataset files, for stage checks
    for section in ("models", "datasets", "constitutions"):
        parsed[section] = {}
        tables = data.get(section) or {}
        if not isinstance(tables, dict):
            problems.append(Problem(f"expected tables [{section}.NAME].", **locate(locations, section, top)))
            continue
        for name, table in tables.items():
            if not re.match(NAME_PATTERN, name):
                problems.append(
                    Problem(
                        f"'{name}' is not a valid name (letters, digits, _ . -).",
                        **locate(locations, f"{section}.{name}", top),
                    )
                )
            spec = check(f"{section}.{name}", SECTIONS[section], table)  # type: ignore[arg-type]
            if spec is None:
                continue
            parsed[section][name] = spec
            path_value = getattr(spec, "path", "")
            if Path(path_value).is_absolute() and not Path(path_value).exists():
                problems.append(
                    Problem(
                        f"file not found: {path_value}.",
                        hint="Paths are relative to the recipe file.",
                        **locate(locations, f"{section}.{name}.path", top),
                    )
                )
            elif section == "datasets":
                from engine.data.preview import preview

                where = locate(locations, f"datasets.{name}.path", top)
                rows, why, key = preview(spec, name, where)
                if why:  # a wrong `columns` mapping is located at `columns`, not at `path`
                    problems.append(Problem(why, **locate(locations, f"datasets.{name}.{key}", top)))
                previews[name] = rows
            if section == "models" and path_value.startswith("builtin:"):
                from engine.models.builtins import builtin_problem

                if (why := builtin_problem(path_value)) is not None:
                    problems.append(
                        Problem(why.message, hint=why.hint, **locate(locations, f"models.{name}.path", top))
                    )
            if section == "models" and not (info := BACKENDS[spec.backend]).available():
                problems.append(
                    Problem(
                        f"model '{name}' uses the {spec.backend} backend, but {info.requires} is not installed here.",
                        hint=f'Install it on a machine that can run it (`{info.install}`), or use backend = "hf".',
                        **locate(locations, f"models.{name}.backend", top),
                    )
                )

    stages: dict[str, Stage] = {}
    known = registry.kinds()
    for name, table in (data.get("stages") or {}).items():
        key = f"stages.{name}"
        if not isinstance(table, dict):
            problems.append(Problem(f"expected a table, found {describe(table)}.", **locate(locations, key, top)))
            continue
        if "@" in name:
            problems.append(
                Problem(
                    f"'{name}' is not a valid stage name: '@' is reserved for the rounds of a loop.",
                    hint="Name the stage without '@'; [loops.*] makes NAME@1, NAME@2, ...",
                    **locate(locations, key, top),
                )
            )
        elif not re.match(NAME_PATTERN, name):
            problems.append(
                Problem(f"'{name}' is not a valid stage name (letters, digits, _ . -).", **locate(locations, key, top))
            )
        kind = table.get("kind")
        if not isinstance(kind, str):
            problems.append(
                Problem(
                    "missing required key 'kind'." if kind is None else f"expected a string, found {describe(kind)}.",
                    hint=f"Known kinds: {', '.join(sorted(known))}.",
                    **locate(locations, f"{key}.kind", top),
                )
            )
            continue
        if kind not in known:
            close = difflib.get_close_matches(kind, list(known), n=1)
            hint = (f"Did you mean '{close[0]}'? " if close else "") + f"Known kinds: {', '.join(sorted(known))}."
            problems.append(
                Problem(f"unknown stage kind '{kind}'.", hint=hint, **locate(locations, f"{key}.kind", top))
            )
            continue
        module = registry.load(kind)
        _resolve_stage_paths(name, table, module.Config, locations, top)
        config = check(key, module.Config, table)
        if config is not None:
            stages[name] = Stage(name, kind, config, module)

    names: dict[str, str] = {}
    for section, items in (
        ("models", parsed["models"]),
        ("datasets", parsed["datasets"]),
        ("constitutions", parsed["constitutions"]),
        ("stages", stages),
    ):
        for name in items:
            if name in names:
                problems.append(
                    Problem(
                        f"the name '{name}' is used by both [{names[name]}.{name}] and [{section}.{name}].",
                        hint="References are by name: rename one of them.",
                        **locate(locations, f"{section}.{name}", top),
                    )
                )
            names[name] = section

    from engine.spec.graph import graph_problems, refs_of

    # Every stage's references: parsed, or raw for stages that failed their own validation.
    user_stages = [n for n, t in (data.get("stages") or {}).items() if isinstance(t, dict)]
    refs: dict[str, list[tuple[str, str]]] = {n: list(refs_of(s.config)) for n, s in stages.items()}
    for name in user_stages:
        if name not in stages:
            table = data["stages"][name]
            kind = table.get("kind")
            fields = ref_fields(registry.load(kind).Config) if kind in known else {}
            raw = [(f, v) for f in fields for v in (table.get(f) if isinstance(table.get(f), list) else [table.get(f)])]
            refs[name] = [(f, v) for f, v in raw if isinstance(v, str)]

    loops: dict[str, LoopSpec] = {}
    tables = data.get("loops") or {}
    if not isinstance(tables, dict):
        problems.append(Problem("expected tables [loops.NAME].", **locate(locations, "loops", top)))
        tables = {}
    for name, table in tables.items():
        if not re.match(NAME_PATTERN, name):
            problems.append(
                Problem(
                    f"'{name}' is not a valid loop name (letters, digits, _ . -).",
                    **locate(locations, f"loops.{name}", top),
                )
            )
        spec = check(f"loops.{name}", LoopSpec, table)
        if spec is not None:
            loops[name] = spec
    found, broken = loop_problems(loops, user_stages, refs, lambda key: locate(locations, key, top))
    problems.extend(found)
    rounds = Rounds({n: spec for n, spec in loops.items() if n not in broken}, set(user_stages))

    recipe = Recipe(
        top,
        meta or RecipeMeta(name="invalid"),
        parsed["models"],
        parsed["datasets"],
        parsed["constitutions"],
        rounds.unroll(stages),
        data,
        locations,
        rounds.loops,
        previews,
        tracking or TrackingSpec(),
    )
    _alias_round_locations(locations, recipe.stages)
    # Stages that failed their own validation still exist as names (references to them are
    # not reported again), and their own references are still checked.
    invalid: dict[str, list[tuple[str, str]]] = {}
    for name in user_stages:
        if name not in stages:
            invalid.update(rounds.refs(name, refs[name]))
    found = graph_problems(recipe, invalid)
    for name, stage in recipe.stages.items():
        if hook(stage.module, "check"):  # stage-specific checks, e.g. template variables
            found.extend(hook(stage.module, "check")(name, stage.config, recipe))  # type: ignore[misc]
    from engine.models.info import problems as model_problems
    from engine.spec.stage import uses_problems

    found.extend(uses_problems(recipe))
    found.extend(model_problems(recipe))
    from engine.lib.tracking import tracking_problems

    found.extend(tracking_problems(recipe))
    problems.extend(merge_round_problems(found, set(rounds.member)))
    if problems:
        raise RecipeError(problems)
    return recipe
