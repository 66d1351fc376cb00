"""The Context a stage's `run` gets besides its config and inputs: its model loading and
backends (engine.models.pool), prompt templates, shards and progress, random streams by row id,
and where it writes its artifact. Stages never touch the cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.io import atomic_write_json
from engine.core.seeds import Seeds
from engine.data.rows import write_rows
from engine.models import pool as loading
from engine.spec.artifact import Artifact
from engine.spec.recipe import Recipe
from engine.store.shards import ShardRunner


class _Task:
    def __init__(self, progress, task_id) -> None:
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task_id, n)


@dataclass
class Context:
    """What a stage's `run` gets besides its config and inputs. Stages never touch the cache."""

    stage: str
    fingerprint: str
    seed: int
    out_dir: Path
    partial_dir: Path
    log: logging.Logger
    recipe: Recipe
    console: Any = None
    _progress: Any = None
    cache_root: Path | None = None
    pool: loading.ModelPool | None = None  # generation models kept between the stages of a run
    lazy_models: bool = False  # backends load on first use (a Ray driver assembling committed shards)
    definition: str = ""  # the stage's own definition (engine.store.fingerprint.definition): streams, row memos
    components: dict = field(default_factory=dict, repr=False)  # what its key was computed from
    rows_out: int | None = None
    warnings: list[str] = field(default_factory=list)  # this stage's warnings, for the record and the report
    shards: ShardRunner = field(init=False)
    _seeds: Seeds = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from engine.store.memo import ROOT

        self._seeds = Seeds(self.seed, self.definition or self.fingerprint)
        self.shards = ShardRunner(
            self.partial_dir,
            self.fingerprint,
            self.seed,
            self.progress,
            self.log,
            seeds=self._seeds,
            memo_root=self.cache_root / ROOT if self.cache_root is not None else None,
            definition=self.definition,
        )
        self.shards.announce = self.say

    def say(self, message: str) -> None:
        """A line for the user (the console, above the progress bars) and the stage log."""
        self.log.info(message)
        if self.console is not None:
            self.console.print(f"{self.stage}: {message}", markup=False)

    @property
    def seeds(self) -> Seeds:
        """This stage's random streams, by row id and content (engine.core.seeds): never by shard or batch."""
        return self._seeds

    def input_id(self, field: str, index: int = 0) -> str | None:
        """The identity its key holds for the `index`-th input of a reference field (a model's, a
        stage output's content): what a row that uses that input depends on."""
        items = self.components.get("inputs", {}).get(field, [])
        return items[index]["id"] if index < len(items) else None

    def progress(self, total: int | None, desc: str = "rows", unit: str = "rows") -> _Task:
        """A progress bar labelled `stage: desc` (keep `desc` short: the bar must fit 80 columns)."""
        if self._progress is None:
            return _Task(None, None)
        return _Task(self._progress, self._progress.add_task(f"{self.stage}: {desc}", total=total, unit=unit))

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log.warning(message)
        if self.console is not None:
            self.console.print(f"[yellow]warning[/]: {self.stage}: {message}")

    def templates(self):
        """Templates for this recipe: its own templates/ folder shadows the built-ins."""
        from engine.lib.prompts import Templates

        return Templates.for_recipe(self.recipe)

    @property
    def is_main(self) -> bool:
        """False in the non-zero ranks of a multi-process stage: only the main process writes files."""
        return int(os.environ.get("RANK", "0")) == 0

    def describe_model(self, model: Artifact) -> dict:
        """How to load `model` again later (engine.models.pool.describe_model)."""
        return loading.describe_model(model)

    def load_model(
        self, model: Artifact, *, merge_adapter: bool = False, full_precision: bool = False, quantize: bool = False
    ):
        """(model, tokenizer) for a model reference (engine.models.pool.load_model)."""
        self._announce_build(model)
        return loading.load_model(
            model,
            self.recipe,
            self.cache_root,
            self.log,
            merge_adapter=merge_adapter,
            full_precision=full_precision,
            quantize=quantize,
        )

    def backend(self, model: Artifact, batch_size: int = 64):
        """A generation backend for a model reference; call `.close()` when done (engine.models.pool.backend)."""

        def load():
            self._announce_build(model)
            return loading.backend(
                model,
                self.recipe,
                self.cache_root,
                self.log,
                self.partial_dir,
                batch_size,
                pool=self.pool,
                resources=self.recipe.stages[self.stage].config.resources if self.stage in self.recipe.stages else None,
            )

        return loading.LazyBackend(load) if self.lazy_models else load()

    def _announce_build(self, model: Artifact) -> None:
        """A word before a builtin is built on first use (SmolLM2: about 30 s with a silent bar)."""
        spec = model.spec
        if spec is not None and spec.path.startswith("builtin:") and self.cache_root is not None:
            from engine.models.builtins import is_built

            if not is_built(spec.path, self.cache_root):
                self.say(f"building {spec.path} (first use only: about 30 s for builtin:smollm2-135m)")

    def save_rows(self, rows: list[dict], name: str = "rows.parquet") -> int:
        n = write_rows(self.out_dir / name, rows)
        if name == "rows.parquet":
            self.rows_out = n
        return n

    def save_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.out_dir / name, obj)
