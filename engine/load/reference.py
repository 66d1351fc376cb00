"""The recipe reference in Markdown, generated from the pydantic models that validate recipes.

`recipe schema --markdown` prints it; docs/recipe-reference.md is this output, and a test keeps
the two equal (regenerate with `recipe schema --markdown -o docs/recipe-reference.md`).
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from engine.spec import registry
from engine.spec.config import EXEC_ONLY, PATH, REF, Resources, StageConfig, Table, marker
from engine.spec.stage import hook

HEADER = """# Recipe reference

Generated from the code by `recipe schema --markdown`; do not edit by hand. Every table rejects
unknown keys, and types are strict (a string is never read as a number). Markers:
**ref** names a dataset, model or stage (and the artifact types it accepts); **exec** cannot
change results, so it is left out of the fingerprint; **path** is a file relative to the
recipe file, whose content (not its name) enters the fingerprint.
"""


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type(a) for a in args if a is not type(None)) + (" (optional)" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {_type(args[1])}" if len(args) == 2 else "table"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return {str: "string", int: "integer", float: "float", bool: "boolean"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(table)"
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "(table)"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Markdown rows for a model's fields, then sections for nested tables."""
    lines = ["| key | type | default | notes |", "| --- | --- | --- | --- |"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        notes = []
        refs = marker(model, name, REF)
        if refs:
            notes.append(f"**ref** ({', '.join(refs)})")
        if marker(model, name, EXEC_ONLY):
            notes.append("**exec**")
        if marker(model, name, PATH):
            notes.append("**path**")
        if field.description:
            notes.append(field.description)
        lines.append(
            f"| `{name}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | {_cell(' '.join(notes))} |"
        )
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, Table):
                nested.append((name, arg))
                break
    out = lines
    for name, sub in nested:
        out += ["", f"`[{prefix}.{name}]`", ""] + table(sub, f"{prefix}.{name}")
    return out


def _doc(module_or_cls) -> str:
    doc = (module_or_cls.__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ") if doc else ""


def markdown() -> str:
    from engine.spec import recipe as recipe_mod

    parts = [HEADER]
    sections = [
        ("[recipe]", "recipe", recipe_mod.RecipeMeta),
        ("[models.NAME]", "models.NAME", recipe_mod.ModelSpec),
        ("[datasets.NAME]", "datasets.NAME", recipe_mod.DatasetSpec),
        ("[constitutions.NAME]", "constitutions.NAME", recipe_mod.ConstitutionSpec),
        ("[tracking]", "tracking", recipe_mod.TrackingSpec),
    ]
    for title, prefix, cls in sections:
        parts += [f"## {title}", ""] + table(cls, prefix) + [""]  # type: ignore[arg-type]
    for name, cls in getattr(recipe_mod, "EXTRA_SECTIONS", {}).items():
        parts += [f"## [{name}.NAME]", "", _doc(cls), ""] + table(cls, f"{name}.NAME") + [""]
    parts += [
        "## Stages",
        "",
        "Each `[stages.NAME]` table has a `kind`; the other keys depend on it. Every stage also "
        "takes a `[stages.NAME.resources]` table (processes > 1 for training stages only):",
        "",
    ]
    parts += table(Resources, "stages.NAME.resources") + [""]
    for kind in sorted(registry.kinds()):
        module = registry.load(kind)
        parts += [
            f'### kind = "{kind}"',
            "",
            _doc(module),
            "",
            f"Gives: `{module.GIVES}`" + (" (depends on the config)" if hook(module, "gives") else "") + ".",
            "",
        ]
        parts += table(module.Config, "stages.NAME", skip=tuple(StageConfig.model_fields)) + [""]
    return "\n".join(parts).rstrip() + "\n"


CONSTITUTION_HEADER = """# Constitution reference

Generated from the code by `recipe schema --constitution --markdown`; do not edit by hand. A
constitution is a TOML file named by a recipe's `[constitutions.NAME] path = "..."`. Unknown keys
are errors, types are strict, and every text must be non-empty. Few-shot examples go either
under their principle as `[[principles.examples]]` (no `principle` key needed) or at the top
level as `[[examples]]` with `principle = "id"` (or without it: an example for any principle).
A critique or revision prompt shows the principle's own examples, then the top-level ones for it.
`recipes/constitutions/hhh.toml` is a complete example.
"""


def constitution_markdown() -> str:
    from engine.lib.constitution import Constitution, Example, Message, Principle

    parts = [CONSTITUTION_HEADER]
    for title, model, skip in (
        ("top level", Constitution, ()),
        ("[[principles]]", Principle, ()),
        ("[[principles.examples]] and [[examples]]", Example, ()),
        ("[[principles.examples.context]] and [[examples.context]]", Message, ()),
    ):
        parts += [f"## {title}", "", _doc(model), ""] + table(model, title, skip=skip) + [""]
    return "\n".join(parts).rstrip() + "\n"


def schema_text(markdown: bool, constitution: bool) -> str:
    """What `recipe schema` prints: the recipe's JSON Schema, or the Markdown reference with
    `markdown`; the constitution file format's with `constitution`."""
    if constitution and markdown:
        from engine.load.reference import constitution_markdown

        text = constitution_markdown().rstrip("\n")
    elif constitution:
        from engine.lib.constitution import Constitution

        text = json.dumps(Constitution.model_json_schema(), indent=2)
    elif markdown:
        from engine.load.reference import markdown as render

        text = render().rstrip("\n")
    else:
        from engine.load.schema import recipe_schema

        text = json.dumps(recipe_schema(), indent=2)
    return text
