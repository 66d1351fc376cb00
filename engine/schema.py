"""JSON Schema of the recipe format, built from the same pydantic models that validate it."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, TypeAdapter, create_model

from . import registry
from .config import Table
from .recipe import ConstitutionSpec, DatasetSpec, ModelSpec, RecipeMeta
from .rounds import LoopSpec


def recipe_schema() -> dict:
    configs = tuple(registry.load(kind).Config for kind in sorted(registry.kinds()))
    stage = configs[0] if len(configs) == 1 else Annotated[Union[configs], Field(discriminator="kind")]
    model = create_model(
        "Recipe",
        __base__=Table,
        recipe=(RecipeMeta, ...),
        models=(dict[str, ModelSpec], {}),
        datasets=(dict[str, DatasetSpec], {}),
        constitutions=(dict[str, ConstitutionSpec], {}),
        stages=(dict[str, stage], {}),
        loops=(dict[str, LoopSpec], {}),
    )
    schema = TypeAdapter(model).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "recipe"
    return schema
