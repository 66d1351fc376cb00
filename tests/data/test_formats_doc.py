"""docs/data-formats.md is true: every example on the page loads with no row dropped, and the
examples of one type give the same rows. Then the loud failures: too many unusable rows stop
validate and run (exit 2) naming the counts, the first ids and, for a wrong `columns` mapping, the
keys the first row has; a training stage whose length policy drops too much names max_length."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st

from engine.data.datasets import load_rows
from engine.data.formats import hh_transcript, split_shared_prefix

from conftest import ROOT, write_jsonl

DOC = ROOT / "docs" / "data-formats.md"
EXAMPLE = re.compile(r"<!-- example: (\w+)(?: columns = (\{[^}]*\}))? -->\n```jsonl\n(.*?)\n```", re.S)


def examples() -> list[tuple[str, dict, str]]:
    found = EXAMPLE.findall(DOC.read_text(encoding="utf-8"))
    return [(kind, tomllib.loads(f"c = {cols}")["c"] if cols else {}, body) for kind, cols, body in found]


def test_the_page_has_an_example_of_every_shape():
    kinds = [k for k, _, _ in examples()]
    assert kinds.count("conversations") == 5 and kinds.count("prompts") == 2 and kinds.count("preferences") == 4


@pytest.mark.parametrize("kind", ["conversations", "prompts", "preferences"])
def test_every_example_of_a_type_loads_to_the_same_rows(tmp_path, kind):
    loaded = []
    for i, (k, columns, body) in enumerate(examples()):
        if k != kind:
            continue
        path = tmp_path / f"{i}.jsonl"
        path.write_text(body + "\n", encoding="utf-8")
        result = load_rows(str(path), name="d", type=kind, columns=columns or None)
        assert result.dropped == {} and len(result.rows) == len(body.splitlines()), (body, result.dropped)
        loaded.append(result.rows)
    assert len(loaded) > 1 and all(rows == loaded[0] for rows in loaded), loaded


def test_an_hh_pair_whose_replies_differ_late_keeps_the_shared_turns_in_the_prompt():
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    shared = [turn("user", "hi"), turn("assistant", "hello"), turn("user", "and an egg?")]
    prompt, chosen, rejected = split_shared_prefix(
        [*shared, turn("assistant", "Boil it.")], [*shared, turn("assistant", "No.")]
    )
    assert prompt == shared and chosen == [turn("assistant", "Boil it.")] and rejected == [turn("assistant", "No.")]
    assert (
        split_shared_prefix([turn("assistant", "a")], [turn("assistant", "b")]) == "chosen and rejected share no prompt"
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Human", "Assistant"]),
            st.text(min_size=1).filter(lambda t: "\n\n" not in t and ":" not in t),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_hh_transcripts_parse_back_to_their_turns(turns):
    text = "".join(f"\n\n{who}: {content}" for who, content in turns)
    parsed = hh_transcript(text)
    assert parsed is not None and [m["role"] for m in parsed] == [
        "user" if w == "Human" else "assistant" for w, _ in turns
    ]
    assert [m["content"] for m in parsed] == [c.lstrip(" \t") for _, c in turns]


def test_plain_text_is_not_an_hh_transcript():
    assert hh_transcript("just a reply") is None


# --------------------------------------------------------------------------- loud failures

RECIPE = """
[recipe]
name = "fmt"

[models.m]
path = "builtin:tiny-chat"

[datasets.chats]
path = "data/chats.jsonl"
{dataset}

[stages.sft]
kind = "sft"
input = "chats"
model = "m"
max_steps = 1
batch_size = 2
per_device_batch_size = 2
{stage}
"""


def project(tmp_path: Path, rows: list[dict], dataset: str = "", stage: str = "") -> Path:
    write_jsonl(tmp_path / "data" / "chats.jsonl", rows)
    (tmp_path / "r.toml").write_text(RECIPE.format(dataset=dataset, stage=stage))
    return tmp_path / "r.toml"


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_a_wrong_mapping_fails_validate_naming_columns_and_the_first_rows_keys(tmp_path, cli):
    rows = [{"id": f"r{i}", "text": "hello", "source": "web"} for i in range(6)]
    path = project(tmp_path, rows, dataset='columns = { messages = "text" }')
    result = cli("validate", path)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "no usable row: all 6 are unusable" in text and "not a list of messages: 6 (first: r0, r1, r2)" in text
    assert 'columns = { messages = "text" }' in text and "the first row has the keys id, text, source" in text
    assert "docs/data-formats.md" in text and "Traceback" not in result.output
    assert "datasets.chats.columns:" in text  # located at the mapping, not at `path`


def test_over_max_dropped_fails_under_it_warns(tmp_path, cli):
    bad = {"messages": [{"role": "robot", "content": "beep"}]}
    rows = [{"id": f"g{i}", **GOOD} for i in range(5)] + [{"id": "b0", **bad}]
    path = project(tmp_path, rows)
    result = cli("validate", path)
    assert result.exit_code == 2 and "1 of 6 rows are unusable" in result.output, result.output
    assert "unknown role 'robot': 1 (first: b0)" in " ".join(result.output.split())
    path.write_text(
        path.read_text().replace('path = "data/chats.jsonl"', 'path = "data/chats.jsonl"\nmax_dropped = 0.2')
    )
    assert cli("validate", path).exit_code == 0


def test_max_dropped_does_not_change_fingerprints(tmp_path, cli):
    path = project(tmp_path, [{"id": f"g{i}", **GOOD} for i in range(4)])

    def key() -> str:
        plan = json.loads(cli("plan", path, "--json").output)
        return next(s for s in plan["stages"] if s["name"] == "sft")["fingerprint"]

    before = key()
    path.write_text(
        path.read_text().replace('path = "data/chats.jsonl"', 'path = "data/chats.jsonl"\nmax_dropped = 0.5')
    )
    assert key() == before


@pytest.mark.slow
def test_a_training_stage_that_drops_too_many_long_rows_names_max_length(tmp_path, cli):
    long = {"messages": [{"role": "user", "content": "tell me " * 60}, {"role": "assistant", "content": "ok"}]}
    rows = [{"id": f"g{i}", **GOOD} for i in range(3)] + [{"id": f"l{i}", **long} for i in range(3)]
    path = project(tmp_path, rows, stage="max_length = 64")
    result = cli("run", path, "--runs-dir", tmp_path / "runs")
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "3 of 6 conversations are over max_length = 64 tokens and were dropped" in text
    assert "keep_recent" in text and "max_dropped" in text and "Traceback" not in result.output
