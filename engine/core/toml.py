"""TOML in and out: `tomllib` (tomli before Python 3.11) for reading, and `dump_toml`, a small
writer for the resolved recipes that `recipe plan --resolved` prints and run records keep."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["dump_toml", "tomllib"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string, once DEL (which JSON leaves raw) is escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dump_toml(data: dict, _prefix: tuple[str, ...] = ()) -> str:
    """A minimal TOML writer for resolved recipes: tables, scalars, arrays, inline tables."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    head = []
    if _prefix and (scalars or not tables):
        head.append("[" + ".".join(_toml_key(p) for p in _prefix) + "]")
    head += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars]
    chunks = ["\n".join(head)] + [dump_toml(v, (*_prefix, k)) for k, v in tables]
    text = "\n\n".join(c for c in chunks if c)
    return text + "\n" if not _prefix else text
