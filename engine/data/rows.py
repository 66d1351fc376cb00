"""Row artifacts on disk: Parquet files that plain `datasets.load_dataset("parquet", ...)` reads.

Rows are lists of plain dicts in memory. Columns whose values do not share one Arrow type
(`meta` above all: its keys differ from row to row) are stored as JSON strings and listed in
the file's schema metadata under `recipe.json_columns`, so `read_rows` gives back the dicts.
pyarrow is imported inside the functions (it is not heavy, but nothing at module level is).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.core.io import atomic_path

JSON_COLUMNS_KEY = b"recipe.json_columns"
ALWAYS_JSON = {"meta"}  # free-form by contract: keys vary per row


def _columns(rows: list[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        for key in row:
            cols.setdefault(key, None)
    return list(cols)


def rows_to_table(rows: list[dict]):
    import pyarrow as pa

    names = _columns(rows)
    arrays, json_cols = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        array = None if name in ALWAYS_JSON else _typed_array(values)
        if array is None:
            json_cols.append(name)
            array = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values],
                type=pa.string(),
            )
        arrays.append(array)
    metadata = {JSON_COLUMNS_KEY: json.dumps(json_cols).encode()}
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(names, arrays)], metadata=metadata)
    return pa.Table.from_arrays(arrays, schema=schema)


def _typed_array(values: list):
    """An Arrow array of one native type, or None when the column should be JSON: mixed
    types, or a bare struct (its rows' keys may differ, and Arrow would fill the gaps with
    None). Lists of structs, such as messages, stay native."""
    import pyarrow as pa

    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return None
    return None if pa.types.is_struct(array.type) else array


def write_rows(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows to a Parquet file atomically (temp file, then os.replace). Returns the row count."""
    import pyarrow.parquet as pq

    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(rows_to_table(rows), tmp)
    return len(rows)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a Parquet file written by `write_rows` (or any Parquet file) into a list of dicts."""
    import pyarrow.parquet as pq

    # one file: ParquetFile reads it without pyarrow.dataset (and pandas), 0.4 s of imports
    table = pq.read_table(path) if Path(path).is_dir() else pq.ParquetFile(path).read()
    meta = table.schema.metadata or {}
    json_cols = set(json.loads(meta.get(JSON_COLUMNS_KEY, b"[]")))
    rows = table.to_pylist()
    if json_cols:
        for row in rows:
            for col in json_cols:
                if row.get(col) is not None:
                    row[col] = json.loads(row[col])
    return rows


def count_rows(path: str | os.PathLike) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
