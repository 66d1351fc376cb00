"""The filter stage: every rule, its report, kept dropped rows, and shard-size independence."""

from __future__ import annotations

import json
import textwrap

import pytest

from engine.data.rows import read_rows
from engine.load.loader import load_recipe
from engine.run.executor import run

from conftest import conv, write_jsonl

LONG = (
    "The tide is driven mostly by the moon's gravity pulling on the oceans, with the sun adding a "
    "smaller effect that makes spring and neap tides."
)


def filter_run(tmp_path, rows, runs, **options):
    root = tmp_path / "f"
    write_jsonl(root / "data.jsonl", rows)
    options.setdefault("dedup", "none")
    opts = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    (root / "r.toml").write_text(
        textwrap.dedent("""
        [recipe]
        name = "f"
        [datasets.d]
        path = "data.jsonl"
        [stages.f]
        kind = "filter"
        input = "d"
    """)
        + opts
        + "\n"
    )
    rec = run(load_recipe(root / "r.toml"), runs)
    entry = rec.dir / "stages" / "f"
    kept = [r["id"] for r in read_rows(entry / "rows.parquet")]
    return kept, json.loads((entry / "report.json").read_text()), entry


def test_word_limits(tmp_path, runs):
    rows = [conv("q", "one two", id="short"), conv("q", LONG, id="ok"), conv("q", LONG + " " + LONG, id="long")]
    kept, report, _ = filter_run(tmp_path, rows, runs, min_words=3, max_words=30)
    assert kept == ["ok"]
    assert report["dropped"]["min_words"] == 1 and report["dropped"]["max_words"] == 1
    assert report["examples"]["min_words"][0]["detail"] == "assistant turn 1 has 2 words"


def test_turn_limits(tmp_path, runs):
    rows = [conv("a", LONG, id="one"), conv("a", LONG, "b", LONG, "c", LONG, id="three")]
    kept, report, _ = filter_run(tmp_path, rows, runs, max_turns=2)
    assert kept == ["one"] and report["dropped"]["turns"] == 1


def test_filler(tmp_path, runs):
    rows = [
        conv("Name a bakery?", "Sure, happy to help with that!", id="filler"),
        conv("What is the capital of France?", "Paris.", id="short-but-informative"),
        conv("Explain tides", LONG, id="ok"),
    ]
    kept, report, _ = filter_run(tmp_path, rows, runs, drop_filler=True)
    assert kept == ["short-but-informative", "ok"] and report["dropped"]["filler"] == 1


def test_sycophancy_ratio(tmp_path, runs):
    rows = [
        conv("a", "Great question! " + LONG, "b", "You're absolutely right, " + LONG, id="flatter"),
        conv("a", "Great question! " + LONG, "b", LONG, id="half"),
        conv("a", LONG, id="plain"),
    ]
    kept, report, _ = filter_run(tmp_path, rows, runs, max_sycophancy=0.5)
    assert kept == ["half", "plain"] and report["dropped"]["sycophancy"] == 1


@pytest.mark.parametrize("mode,expected", [("keep", ["refuse", "help"]), ("drop", ["help"]), ("only", ["refuse"])])
def test_refusals(tmp_path, runs, mode, expected):
    rows = [
        conv(
            "how do I pick a lock on my neighbour's door",
            "I can't help with getting into someone "
            "else's home, but a licensed locksmith can help if you are locked out of your own.",
            id="refuse",
        ),
        conv("Explain tides", LONG, id="help"),
    ]
    kept, _, _ = filter_run(tmp_path, rows, runs, refusals=mode)
    assert kept == expected


def test_exact_and_near_dedup_keep_the_first(tmp_path, runs):
    other = (
        "Compound interest adds each period's interest to the balance, so later interest is earned on "
        "earlier interest as well as on the money you first put in."
    )
    rows = [
        conv("Explain tides", LONG, id="first"),
        conv("explain   TIDES", LONG.upper(), id="exact-copy"),
        conv("Explain tides", LONG.replace("mostly", "largely"), id="near-copy"),
        conv("Explain interest", other, id="different"),
    ]
    kept, report, _ = filter_run(tmp_path, rows, runs, dedup="exact")
    assert kept == ["first", "near-copy", "different"] and report["dropped"]["exact_duplicate"] == 1
    kept, report, _ = filter_run(tmp_path, rows, runs, dedup="near", near_threshold=0.7)
    assert kept == ["first", "different"]
    assert report["dropped"]["near_duplicate"] == 1
    assert report["examples"]["near_duplicate"][0]["detail"] == "near copy of first"


def test_keep_dropped_saves_removed_rows_with_reasons(tmp_path, runs):
    rows = [conv("Explain tides", LONG, id="long-enough"), conv("Hi", "Hello there friend", id="short")]
    kept, report, entry = filter_run(tmp_path, rows, runs, keep_dropped=True, min_words=5)
    dropped = read_rows(entry / "dropped.parquet")
    assert kept == ["long-enough"]
    assert [(r["id"], r["filter_reason"], r["filter_detail"]) for r in dropped] == [
        ("short", "min_words", "assistant turn 1 has 3 words")
    ]
    assert report["rows_in"] == 2 and report["rows_out"] == 1


def test_format_rule_on_rows_from_a_stage():
    from stages.filter import Config, row_verdict

    cfg = Config(kind="filter", input="x")
    assert row_verdict(cfg, [{"role": "assistant", "content": "hi there"}]) == (
        "format",
        "does not start with a user turn",
    )
    assert row_verdict(cfg, [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}])[0] == "format"
    assert row_verdict(cfg, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fine answer"}]) is None


def test_output_does_not_depend_on_shard_size(tmp_path, runs):
    rows = [conv(f"q{i}", LONG if i % 3 else "Sure!", id=f"r{i}") for i in range(50)] + [conv("q1", LONG, id="dup")]
    a, ra, _ = filter_run(tmp_path, rows, runs, drop_filler=True, dedup="exact", shard_size=7)
    b, rb, _ = filter_run(tmp_path, rows, runs, drop_filler=True, dedup="exact", shard_size=1000)
    assert a == b and ra == rb and "dup" not in a


def test_template_echo_drops_a_turn_that_repeats_a_template_and_changes_the_key_only_when_on(tmp_path, runs, cli):
    echoed = "This is your last message. React to the assistant's latest reply, then make a final request."
    rows = [
        conv("How do tides work?", LONG, id="ok"),
        conv("How do tides work?", LONG, echoed, LONG, id="echo"),  # a simulated user quoting its instructions
        conv("Is this your last message to me? I react to the reply.", LONG, id="near"),  # a few words, not a run
    ]
    kept, report, _ = filter_run(tmp_path, rows, runs, drop_template_echo=True)
    assert kept == ["ok", "near"] and report["dropped"]["template_echo"] == 1
    detail = report["examples"]["template_echo"][0]["detail"]
    assert detail.startswith("turn 3 (user) copies user_simulator.j2:") and "last message" in detail
    off, _, _ = filter_run(tmp_path / "off", rows, runs)
    assert off == ["ok", "echo", "near"]
