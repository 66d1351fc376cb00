"""Iterative rounds: [loops.*] unrolls into per-round stages that chain, cache on their own and
record their output diversity. Loading errors of loop tables are in test_recipe.py."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.diversity import diversity
from engine.core.hashing import HashMemo
from engine.data.rows import write_rows
from engine.lib.roundstats import diversity_for, last_round, replies, round_rows
from engine.load.loader import load_recipe
from engine.spec.rounds import round_name, round_of
from engine.store.fingerprint import fingerprints

from conftest import GOOD, conv, write_jsonl

REFUSALS = [
    conv(f"Tell me secret {i} please", "I'm sorry, but I can't help with that request at all.", id=f"x{i}")
    for i in range(3)
]

# A loop of two filters: from round 2 on, `first` reads the previous round's `second` instead of
# the dataset. `side` is in the loop but reads nothing fed, so only its round tells its rounds apart.
LOOP_RECIPE = """
[recipe]
name = "rounds"
seed = 7

[datasets.seed]
path = "data/convs.jsonl"

[datasets.extra]
path = "data/extra.jsonl"

[stages.first]
kind = "filter"
input = "seed"
min_words = 3

[stages.second]
kind = "filter"
input = "first"
refusals = "drop"

[stages.side]
kind = "filter"
input = "extra"

[stages.after]
kind = "filter"
input = "second"

[loops.grow]
rounds = 2
stages = ["first", "second", "side"]
feed = { seed = "second" }
"""


@pytest.fixture
def loop(project: Path) -> Path:
    """The project folder with the loop recipe: 40 good rows + 3 refusals that round 1 drops."""
    write_jsonl(project / "data" / "convs.jsonl", GOOD + REFUSALS)
    write_jsonl(project / "data" / "extra.jsonl", GOOD[:10])
    path = project / "loop.toml"
    path.write_text(textwrap.dedent(LOOP_RECIPE))
    return path


def fps(path: Path, sets=()) -> dict[str, str]:
    return {n: fp for n, (fp, _) in fingerprints(load_recipe(path, sets), HashMemo(None)).items()}


def stages_of(runs: Path, name: str = "rounds") -> dict[str, dict]:
    return json.loads((runs / name / "latest" / "record.json").read_text())["stages"]


def test_loop_unrolls_into_rounds_with_references_rewritten(loop):
    r = load_recipe(loop)
    assert list(r.stages) == ["first@1", "second@1", "side@1", "first@2", "second@2", "side@2", "after"]
    inputs = {n: s.config.input for n, s in r.stages.items()}
    assert inputs == {
        "first@1": "seed",
        "second@1": "first@1",
        "side@1": "extra",
        "first@2": "second@1",
        "second@2": "first@2",
        "side@2": "extra",
        "after": "second@2",
    }
    s = r.stages["second@2"]
    assert (s.base, s.round, s.loop, s.kind) == ("second", 2, "grow", "filter")
    assert (r.stages["after"].base, r.stages["after"].round) == ("after", None)
    assert r.stages["first@1"].config.min_words == 3
    # what the user wrote is kept: the resolved recipe shows the loop, not the rounds
    assert set(r.raw["stages"]) == {"first", "second", "side", "after"}
    assert r.raw["loops"]["grow"] == {"rounds": 2, "stages": ["first", "second", "side"], "feed": {"seed": "second"}}
    assert r.stage_names(["second", "first@1", "side@*", "after", "nosuch"]) == [
        "second@2",
        "first@1",
        "side@1",
        "side@2",
        "after",
        "nosuch",
    ]


def test_adding_a_round_reruns_only_the_new_round(cli, loop, runs):
    assert cli("run", loop).exit_code == 0
    two = stages_of(runs)
    assert {n: s["status"] for n, s in two.items()} == {n: "run" for n in two}
    # round 2's first stage read round 1's output (the refusals dropped), not the dataset
    assert (two["first@1"]["rows_in"], two["second@1"]["rows_out"], two["first@2"]["rows_in"]) == (43, 40, 40)

    plan = json.loads(cli("plan", loop, "--json", "--set", "loops.grow.rounds=3").output)["stages"]
    status = {s["name"]: s["status"] for s in plan}
    for stage in ("first", "second", "side"):  # the plan lists each stage's rounds in order
        assert [n for n in status if n.startswith(stage)] == [f"{stage}@{k}" for k in (1, 2, 3)]
    assert status == {
        **{n: "cached" for n in two if n != "after"},
        "first@3": "run",
        "second@3": "run",
        "side@3": "run",
        "after": "pending",  # it reads second@3, whose output is not known before it has run
    }
    assert {s["name"]: s["fingerprint"] for s in plan if "@3" not in s["name"] and s["name"] != "after"} == {
        n: s["fingerprint"] for n, s in two.items() if n != "after"
    }
    after = next(s for s in plan if s["name"] == "after")
    assert after["reasons"] == ["runs if second@3's output changes"]

    assert cli("run", loop, "--set", "loops.grow.rounds=3").exit_code == 0
    three = stages_of(runs)
    assert {n: s["status"] for n, s in three.items()} == {
        **{n: "cached" for n in two if n != "after"},
        "first@3": "run",
        "second@3": "run",
        "side@3": "run",
        "after": "cached",  # round 3 filtered round 2's rows to the same rows: after's input came out the same
    }
    # and back to two rounds: everything is in the cache
    assert all(s["status"] == "cached" for s in json.loads(cli("plan", loop, "--json").output)["stages"])


def test_fingerprints_chain_from_round_to_round(loop):
    base = fps(loop, ["loops.grow.rounds=3"])
    changed = fps(loop, ["loops.grow.rounds=3", "stages.second.refusals='keep'"])
    same = {n for n in base if base[n] == changed[n]}
    # round 1's first stage and the side stage do not read `second`; everything after it does
    assert same == {"first@1", "side@1", "side@2", "side@3"}
    # new data reaches round 1 directly and every later round through the chain
    write_jsonl(loop.parent / "data" / "convs.jsonl", GOOD + REFUSALS[:2])
    new_data = fps(loop, ["loops.grow.rounds=3"])
    assert {n for n in base if base[n] == new_data[n]} == {"side@1", "side@2", "side@3"}


def test_round_index_enters_the_fingerprint_but_not_names_or_round_count(loop):
    two, three = fps(loop), fps(loop, ["loops.grow.rounds=3"])
    # side reads the same data with the same config in every round: only its round differs
    assert len({three["side@1"], three["side@2"], three["side@3"]}) == 3
    assert all(two[n] == three[n] for n in two if n != "after")
    # round 1 of a loop is the same computation as the stage outside any loop
    text = loop.read_text()
    (loop.parent / "flat.toml").write_text(text[: text.index("[loops.grow]")])
    flat = fps(loop.parent / "flat.toml")
    assert (flat["first"], flat["second"], flat["side"]) == (two["first@1"], two["second@1"], two["side@1"])


def test_only_and_force_take_a_loop_stage_s_own_name(cli, loop, runs):
    assert cli("run", loop, "--only", "second").exit_code == 0
    assert set(stages_of(runs)) == {"first@1", "second@1", "first@2", "second@2"}  # upstream of the last round
    assert cli("run", loop, "--only", "second", "--force", "second").exit_code == 0
    status = {n: (s["status"], s["reasons"]) for n, s in stages_of(runs).items()}
    assert status == {
        "first@1": ("cached", []),
        "second@1": ("cached", []),
        "first@2": ("cached", []),
        "second@2": ("run", ["forced"]),
    }
    assert cli("run", loop, "--only", "side@1", "--force", "side@*").exit_code == 0
    assert {n: s["status"] for n, s in stages_of(runs).items()} == {"side@1": "run"}
    res = cli("run", loop, "--only", "second@7")
    assert res.exit_code == 2 and "no stage named 'second@7'" in res.output


def test_each_round_records_its_output_diversity(cli, loop, runs):
    assert cli("run", loop).exit_code == 0
    record = stages_of(runs)
    entry = runs / "rounds" / "latest" / "stages"
    for name in ("first@1", "second@1", "side@1", "first@2", "second@2", "side@2"):
        assert record[name]["diversity"] == diversity_for("conversations", entry / name)
    assert "diversity" not in record["after"]  # not in a loop
    assert record["first@1"]["diversity"]["refusal_share"] == round(3 / 43, 4)
    assert record["second@1"]["diversity"]["refusal_share"] == 0.0

    detail = cli("status", "rounds").output
    assert "output diversity per round" in detail and "second" in detail
    shown = cli("show", "rounds", "second")  # a loop stage's own name: its last round
    assert shown.exit_code == 0
    assert "second@2 (filter)" in shown.output and "output diversity per round" in shown.output


def test_diversity_for_reads_the_final_replies(tmp_path):
    rows = [conv("hi", "first reply", "more?", "the final reply here", id="a"), conv("q", "I'm unable to say", id="b")]
    write_rows(tmp_path / "c" / "rows.parquet", rows)
    assert diversity_for("conversations", tmp_path / "c") == diversity(["the final reply here", "I'm unable to say"])
    pairs = [
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good one"}],
            "rejected": [{"role": "assistant", "content": "bad bad"}],
        }
    ]
    write_rows(tmp_path / "p" / "rows.parquet", pairs)
    assert diversity_for("preferences", tmp_path / "p") == diversity(["good one"])
    assert replies("samples", [{"prompt": [], "completions": ["a b", "c"], "scores": [1, 2]}]) == ["a b", "c"]
    assert diversity_for("model", tmp_path / "c") is None
    assert diversity_for("report", tmp_path / "c") is None
    assert diversity_for("conversations", tmp_path / "nothing") is None


def test_round_rows_show_the_fall_in_distinct_2():
    def d(d2):
        return {
            "n": 4,
            "distinct_1": 0.5,
            "distinct_2": d2,
            "length": {"mean": 3.0, "std": 1.25},
            "refusal_share": 0.25,
        }

    stages = {
        "gen@2": {"diversity": d(0.3)},
        "gen@1": {"diversity": d(0.6)},
        "dpo@1": {"diversity": None},
        "other": {"diversity": d(0.1)},
        "gen@3": {"status": "failed"},
    }
    assert round_rows(stages) == [
        ("gen", "1", "4", "0.500", "0.600", "", "3.0 ± 1.2", "25%"),
        ("gen", "2", "4", "0.500", "0.300", "-50%", "3.0 ± 1.2", "25%"),
    ]
    assert round_rows(stages, "dpo") == []
    assert last_round(["gen@2", "gen@10", "gen@9", "dpo@1"], "gen") == "gen@10"
    assert last_round(["gen"], "gen") is None


@given(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,12}", fullmatch=True), st.integers(1, 20))
def test_round_of_inverts_round_name(base, k):
    assert round_of(round_name(base, k)) == (base, k)
    assert round_of(base) is None


SLOW_RECIPE = """
[recipe]
name = "selfplay"
seed = 3

[models.policy]
path = "builtin:tiny-chat"

[datasets.chats]
path = "data/chats.jsonl"

[stages.talk]
kind = "generate"
input = "chats"
model = "policy"
max_new_tokens = 8
shard_size = 4

[stages.tune]
kind = "sft"
input = "talk"
model = "policy"
max_steps = 2
batch_size = 4
per_device_batch_size = 4
max_length = 128

[loops.selfplay]
rounds = 2
stages = ["talk", "tune"]
feed = { policy = "tune" }
"""


@pytest.mark.slow
def test_generate_and_train_round_after_round_on_the_builtin_model(cli, project, runs):
    write_jsonl(
        project / "data" / "chats.jsonl", [conv(f"user says {i}?", f"bot {i} ok", id=f"c{i}") for i in range(8)]
    )
    (project / "selfplay.toml").write_text(textwrap.dedent(SLOW_RECIPE))
    r = load_recipe(project / "selfplay.toml")
    assert (r.stages["talk@2"].config.model, r.stages["tune@2"].config.model) == ("tune@1", "tune@1")
    res = cli("run", project / "selfplay.toml")
    assert res.exit_code == 0, res.output
    record = stages_of(runs, "selfplay")
    assert [s["status"] for s in record.values()] == ["run"] * 4
    for talk in ("talk@1", "talk@2"):  # the random model may write an empty reply: dropped and counted
        report = json.loads((runs / "cache" / record[talk]["fingerprint"] / "report.json").read_text())
        assert record[talk]["rows_out"] + report["dropped"]["empty_turn"] == 8 and record[talk]["rows_out"] >= 6
    assert record["talk@2"]["diversity"]["n"] == record["talk@2"]["rows_out"] and "diversity" in record["tune@1"]
    assert record["tune@1"]["diversity"] is None  # a model has no replies
    # round 2 generated with round 1's trained model: its input identity is the content of tune@1's weights
    from engine.store.fingerprint import content_id

    comps = json.loads((runs / "selfplay" / ".last" / "talk@2.json").read_text())["components"]
    tuned = json.loads((runs / "cache" / record["tune@1"]["fingerprint"] / "manifest.json").read_text())
    assert comps["inputs"]["model"] == [{"name": "tune@1", "source": "stages", "id": content_id(tuned["checksums"])}]
