"""Parquet row artifacts round-trip exactly, and plain `datasets` can read them."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.data.rows import read_rows, write_rows

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=30)}
)
row = st.fixed_dictionaries(
    {
        "id": st.text(max_size=8),
        "messages": st.lists(message, min_size=1, max_size=4),
        "meta": st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(row, min_size=1, max_size=6))
def test_round_trip(tmp_path, rows):
    path = tmp_path / "rows.parquet"
    assert write_rows(path, rows) == len(rows)
    assert read_rows(path) == rows
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_mixed_type_column_survives_as_json(tmp_path):
    rows = [{"x": 1}, {"x": "one"}, {"x": {"a": 1}}]
    write_rows(tmp_path / "r.parquet", rows)
    assert read_rows(tmp_path / "r.parquet") == rows


def test_plain_datasets_reads_rows(tmp_path):
    import datasets

    rows = [{"id": "a", "messages": [{"role": "user", "content": "hi"}], "meta": {"k": [1, 2]}}]
    write_rows(tmp_path / "rows.parquet", rows)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "rows.parquet"), split="train")
    assert ds[0]["messages"] == rows[0]["messages"] and json.loads(ds[0]["meta"]) == {"k": [1, 2]}
