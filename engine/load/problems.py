"""Problems found while validating a recipe's tables, in the user's words: pydantic's errors
translated (a key, what was expected, what was given, a did-you-mean), and shape checks that run
before any model (a scalar where a table belongs, nesting deeper than any recipe needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.core.errors import Problem, did_you_mean
from engine.spec import registry
from engine.spec.config import Table
from engine.spec.locations import MAX_DEPTH, locate

_TOML_TYPE = {str: "string", int: "integer", float: "float", bool: "boolean", list: "array", dict: "table"}


def describe(value: Any) -> str:
    kind = _TOML_TYPE.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def _keys_hint(word: str, options: list[str]) -> str:
    return did_you_mean(word, options) or (f"Known keys: {', '.join(sorted(options))}." if options else "")


def _fields_at(model: type[Table], loc: tuple) -> list[str]:
    """Field names of the (nested) model that holds loc[-1], for did-you-mean."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), ann)
    return list(getattr(current, "model_fields", {}))


def pydantic_problems(
    exc: ValidationError, prefix: str, model: type[Table], locations: dict, top: Path
) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join((prefix, *loc)) if loc else prefix
        where = locate(locations, key, top)
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'."
            hints = getattr(model, "unknown_key_hints", {}) if len(loc) == 1 else {}  # e.g. TRL's names
            hint = hints.get(loc[-1]) or _keys_hint(loc[-1], _fields_at(model, loc))
        elif kind == "missing":
            msg, hint = f"missing required key '{loc[-1]}'.", "Add it to the table."
        else:
            expected = err["msg"].replace("Input should be", "expected").replace("Value error, ", "")
            msg = f"{expected}, found {describe(err['input'])}."
            hint = None
        problems.append(Problem(msg, hint=hint, **where))
    return problems


def shape_problems(data: dict, locations: dict, top: Path) -> list[Problem]:
    """The shape every later check relies on: each section a table of tables, a stage's kind a
    string, nothing nested absurdly deep. Checked first, so that no check meets a scalar where it
    expects a table (`datasets = true`, `stages = 1`, also through --set)."""
    problems = []
    stack = [(data, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            problems.append(
                Problem(
                    f"nested more than {MAX_DEPTH} levels deep.",
                    hint="Flatten the value.",
                    **locate(locations, ".".join(path[:3]), top),
                )
            )
            break
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack += [(v, (*path, str(k)), depth + 1) for k, v in items if isinstance(v, (dict, list))]  # type: ignore[misc]
    if problems:
        return problems
    if "recipe" in data and not isinstance(data["recipe"], dict):
        problems.append(
            Problem(
                f"expected the [recipe] table, found {describe(data['recipe'])}.", **locate(locations, "recipe", top)
            )
        )
    for section in ("models", "datasets", "constitutions", "stages", "loops"):
        tables = data.get(section)
        if tables is None:
            continue
        if not isinstance(tables, dict):
            problems.append(
                Problem(
                    f"expected tables [{section}.NAME], found {describe(tables)}.",
                    hint=f"Write each entry as its own table: [{section}.NAME].",
                    **locate(locations, section, top),
                )
            )
            continue
        for name, table in tables.items():
            if not isinstance(table, dict):
                problems.append(
                    Problem(
                        f"expected a table [{section}.{name}], found {describe(table)}.",
                        **locate(locations, f"{section}.{name}", top),
                    )
                )
            elif section == "stages" and "kind" in table and not isinstance(table["kind"], str):
                problems.append(
                    Problem(
                        f"expected a string (the stage kind), found {describe(table['kind'])}.",
                        hint=f"Known kinds: {', '.join(sorted(registry.kinds()))}.",
                        **locate(locations, f"stages.{name}.kind", top),
                    )
                )
    return problems
