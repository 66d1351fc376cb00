"""engine.data.datasets: loading every format into normalized rows, drop reasons, and user errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # until the project has a conftest/pyproject that sets the path
    sys.path.insert(0, str(ROOT))

from engine.core.errors import DataError, RecipeError  # noqa: E402
from engine.data.datasets import LoadResult, load_rows  # noqa: E402
from engine.data.formats import check_messages, normalize_messages  # noqa: E402


def chat(user="hi", assistant="hello"):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


ROWS = [
    {"messages": chat("q0", "a0"), "source": "s0"},
    {"messages": chat("q1", "a1"), "source": "s1"},
    {"messages": chat("q2", "a2"), "source": "s2"},
]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_csv(path: Path, rows) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return str(path)


def expected_rows(name="seed"):
    return [
        {"id": f"{name}:{i}", "messages": r["messages"], "meta": {"source": r["source"]}} for i, r in enumerate(ROWS)
    ]


# ---------------------------------------------------------------- formats


def test_jsonl(tmp_path):
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), name="seed")
    assert isinstance(res, LoadResult)
    assert res.rows == expected_rows() and res.total == 3 and res.dropped == {} and res.examples == {}


def test_jsonl_blank_lines_and_unicode_line_separator(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"messages": chat("a\u2028b", "c")}]
    p.write_text("\n" + json.dumps(rows[0], ensure_ascii=False) + "\n\n")
    res = load_rows(str(p), name="x")
    assert res.rows[0]["messages"][0]["content"] == "a\u2028b"


@pytest.mark.parametrize("wrap", [lambda r: r, lambda r: {"data": r}, lambda r: {"rows": r}, lambda r: {"train": r}])
def test_json(tmp_path, wrap):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(wrap(ROWS)))
    assert load_rows(str(p), name="seed").rows == expected_rows()


def test_json_not_a_list(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"foo": 1}))
    with pytest.raises(DataError, match="list of objects"):
        load_rows(str(p), name="seed")


def test_parquet(tmp_path):
    assert load_rows(write_parquet(tmp_path / "d.parquet", ROWS), name="seed").rows == expected_rows()


def test_parquet_written_by_engine_rows(tmp_path):
    from engine.data.rows import write_rows

    rows = [{"id": "a", "messages": chat(), "meta": {"k": 1}}, {"id": "b", "messages": chat(), "meta": {"j": [2]}}]
    write_rows(tmp_path / "d.parquet", rows)
    assert load_rows(str(tmp_path / "d.parquet"), name="seed").rows == rows


def test_csv_decodes_messages(tmp_path):
    res = load_rows(write_csv(tmp_path / "d.csv", ROWS), name="seed")
    assert res.rows == expected_rows()


def test_csv_multiline_cell_and_prompt_that_looks_like_json(tmp_path):
    rows = [{"prompt": "line one\nline two"}, {"prompt": "[1, 2] sort these"}, {"prompt": "[1, 2]"}]
    res = load_rows(write_csv(tmp_path / "p.csv", rows), name="p", type="prompts")
    assert [r["prompt"] for r in res.rows] == ["line one\nline two", "[1, 2] sort these", "[1, 2]"]


def test_format_overrides_extension(tmp_path):
    p = tmp_path / "data.txt"
    write_jsonl(p, ROWS)
    assert load_rows(str(p), name="seed", format="jsonl").rows == expected_rows()
    with pytest.raises(DataError, match="unknown data format 'txt'"):
        load_rows(str(p), name="seed")


def test_save_to_disk_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(str(tmp_path / "ds"), name="seed").rows == expected_rows()


def test_save_to_disk_dataset_dict_picks_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_rows(str(tmp_path / "dd"), name="s", split="test").rows) == 1
    assert len(load_rows(str(tmp_path / "dd"), name="s").rows) == 3
    with pytest.raises(DataError, match="no split 'validation'.*train"):
        load_rows(str(tmp_path / "dd"), name="s", split="validation")


def test_dir_of_data_files(tmp_path):
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "train.jsonl", ROWS)
    res = load_rows(str(tmp_path / "dir"), name="seed")
    assert [r["messages"] for r in res.rows] == [r["messages"] for r in ROWS]


def test_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory with no data file"):
        load_rows(str(tmp_path / "empty"), name="seed")


# ---------------------------------------------------------------- ids, meta, mapping


def test_id_column_and_meta_merge(tmp_path):
    rows = [{"id": 7, "messages": chat(), "meta": {"a": 1}, "lang": "en"}, {"id": "", "messages": chat(), "meta": None}]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="n")
    assert res.rows[0] == {"id": "7", "messages": chat(), "meta": {"a": 1, "lang": "en"}}
    assert res.rows[1] == {"id": "n:1", "messages": chat(), "meta": {}}


def test_column_mapping(tmp_path):
    rows = [{"uid": "u1", "conversation": chat("  Hi  ", "yo "), "extra": 1}]
    res = load_rows(
        write_jsonl(tmp_path / "d.jsonl", rows), name="n", columns={"messages": "conversation", "id": "uid"}
    )
    assert res.rows == [{"id": "u1", "messages": chat("Hi", "yo"), "meta": {"extra": 1}}]


def test_column_mapping_prompts(tmp_path):
    rows = [{"question": " What? ", "answer": "x"}]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="n", type="prompts", columns={"prompt": "question"})
    assert res.rows == [{"id": "n:0", "prompt": "What?", "meta": {"answer": "x"}}]


def test_mapped_column_missing_lists_available(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError) as ei:
        load_rows(
            path, name="seed", columns={"messages": "conversation"}, key="datasets.seed.columns", file="recipe.toml"
        )
    text = str(ei.value)
    assert "'conversation'" in text and "messages, source" in text
    assert "recipe.toml" in text and "datasets.seed.columns" in text


def test_missing_required_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi", "label": 1}])
    with pytest.raises(DataError) as ei:
        load_rows(path, name="seed", key="datasets.seed.path", file="recipe.toml")
    text = str(ei.value)
    assert "'messages'" in text and "text, label" in text and 'columns = { messages = "..." }' in text
    assert isinstance(ei.value, RecipeError)
    with pytest.raises(DataError, match="'chosen'"):
        load_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "rejected": "r"}]), name="p", type="preferences")


def test_unknown_type(tmp_path):
    with pytest.raises(DataError, match="unknown dataset type"):
        load_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), name="seed", type="nope")


def test_sharegpt(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "be nice"},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
            ],
            "src": "x",
        },
        {"conversations": [{"from": "robot", "value": "beep"}]},
    ]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="sg")
    assert res.rows == [
        {"id": "sg:0", "messages": [{"role": "system", "content": "be nice"}] + chat(), "meta": {"src": "x"}}
    ]
    assert res.dropped == {"unknown role 'robot'": 1}


def test_sharegpt_not_used_with_mapping(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}], "msgs": chat()}]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="sg", columns={"messages": "msgs"})
    assert res.rows[0]["messages"] == chat() and "conversations" in res.rows[0]["meta"]


# ---------------------------------------------------------------- shuffle and limit


def test_shuffle_and_limit_deterministic(tmp_path):
    rows = [{"messages": chat(f"q{i}", f"a{i}")} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_rows(path, name="n", shuffle_seed=3, limit=10)
    b = load_rows(path, name="n", shuffle_seed=3, limit=10)
    c = load_rows(path, name="n", shuffle_seed=4, limit=10)
    assert a.rows == b.rows and a.total == 10 and len(a.rows) == 10
    assert [r["id"] for r in a.rows] != [r["id"] for r in c.rows]
    # ids keep the original file index, and content matches it
    for r in a.rows:
        i = int(r["id"].split(":")[1])
        assert r["messages"][0]["content"] == f"q{i}"
    assert [r["id"] for r in load_rows(path, name="n", limit=3).rows] == ["n:0", "n:1", "n:2"]
    assert load_rows(path, name="n", shuffle_seed=0).total == 50


def test_limit_applies_before_dropping(tmp_path):
    rows = [{"messages": "bad"}, {"messages": chat()}, {"messages": chat()}]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="n", limit=2)
    assert res.total == 2 and len(res.rows) == 1 and res.dropped == {"not a list of messages": 1}


# ---------------------------------------------------------------- drop reasons


def test_every_conversation_drop_reason_counted(tmp_path):
    u, a, s = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))
    bad = {
        "not a list of messages": ["hello", [], [3, u], [{"content": "x"}], [{"role": "user", "content": ["x"]}, a]],
        "unknown role 'tool'": [[u, {"role": "tool", "content": "x"}]],
        "empty content": [[u, {"role": "assistant", "content": "   "}], [u, {"role": "assistant", "content": None}]],
        "system message not first": [[u, s, a]],
        "does not start with a user turn": [[a, u], [s], [s, a]],
        "roles do not alternate": [[u, u, a], [u, a, a]],
        "no assistant turn": [[u], [s, u]],
    }
    rows = [{"messages": chat()}]
    rows += [{"id": f"{reason}#{i}", "messages": m} for reason, ms in bad.items() for i, m in enumerate(ms)]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="n")
    assert res.dropped == {reason: len(ms) for reason, ms in bad.items()}
    assert res.examples == {reason: [f"{reason}#{i}" for i in range(len(ms))][:3] for reason, ms in bad.items()}
    assert len(res.rows) == 1 and res.total == len(rows)
    assert sum(res.dropped.values()) + len(res.rows) == res.total


def test_examples_capped_at_three(tmp_path):
    rows = [{"messages": "bad"} for _ in range(5)]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="n")
    assert res.dropped == {"not a list of messages": 5}
    assert res.examples == {"not a list of messages": ["n:0", "n:1", "n:2"]}


def test_prompts(tmp_path):
    rows = [
        {"prompt": "  plain  "},
        {"prompt": [{"role": "System", "content": " sys "}, {"role": "USER", "content": "q"}]},
        {"prompt": "   "},
        {"prompt": []},
        {"prompt": None},
        {"prompt": [{"role": "assistant", "content": "x"}]},
        {"prompt": 5},
    ]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="p", type="prompts")
    assert [r["prompt"] for r in res.rows] == [
        "plain",
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
    ]
    assert res.dropped == {"empty prompt": 3, "does not start with a user turn": 1, "not a list of messages": 1}


def test_preferences(tmp_path):
    rows = [
        {"prompt": " q ", "chosen": " good ", "rejected": "bad"},
        {
            "prompt": chat("q", "a") + [{"role": "user", "content": "again"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": "no",
        },
        {"prompt": "q", "chosen": "", "rejected": "bad"},
        {"prompt": "q", "chosen": "good", "rejected": None},
        {"prompt": "q", "chosen": "same", "rejected": " same"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": chat(), "chosen": "a", "rejected": "b"},
    ]
    res = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), name="pr", type="preferences")
    assert res.rows[0] == {
        "id": "pr:0",
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "meta": {},
    }
    assert res.rows[1]["prompt"][-1] == {"role": "user", "content": "again"}
    assert res.rows[1]["chosen"] == [{"role": "assistant", "content": "yes"}]
    assert len(res.rows) == 2
    assert res.dropped == {
        "empty chosen": 1,
        "empty rejected": 1,
        "chosen equals rejected": 1,
        "empty prompt": 1,
        "roles do not alternate": 1,
    }


def test_preferences_csv(tmp_path):
    rows = [{"prompt": "q", "chosen": json.dumps([{"role": "assistant", "content": "c"}]), "rejected": "r"}]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(rows)
    res = load_rows(str(path), name="pr", type="preferences")
    assert res.rows[0]["chosen"] == [{"role": "assistant", "content": "c"}]


# ---------------------------------------------------------------- errors


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    with pytest.raises(DataError) as ei:
        load_rows(str(p), name="seed", key="datasets.seed.path", file="recipe.toml")
    text = str(ei.value)
    assert str(p) in text and "line 3" in text and "recipe.toml" in text and "Traceback" not in text


def test_jsonl_line_not_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1 is not a JSON object"):
        load_rows(str(p), name="seed")


def test_missing_local_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="file not found: " + str(missing)):
        load_rows(str(missing), name="seed")
    with pytest.raises(DataError, match="file not found"):
        load_rows("./data/seed", name="seed")
    with pytest.raises(DataError, match="file not found"):
        load_rows("data/seed.jsonl", name="seed")


def test_corrupt_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="could not read"):
        load_rows(str(p), name="seed")


def test_hub_offline_is_data_error(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE when imported, and earlier tests imported it in this
    # process: run the load in a fresh interpreter that inherits the patched environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import engine.data.datasets as d, engine.core.errors as e\n"
        "try:\n"
        "    d.load_rows('nonexistent-org/nonexistent-ds', name='seed', key='datasets.seed.path')\n"
        "except e.DataError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    sys.exit('no error')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout.strip()
    assert "could not be loaded from the hub" in text and "nonexistent-org/nonexistent-ds" in text
    assert "datasets.seed.path" in text and "point `path` at the local copy" in text
    assert "\n" not in text and "Traceback" not in proc.stderr


def test_import_is_light():
    code = (
        "import sys, engine.data.datasets; "
        "bad = [m for m in ('datasets', 'torch', 'transformers', 'trl', 'peft', 'pyarrow') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_files_load_without_hf_datasets(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    write_csv(tmp_path / "d.csv", ROWS)
    write_parquet(tmp_path / "d.parquet", ROWS)
    code = (
        "import sys, engine.data.datasets as d\n"
        f"for ext in ('jsonl', 'json', 'csv', 'parquet'):\n"
        f"    assert len(d.load_rows({str(tmp_path)!r} + '/d.' + ext, name='s').rows) == 3\n"
        "bad = [m for m in ('datasets', 'torch') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- properties

text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())
pad = st.sampled_from(["", " ", "\n", "\t "])


@st.composite
def conversations(draw):
    n = draw(st.integers(min_value=1, max_value=5))
    roles = ["system"] if draw(st.booleans()) else []
    roles += ["user", "assistant"] * n
    if draw(st.booleans()):
        roles.append("user")  # may end on a user turn: still has an assistant turn
    case = st.sampled_from([str.lower, str.upper, str.title])
    return [
        {"role": draw(pad) + draw(case)(r) + draw(pad), "content": draw(pad) + draw(text) + draw(pad)} for r in roles
    ]


@settings(max_examples=200, deadline=None)
@given(conversations())
def test_valid_conversations_pass_and_normalize_is_idempotent(messages):
    assert check_messages(messages) is None
    once = normalize_messages(messages)
    assert normalize_messages(once) == once
    assert check_messages(once) is None
    assert all(m["role"] in ("system", "user", "assistant") for m in once)
    assert all(m["content"] == m["content"].strip() and m["content"] for m in once)


@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers(), min_size=1)))
def test_non_message_values_are_rejected(value):
    assert check_messages(value) == "not a list of messages"
    with pytest.raises(ValueError, match="not a list of messages"):
        normalize_messages(value)
