"""The base a stage-made LoRA adapter was trained on, read from the `base.json` written next to it
(engine.models.pool.describe_model): a [models] spec, or the fingerprint of the stage whose model
folder in the store is the base. Paths are never recorded, so a runs dir can move. The hf loader
and the vllm backend both read it here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.spec.recipe import ModelSpec


@dataclass(frozen=True)
class AdapterBase:
    name: str  # the base's name in the recipe that trained the adapter
    spec: ModelSpec | None  # a [models] table, or None when a stage made the base
    folder: Path | None  # that stage's model folder in the store


def adapter_base(adapter_dir: Path, cache_root: Path | None) -> AdapterBase:
    """The recorded base of the adapter in `adapter_dir`; RuntimeError when it is not recorded."""
    base_file = Path(adapter_dir) / "base.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else {}
    if "spec" in base:
        return AdapterBase(base["name"], ModelSpec.model_validate(base["spec"], strict=False), None)
    if "stage" in base:
        return AdapterBase(base["name"], None, Path(cache_root or ".") / base["stage"] / "model")
    raise RuntimeError(
        f"{adapter_dir} is a LoRA adapter without a recorded base (base.json); rebuild the stage that made it "
        "(recipe run --force STAGE)."
    )
