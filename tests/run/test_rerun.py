"""Re-runs that cost only what changed: early cutoff, row memos, eval per model, seeds that stay
put, user code in fingerprints, and gc of row memos."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import RecipeError
from engine.data.rows import read_rows
from engine.load.loader import load_recipe
from engine.run.executor import run
from engine.run.plan import make_plan
from engine.store.memo import RowMemo, plain

from conftest import conv, write_jsonl

RECIPE = """
[recipe]
name = "rerun"
seed = 5

[models.policy]
path = "builtin:tiny-chat"

[datasets.prompts]
path = "data/prompts.jsonl"

[stages.clean]
kind = "filter"
input = "prompts"
min_words = 2

[stages.gen]
kind = "generate"
input = "clean"
model = "policy"
n = 2
max_new_tokens = 8
shard_size = 4

[stages.talk]
kind = "generate"
mode = "multi_turn"
input = "clean"
model = "policy"
turns = 2
max_new_tokens = 6
shard_size = 3

[stages.scored]
kind = "judge"
input = "gen"
scorer = "function"
function = "scorers/length.py:score"
"""

SCORER = '''
def score(row):
    """The share of the longest possible reply: a toy verifier with a real signature."""
    return min(1.0, len(row["messages"][-1]["content"]) / 100)
'''


def prompts(n: int) -> list[dict]:
    """Conversations whose last user turn is the prompt (the reply is what `clean` filters on)."""
    return [
        conv(f"Question {i}: how do plants use light number {i}?", f"Answer {i}: through their leaves.", id=f"p{i}")
        for i in range(n)
    ]


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    write_jsonl(root / "data" / "prompts.jsonl", prompts(10))
    (root / "scorers").mkdir(parents=True)
    (root / "scorers" / "length.py").write_text(SCORER)
    (root / "recipe.toml").write_text(textwrap.dedent(RECIPE))
    return root


def rows(record, stage: str) -> list[dict]:
    return read_rows(record.dir / "stages" / stage / "rows.parquet")


def test_added_prompts_generate_only_theirs_and_old_rows_stay_byte_identical(proj, runs):
    first = run(load_recipe(proj / "recipe.toml"), runs)
    before = {s: {r["id"]: r for r in rows(first, s)} for s in ("gen", "talk")}
    write_jsonl(proj / "data" / "prompts.jsonl", prompts(12))
    again = run(load_recipe(proj / "recipe.toml"), runs)
    for stage in ("gen", "talk"):
        s = again.data["stages"][stage]
        assert s["status"] == "run" and s["reasons"] == ["input changed: clean"]
        assert (s["rows_reused"], s["rows_computed"]) == (10, 2)
        after = {r["id"]: r for r in rows(again, stage)}
        assert len(after) == len(before[stage]) + (4 if stage == "gen" else 2)
        assert all(after[i] == r for i, r in before[stage].items())  # the old prompts' samples stay put
    # a run from scratch on 12 prompts gives exactly these rows: reuse changes nothing
    fresh = run(load_recipe(proj / "recipe.toml"), runs.parent / "fresh")
    for stage in ("gen", "talk", "scored"):
        assert rows(fresh, stage) == rows(again, stage)
    judged = again.data["stages"]["scored"]
    assert (judged["rows_reused"], judged["rows_computed"]) == (20, 4)


def test_a_no_op_upstream_change_re_runs_nothing_after_it(proj, runs):
    run(load_recipe(proj / "recipe.toml"), runs)
    changed = load_recipe(proj / "recipe.toml", ["stages.clean.min_words=3"])  # every reply has 5 words
    plan = {p.name: p for p in make_plan(changed, runs)}
    assert plan["clean"].status == "run" and plan["gen"].status == "pending"
    assert plan["gen"].reasons == ["runs if clean's output changes"]
    rec = run(changed, runs)
    stages = rec.data["stages"]
    assert stages["clean"]["status"] == "run"
    assert stages["clean"]["note"] == "clean re-ran: output unchanged, 3 stages after it kept"
    assert {stages[s]["status"] for s in ("gen", "talk", "scored")} == {"cached"}


def test_editing_the_scorer_file_re_runs_the_stage_with_a_reason(proj, runs):
    run(load_recipe(proj / "recipe.toml"), runs)
    path = proj / "scorers" / "length.py"
    path.write_text(SCORER.replace("/ 100", "/ 50"))
    plan = {p.name: p for p in make_plan(load_recipe(proj / "recipe.toml"), runs)}
    assert plan["scored"].status == "run"
    assert plan["scored"].reasons == ["code changed: scorer function scorers/length.py:score"]
    assert {plan[s].status for s in ("clean", "gen", "talk")} == {"cached"}
    rec = run(load_recipe(proj / "recipe.toml"), runs)
    scores = [r["scores"]["score"] for r in rows(rec, "scored")]
    assert any(0 < s < 1 for s in scores) and rec.data["stages"]["scored"].get("rows_reused") is None


def test_a_missing_scorer_function_fails_validation_at_its_key(proj):
    text = (proj / "recipe.toml").read_text().replace("length.py:score", "length.py:nothing")
    (proj / "recipe.toml").write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(proj / "recipe.toml")
    [p] = info.value.problems
    assert p.key == "stages.scored.function" and "length.py defines no function nothing" in p.message


def test_a_damaged_memo_is_recomputed_and_gc_keeps_only_used_memos(proj, runs, cli):
    run(load_recipe(proj / "recipe.toml"), runs)
    memo_root = runs / "cache" / "rows"
    files = sorted(memo_root.glob("*/*.json"))
    assert files
    files[0].write_text(files[0].read_text().replace('"', "'", 1))  # its bytes no longer match its name
    write_jsonl(proj / "data" / "prompts.jsonl", prompts(11))
    rec = run(load_recipe(proj / "recipe.toml"), runs)
    assert not files[0].exists()  # removed when read; its rows were computed again
    fresh = run(load_recipe(proj / "recipe.toml"), runs.parent / "fresh")
    assert rows(fresh, "gen") == rows(rec, "gen")
    stray = memo_root / "0123456789abcdef01234567"
    stray.mkdir()
    (stray / "x.json").write_text("{}")
    result = cli("gc", "--yes", "--keep-runs", "1")
    assert result.exit_code == 0, result.output
    assert not stray.exists()
    kept = {p.name for p in memo_root.iterdir()}
    used = set()
    for stage in ("gen", "talk", "scored"):
        used |= set(json.loads((rec.dir / "stages" / stage / "manifest.json").read_text())["memos"])
    assert used <= kept


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
            max_leaves=10,
        ),
        max_size=5,
    )
)
def test_a_memoized_row_comes_back_as_it_went_in(tmp_path_factory, row):
    root = tmp_path_factory.mktemp("memo")
    RowMemo(root, "ns").put({"k": {"out": [row], "stats": {"n": 1}}})
    assert RowMemo(root, "ns").get("k") == plain({"out": [row], "stats": {"n": 1}}) == {"out": [row], "stats": {"n": 1}}


def test_a_runs_dir_from_before_content_keys_stays_readable_and_re_runs_once(proj, runs, cli):
    rec = run(load_recipe(proj / "recipe.toml", ["stages.clean.min_words=3"]), runs, only=["clean"])
    # what the engine before content keys wrote: components without "keys"/"code", no output
    # identity in .last, no row memos or reuse counts in manifests
    for last in (runs / "rerun" / ".last").glob("*.json"):
        data = json.loads(last.read_text())
        data["components"] = {k: v for k, v in data["components"].items() if k not in ("keys", "code")}
        data.pop("output")
        last.write_text(json.dumps(data))
    manifest = rec.dir / "stages" / "clean" / "manifest.json"
    data = json.loads(manifest.read_text())
    data.pop("reuse")
    manifest.write_text(json.dumps(data))
    for args in (("status",), ("show", "rerun", "clean"), ("report", "latest")):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)
    plan = {p.name: p for p in make_plan(load_recipe(proj / "recipe.toml"), runs)}
    assert plan["clean"].reasons == ["this engine version keys the cache by output content (a one-time re-run)"]
