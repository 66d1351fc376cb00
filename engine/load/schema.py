"""JSON Schema of the recipe format, built from the same pydantic models that validate it.

Stages are chosen by `kind` with if/then (not oneOf with a discriminator): an editor then names
the key that is wrong ("'min_wrods' was unexpected") instead of "not valid under any of the
schemas in oneOf". A recipe with `recipe.extends` may give partial tables (a stage that only
changes `lr`): its tables are checked for unknown keys and types, not for required keys.
"""

from __future__ import annotations

import copy
from typing import Annotated, Union

from pydantic import Field, TypeAdapter, create_model

from engine.spec import registry
from engine.spec.config import Table
from engine.spec.recipe import ConstitutionSpec, DatasetSpec, ModelSpec, RecipeMeta
from engine.spec.rounds import LoopSpec


def recipe_schema() -> dict:
    configs = tuple(registry.load(kind).Config for kind in sorted(registry.kinds()))
    stage = configs[0] if len(configs) == 1 else Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007
    model = create_model(
        "Recipe",
        __base__=Table,
        recipe=(RecipeMeta, ...),
        models=(dict[str, ModelSpec], {}),
        datasets=(dict[str, DatasetSpec], {}),
        constitutions=(dict[str, ConstitutionSpec], {}),
        stages=(dict[str, stage], {}),  # type: ignore[valid-type]
        loops=(dict[str, LoopSpec], {}),
    )
    schema = TypeAdapter(model).json_schema()
    mapping = schema["properties"]["stages"]["additionalProperties"]["discriminator"]["mapping"]
    defs = schema["$defs"]
    for name in [n for n in defs]:  # partial twins: the same keys and types, nothing required
        partial = copy.deepcopy(defs[name])
        partial.pop("required", None)
        defs[f"{name}__partial"] = partial
    kinds = sorted(mapping)

    def stages(partial: bool) -> dict:
        suffix = "__partial" if partial else ""
        one = {
            "type": "object",
            "properties": {"kind": {"enum": kinds, "description": "The stage kind."}},
            "allOf": [
                {"if": {"properties": {"kind": {"const": k}}, "required": ["kind"]}, "then": {"$ref": ref + suffix}}
                for k, ref in mapping.items()
            ],
        }
        if not partial:
            one["required"] = ["kind"]
        return {"type": "object", "additionalProperties": one}

    schema["properties"]["stages"] = {"type": "object"}
    schema["properties"]["recipe"] = {"type": "object"}
    schema["if"] = {"properties": {"recipe": {"required": ["extends"]}}, "required": ["recipe"]}
    schema["then"] = {"properties": {"recipe": {"$ref": "#/$defs/RecipeMeta__partial"}, "stages": stages(True)}}
    schema["else"] = {"properties": {"recipe": {"$ref": "#/$defs/RecipeMeta"}, "stages": stages(False)}}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "recipe"
    return schema
