"""What a stage receives for each reference: rows (a dataset, a row stage's entry) or a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.rows import count_rows, read_rows
from engine.spec.recipe import Recipe


@dataclass
class Artifact:
    """What a stage receives for a reference: rows (datasets, row stages), or a model."""

    name: str
    type: str
    source: str  # stages | datasets | models
    path: Path | None = None  # cache entry dir for stages
    spec: Any = None  # DatasetSpec / ModelSpec
    recipe: Recipe | None = field(default=None, repr=False)
    _rows: list[dict] | None = field(default=None, repr=False)
    load_report: dict | None = None

    def rows(self) -> list[dict]:
        if self._rows is None:
            if self.source == "stages":
                self._rows = read_rows(self.path / "rows.parquet")  # type: ignore[operator]
            elif self.source == "datasets":
                self._rows = self._load_dataset()
            else:
                raise TypeError(f"'{self.name}' is a model, not rows")
        return self._rows

    def _load_dataset(self) -> list[dict]:
        from engine.data.datasets import load_rows

        spec = self.spec
        where = self.recipe.where(f"datasets.{self.name}.path") if self.recipe else {}
        result = load_rows(
            spec.path,
            name=self.name,
            type=spec.type,
            format=spec.format,
            split=spec.split,
            columns=spec.columns,
            limit=spec.limit,
            shuffle_seed=spec.shuffle_seed,
            revision=spec.revision,
            key=where.get("key"),
            file=where.get("file"),
        )
        problem = result.too_many_dropped(self.name, spec.max_dropped, spec.columns)
        if problem:
            from engine.core.errors import DataError
            from engine.data.datasets import DROPPED_HINT

            raise DataError.single(problem, hint=DROPPED_HINT, **where)
        self.load_report = {
            "total": result.total,
            "kept": len(result.rows),
            "dropped": result.dropped,
            "examples": result.examples,
        }
        return result.rows

    def __len__(self) -> int:
        if self._rows is None and self.source == "stages" and (self.path / "rows.parquet").exists():  # type: ignore[operator]
            return count_rows(self.path / "rows.parquet")  # type: ignore[operator]
        return len(self.rows())
