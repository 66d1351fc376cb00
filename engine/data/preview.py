"""Validate-time looks at datasets: small local files are loaded in full (so `validate` finds
empty files, bad JSON with its line, unusable rows); bigger ones are only opened."""

from __future__ import annotations

from pathlib import Path

from engine.core.errors import DataError, first_line
from engine.data.datasets import DROPPED_HINT, load_rows
from engine.data.files import not_a_dataset

PREVIEW_MAX_BYTES = 20 << 20  # files up to this size are loaded in full at validate; bigger ones only opened


def preview(spec, name: str, where: dict) -> tuple[list[dict] | None, str | None, str]:
    """(rows, problem, the key it is located at) of a local dataset file, as `recipe validate` sees
    it: a file that cannot be read, that holds no rows, or that the loader rejects is a problem (run
    would fail on it later), located at `path`, or at `columns` when the recipe maps columns;
    rows are returned when the file was small enough to load in full (else None). Directories and hub
    ids are left to the run."""
    path = Path(spec.path).expanduser()
    if path.is_absolute() and (why := not_a_dataset(path)) is not None:
        return None, f"dataset '{name}': {why}.", "path"
    if not path.is_absolute() or not path.is_file():
        return None, None, "path"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
        size = path.stat().st_size
    except OSError as e:
        return None, f"dataset '{name}': cannot read {path}: {first_line(e)}. Check the file's permissions.", "path"
    if not head.strip():
        return (
            None,
            (f"dataset '{name}': {path} is empty: it has no rows. Put rows in it, or point path at another file."),
            "path",
        )
    if size > PREVIEW_MAX_BYTES:
        return None, None, "path"
    try:
        result = load_rows(
            str(path),
            name=name,
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
    except DataError as e:
        return None, e.problems[0].message + (f" {e.problems[0].hint}" if e.problems[0].hint else ""), "path"
    if not result.rows and spec.max_dropped >= 1.0:
        dropped = ", ".join(f"{r} ({n})" for r, n in result.dropped.items()) or "no rows"
        return (
            [],
            (
                f"dataset '{name}': no usable row in {path} ({result.total} read; dropped: {dropped}). "
                "Fix the rows, or point path at another file."
            ),
            "path",
        )
    problem = result.too_many_dropped(name, spec.max_dropped, spec.columns)
    if problem:
        return None, f"{problem} {DROPPED_HINT}", "columns" if spec.columns else "path"
    return result.rows, None, "path"
