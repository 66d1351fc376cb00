"""Building blocks for stage Configs: the base class and the field markers the engine reads.

A stage's Config is a pydantic model with `extra="forbid"` and strict types (a TOML string is
never silently turned into a number). Fields carry markers in `json_schema_extra`:

- `Ref(...)`: the value names a dataset, model or stage; it builds the DAG and is type-checked
  against the artifact types listed. In the fingerprint it is replaced by the identity of what
  it names, so renaming a stage does not invalidate its consumers.
- `ExecOnly(...)`: cannot change results (batch size, logging, progress); left out of the
  fingerprint.
- `PathField(...)`: a file path, resolved against the directory of the recipe file that set it;
  the file's content enters the fingerprint, never the path.
- `Knob(...)`: a field added after cache entries exist: in the fingerprint only when set to
  something other than its default, so that adding it re-runs nothing (`defining()`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

REF = "x-ref"
EXEC_ONLY = "x-exec-only"
PATH = "x-path"
OMIT_DEFAULT = "x-omit-default"

ARTIFACT_TYPES = ("conversations", "prompts", "samples", "preferences", "model", "report", "constitution")


class Table(BaseModel):
    """Base for every table of the recipe format: unknown keys are errors, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class Resources(Table):
    """`[stages.X.resources]`: how many processes run the stage (training stages), how many GPUs
    one replica of a generation model spans (vllm), and the workers of a stage on Ray. All of it is
    execution-only: never in a fingerprint."""

    processes: int = Field(
        1, ge=1, le=256, description="Processes under `accelerate launch` (1 = in process); with `nodes`, per node."
    )
    nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Training stages on Ray: machines the stage trains on, "
        "`processes` each (accelerate's multi-node launch, one Ray task per node).",
    )
    accelerate_config: str | None = Field(
        None, description="An accelerate config file (FSDP, DeepSpeed), relative to the recipe file."
    )
    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs per model replica: the vllm backend's tensor parallelism; "
        "on Ray, GPUs per worker (when the cluster has GPUs).",
    )
    cpus: float | None = Field(
        None,
        gt=0,
        le=1024,
        description="On Ray: CPUs per worker (default: 1 on a cluster "
        "with GPUs; else the torch threads a worker computes with, capped at the largest node).",
    )
    replicas: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="On Ray: workers of a row stage (default: as many as the cluster's GPUs, else CPUs, fit).",
    )


class StageConfig(Table):
    """Base for stage Configs. `kind` selects the stage module; each Config narrows it."""

    kind: str
    resources: Resources = Field(
        default_factory=Resources,
        description="How the stage runs: processes and nodes (training), GPUs per replica, Ray workers. "
        "Execution-only: never in a fingerprint.",
        json_schema_extra={EXEC_ONLY: True},
    )


def Ref(*types: str, default: Any = ..., description: str = "", **kw: Any) -> Any:
    """A reference to a dataset, model or stage whose artifact is one of `types`."""
    unknown = set(types) - set(ARTIFACT_TYPES)
    assert not unknown, f"unknown artifact types {unknown}"
    return Field(default, description=description, json_schema_extra={REF: list(types)}, **kw)


def ExecOnly(default: Any = ..., description: str = "", **kw: Any) -> Any:
    """A field that cannot change a stage's output; excluded from the fingerprint."""
    return Field(default, description=description, json_schema_extra={EXEC_ONLY: True}, **kw)


def PathField(default: Any = ..., description: str = "", **kw: Any) -> Any:
    """A path to a file; resolved against the recipe's directory, hashed by content."""
    return Field(default, description=description, json_schema_extra={PATH: True}, **kw)


def Knob(default: Any = None, description: str = "", **kw: Any) -> Any:
    """A field that enters the fingerprint only when it differs from its default."""
    if "default_factory" in kw:
        return Field(description=description, json_schema_extra={OMIT_DEFAULT: True}, **kw)
    return Field(default, description=description, json_schema_extra={OMIT_DEFAULT: True}, **kw)


def defining(model: BaseModel) -> dict:
    """`model.model_dump(mode="json")` without the Knob fields that hold their default, in nested
    tables (and lists of them) too: what a fingerprint sees of a config."""
    cls, out = type(model), model.model_dump(mode="json")
    for name, info in cls.model_fields.items():
        value = getattr(model, name)
        if marker(cls, name, OMIT_DEFAULT) and value == info.get_default(call_default_factory=True):
            del out[name]
        elif isinstance(value, BaseModel):
            out[name] = defining(value)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            out[name] = [defining(v) for v in value]
    return out


def marker(model: type[BaseModel], field: str, name: str) -> Any:
    extra = model.model_fields[field].json_schema_extra
    return extra.get(name) if isinstance(extra, dict) else None


def ref_fields(model: type[BaseModel]) -> dict[str, list[str]]:
    """Field name -> accepted artifact types, for every reference field of a Config."""
    return {f: marker(model, f, REF) for f in model.model_fields if marker(model, f, REF)}
