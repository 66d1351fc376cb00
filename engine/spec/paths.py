"""File paths in recipes: a local path is relative to the recipe file that set it (or the top
recipe for `--set`), a hub id or `builtin:` name passes through, and a path no file system can
hold (a NUL byte, over PATH_MAX) is a located error, not an OSError later.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.core.errors import RecipeError
from engine.spec.locations import SET_SOURCE, locate


def is_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", value)) and not re.search(
        r"\.(jsonl|json|parquet|csv|toml|j2|jinja|txt)$", value
    )


MAX_PATH = 4096  # bytes in a path (Linux PATH_MAX)


MAX_NAME = 255  # bytes in one path component (NAME_MAX)


def path_problem(value: str) -> str | None:
    """What makes `value` unusable as a file path on this system, or None."""
    if "\x00" in value:
        return "holds a NUL byte, which no file name can contain"
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH:
        return f"is {len(value):,} characters long; paths have at most {MAX_PATH} bytes"
    long = next((part for part in value.split("/") if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME), None)
    if long is not None:
        return f"has a component of {len(long)} characters ('{long[:20]}...'); names have at most {MAX_NAME} bytes"
    return None


def resolve_path(value: str, key: str, locations: dict, top: Path) -> str:
    """Absolute path for a local file value, relative to the file that set it. Hub ids and
    builtin names are returned unchanged. An impossible path (NUL, too long) is a RecipeError."""
    if (why := path_problem(value)) is not None:
        raise RecipeError.single(
            f"the path {value[:60]!r}{'...' if len(value) > 60 else ''} {why}.",
            hint="Give the path of an existing file, relative to the recipe file.",
            **locate(locations, key, top),
        )
    if value.startswith("builtin:") or Path(value).is_absolute():
        return value
    source = locations.get(key, (str(top), 0))[0]
    base = top.parent if source == SET_SOURCE else Path(source).resolve().parent
    candidate = (base / value).resolve()
    if candidate.exists() or not is_hub_id(value) or value.startswith("."):
        return str(candidate)
    return value
