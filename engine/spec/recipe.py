"""The recipe as data: the tables of a recipe file ([recipe], [models.*], [datasets.*],
[constitutions.*]) as pydantic models, and `Recipe`, the loaded and validated whole that every
later layer reads. Loading lives in engine.load.loader; stages in engine.spec.stage.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from engine.spec.backends import BACKENDS
from engine.spec.config import Table
from engine.spec.rounds import LoopSpec, Rounds

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass
from engine.spec.locations import _ROUND_STAGE_KEY, locate
from engine.spec.stage import Stage

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class RecipeMeta(Table):
    name: str = Field(pattern=NAME_PATTERN, description="Names the run folder: runs/<name>/.")
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seeds every stage; part of every fingerprint (0 to 2^32 - 1, what torch and numpy accept).",
    )
    description: str = ""
    extends: str | list[str] | None = Field(
        None, description="Base recipe(s), relative to this file; tables merge, later keys win."
    )
    unset: list[str] = Field(
        default_factory=list,
        description='Dotted keys removed from the base recipe(s) before this file merges: ["stages.judge.function"].',
    )


class ModelSpec(Table):
    path: str = Field(description="A hub id, a local directory, builtin:smollm2-135m or builtin:tiny-chat.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = Field(
        "auto",
        description="auto = every visible GPU (generation runs a replica on each; training "
        'uses the first), else cpu. Or one device, or a list: "cuda:0,cuda:1".',
    )
    adapter: str | None = Field(None, description="A PEFT adapter dir or a stage giving one.")
    chat_template: str | None = Field(None, description="Inline Jinja or a template file.")
    trust_remote_code: bool = False
    backend: Literal[tuple(BACKENDS)] = Field(  # type: ignore[valid-type]
        "hf", description="; ".join(f"{name} = {b.description}" for name, b in BACKENDS.items()) + "."
    )
    kv_cache: Literal["auto", "static", "dynamic"] = Field(
        "auto",
        description="hf backend: static = fixed-size KV cache with the decode step compiled (CUDA "
        "graphs); dynamic = grows per step. auto = static on CUDA, dynamic on the CPU. "
        "Execution-only (same text).",
    )
    base_url: str | None = Field(None, description="openai backend: the server, e.g. http://127.0.0.1:8000/v1.")
    model_name: str | None = Field(None, description="openai backend: the model name the server knows (default: path).")
    api_key_env: str | None = Field(None, description="openai backend: the environment variable holding the key.")
    max_concurrency: int = Field(4, ge=1, description="openai backend: requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="openai backend: per-request timeout.")


class DatasetSpec(Table):
    path: str = Field(description="A jsonl/json/parquet/csv file, a local HF dataset dir, or a hub id.")
    type: Literal["conversations", "prompts", "preferences"] = Field(
        "conversations", description="What the rows are; checked against the stages that read them."
    )
    format: Literal["jsonl", "json", "parquet", "csv"] | None = Field(None, description="Overrides the file extension.")
    split: str = "train"
    columns: dict[str, str] = Field(
        default_factory=dict, description='Target -> source column, e.g. { messages = "conv" }.'
    )
    limit: int | None = Field(None, ge=1, description="Keep the first N rows (after shuffling).")
    shuffle_seed: int | None = Field(None, description="Shuffle rows with this seed before limit.")
    revision: str | None = Field(None, description="Hub revision for hub ids.")
    max_dropped: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="The share of rows that may be unusable (dropped with a reason); more fails validate and run.",
    )


class TrackingSpec(Table):
    """Experiment tracking: training curves stream to each named tracker, and once per run the recipe,
    its stages' fingerprints and the eval metrics. Execution-only: outside every fingerprint."""

    report_to: list[Literal["tensorboard", "trackio", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Trackers: tensorboard, trackio, wandb, mlflow (each needs its package)."
    )
    project: str | None = Field(
        None, description="The project (trackio, wandb) or experiment (mlflow); default: the recipe name."
    )
    dir: str | None = Field(
        None, description="TensorBoard's log folder, relative to the recipe file; default: runs/<recipe>/tracking."
    )


class ConstitutionSpec(Table):
    path: str = Field(description="A constitution TOML file.")


SECTIONS: dict[str, type[Table] | None] = {
    "recipe": RecipeMeta,
    "models": ModelSpec,
    "datasets": DatasetSpec,
    "constitutions": ConstitutionSpec,
    "stages": None,  # validated per kind
    "loops": None,  # LoopSpec, checked against the stages
    "tracking": TrackingSpec,
}
EXTRA_SECTIONS: dict[str, type[Table]] = {"loops": LoopSpec}  # more [name.NAME] tables, for the reference


@dataclass
class Recipe:
    """A loaded, validated recipe. `raw` is the merged, resolved dict (what `plan` shows)."""

    path: Path
    meta: RecipeMeta
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    constitutions: dict[str, ConstitutionSpec]
    stages: dict[str, Stage]
    raw: dict[str, Any]
    locations: dict[str, tuple[str, int]] = field(default_factory=dict)
    loops: dict[str, LoopSpec] = field(default_factory=dict)
    previews: dict[str, list[dict] | None] = field(default_factory=dict, repr=False)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def dataset_rows(self, name: str) -> list[dict] | None:
        """The rows of dataset `name` as validate loaded them (small local files), else None."""
        return self.previews.get(name)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def dir(self) -> Path:
        return self.path.parent

    def where(self, key: str) -> dict[str, Any]:
        """file/line/key keywords for a Problem about `key` (nearest located parent key). A key of
        an unrolled stage (`stages.dpo@2.beta`) is located at the user's key, round named:
        `stages.dpo.beta (round 2)`."""
        m = _ROUND_STAGE_KEY.match(key)  # user names never hold '@' (load_recipe rejects them)
        if m:
            user_key = f"stages.{m.group(1)}{m.group(3)}"
            return {**locate(self.locations, user_key, self.path), "key": f"{user_key} (round {m.group(2)})"}
        return locate(self.locations, key, self.path)

    def stage_names(self, names: list[str] | tuple[str, ...]) -> list[str]:
        """Stage names as a user gives them (`--only`, `--force`) -> names in `stages`: a loop
        stage's own name means its last round, `name@*` every round, `name@2` one round. Unknown
        names are kept, for the caller to report."""
        return Rounds(self.loops).names(list(names), list(self.stages))


# --------------------------------------------------------------------------- locating keys


# --------------------------------------------------------------------------- reading files


# --------------------------------------------------------------------------- paths


# --------------------------------------------------------------------------- validation


# --------------------------------------------------------------------------- writing TOML
