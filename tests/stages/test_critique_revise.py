"""The critique_revise stage: cleaning revisions, turn selection, exact histories and prompts
with a scripted model behind the OpenAI-compatible server, resimulation, bad input, and the
builtin model end to end (shards, SIGKILL-style crash and resume)."""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from engine.data.rows import read_rows
from engine.lib.constitution import load_constitution
from engine.lib.revisions import assess_revision, selected_positions, strip_preamble
from engine.load.loader import load_recipe
from engine.models.backends import Completion
from engine.run.executor import run
from engine.run.plan import make_plan

from chatserver import ChatServer
from conftest import ROOT, conv, run_cli_subprocess, write_jsonl

SHORT = ROOT / "recipes" / "constitutions" / "short.toml"

# --------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Sure, here is a revised response:\nThe capital is Paris.", "The capital is Paris."),
        ("Revised response: The capital is Paris.", "The capital is Paris."),
        ('Here\'s a better version:\n\n"The capital is Paris."', "The capital is Paris."),
        ("**Revised reply:**\nParis.", "Paris."),
        ("Certainly! Here is my revision.\nParis is the capital.", "Paris is the capital."),
        ("Here\u2019s an improved response that addresses the critique:\n\nParis.", "Paris."),
        ("[assistant]\nParis.", "Paris."),
        ("\u201cParis is the capital.\u201d", "Paris is the capital."),
        # replies that merely look like a preamble are kept whole
        ("Here is the answer to your question: 42.", "Here is the answer to your question: 42."),
        ("Here is a vegetarian plan for 40 dollars: lentils.", "Here is a vegetarian plan for 40 dollars: lentils."),
        ('"Yes" and "no" are both fine.', '"Yes" and "no" are both fine.'),
    ],
)
def test_strip_preamble(raw, clean):
    assert strip_preamble(raw) == clean


def test_a_first_line_the_previous_text_had_too_is_kept():
    prev = "Here's an updated version of the itinerary: day 1, the museum."
    assert strip_preamble("Here's an updated version of the itinerary: day 1, the park.", prev).startswith("Here's")
    assert strip_preamble("Here's an updated version of the itinerary: day 1, the park.") == "day 1, the park."


PREAMBLES = [
    "Sure, here is a revised response:\n",
    "Revised response: ",
    "Here's a better version:\n\n",
    "Okay! Here is the rewritten reply.\n",
    "**Improved answer:**\n",
    "Revision:\n",
]
BODY = st.text(
    alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters=" ,;?\n-"),
    min_size=1,
    max_size=80,
).filter(lambda t: t.strip())


@given(preamble=st.sampled_from(PREAMBLES), body=BODY)
@example(preamble="Sure, here is a revised response:\n", body="REVISION")  # found by hypothesis: a bare word
def test_any_preamble_is_stripped_and_plain_text_is_untouched(preamble, body):
    assert strip_preamble(preamble + body) == strip_preamble(body) == body.strip()


def test_assess_revision_reasons():
    original = "Paris is the capital of France."
    assert assess_revision("Revised reply:\n  ", "stop", original, original) == ("", "empty")
    assert assess_revision("Paris, France's capital.", "length", original, original)[1] == "truncated"
    assert assess_revision("word " * 71, "stop", original, original)[1] == "runaway"  # > 3 * 6 + 50 words
    assert assess_revision("word " * 68, "stop", original, original)[1] is None
    assert assess_revision(
        "Here is the revised reply:\nParis is the  capital of France.", "stop", original, original
    ) == ("Paris is the  capital of France.", "unchanged")
    assert assess_revision("Sure, here's a better version: Paris is France's capital.", "stop", original, original) == (
        "Paris is France's capital.",
        None,
    )


def test_selected_positions():
    assert selected_positions(3, "all") == [0, 1, 2] and selected_positions(3, "last") == [2]
    assert selected_positions(3, [2, 0]) == [0, 2] and selected_positions(3, [-1, 2, 5, -4]) == [2]
    assert selected_positions(0, "last") == [] and selected_positions(1, [0, -1]) == [0]


# --------------------------------------------------------------------------- scripted model

REPLY = re.compile(r"Reply to (?:critique|revise):\n\n\[assistant\]\n(.*?)\n\nCritique request: (.*?)\n", re.DOTALL)


class Scripted:
    """Follows the built-in templates like a capable model would, deterministically. Markers in
    a reply choose a failure: (nocrit) an empty critique, (empty) an empty revision, (runaway)
    a huge one, (same) the same text under a preamble, (cut) a revision that hits the limit."""

    name = "scripted"

    def __init__(self, voice: str = "Answer") -> None:
        self.prompts: list[list[dict]] = []
        self.voice = voice  # how its plain chat replies start

    def answer(self, messages: list[dict]) -> tuple[str, str]:
        system, last = messages[0]["content"], messages[-1]["content"]
        if system.startswith("You review replies"):
            reply, request = REPLY.search(last).groups()
            return ("" if "(nocrit)" in reply else f"Critique [{request[:24]}] of: {reply}"), "stop"
        if system.startswith("You revise replies"):
            reply, _ = REPLY.search(last).groups()
            assert "Critique:\nCritique [" in last and "Revision request: Rewrite the reply" in last
            if "(empty)" in reply:
                return "Revised reply:\n", "stop"
            if "(runaway)" in reply:
                return "more " * 400, "stop"
            if "(same)" in reply:
                return f"Revised reply:\n{reply}", "stop"
            return f"Sure, here is the revised response:\n{reply} [rev]", "length" if "(cut)" in reply else "stop"
        if system.startswith("You are a careful, impartial evaluator"):  # judge_pointwise.j2
            reply = last.split("Reply to score:")[1].split("Judge the reply")[0]
            if "(unscored)" in reply:
                return "Hard to say.", "stop"
            return f"Reasoning.\nScore: {3 if '(rev-worse)' in reply and '[rev]' in reply else 6}", "stop"
        if system.startswith("You are playing a person"):
            turn = re.search(r"Write user message (\d+) of (\d+)", last).group(1)
            scenario = re.search(r"Scenario: (.*)", last).group(1)
            return f"User turn {turn} on {scenario}", "stop"
        return f"{self.voice} to: {messages[-1]['content']}", "stop"

    def generate(self, prompts, params, seed):
        self.prompts += prompts
        out = []
        for p in prompts:
            text, finish = self.answer(p)
            out.append([Completion(text, 10, 5, finish) for _ in range(params.n)])
        return out

    def close(self):
        pass


@pytest.fixture
def scripted():
    backend = Scripted()
    srv = ChatServer(backend, model_name="scripted")
    srv.start()
    yield srv, backend
    srv.stop()


HEAD = """
[recipe]
name = "cr"
seed = 11
[models.critic]
path = "scripted"
backend = "openai"
base_url = "{url}"
[datasets.convs]
path = "convs.jsonl"
[constitutions.short]
path = "{short}"
"""


def project(tmp_path: Path, url: str, stage: str, rows: list[dict]) -> Path:
    write_jsonl(tmp_path / "convs.jsonl", rows)
    path = tmp_path / "r.toml"
    path.write_text(textwrap.dedent(HEAD.format(url=url, short=SHORT)) + textwrap.dedent(stage))
    return path


def stage_out(record, name="rev"):
    import json

    entry = record.dir / "stages" / name
    return read_rows(entry / "rows.parquet"), json.loads((entry / "report.json").read_text())


ROWS = [
    conv(
        "Plan two days in Rome.",
        "Day one: Colosseum. Day two: Vatican.",
        "I dislike museums.",
        "Then walk around Trastevere instead.",
        id="rome",
        meta={"topic": "travel"},
    ),
    {
        "id": "math",
        "meta": {"topic": "math"},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "It is 6."},
        ],
    },
    conv("Name a fruit.", "Apple.", id="fruit"),
]


def test_every_assistant_turn_gets_an_exact_history(tmp_path, scripted):
    srv, backend = scripted
    path = project(
        tmp_path,
        srv.url,
        """
        [stages.rev]
        kind = "critique_revise"
        input = "convs"
        model = "critic"
        constitution = "short"
        rounds = 2
        shard_size = 2
    """,
        ROWS,
    )
    rows, report = stage_out(run(load_recipe(path), tmp_path / "runs"))
    c = load_constitution(SHORT)
    drawn = Counter()
    assert [r["id"] for r in rows] == ["rome", "math", "fruit"]
    for row, before in zip(rows, ROWS):
        info = row["meta"].pop("critique_revise")
        assert row["meta"] == before.get("meta", {}) and info["after_revision"] == "keep" and info["rounds"] == 2
        indices = [i for i, m in enumerate(before["messages"]) if m["role"] == "assistant"]
        assert [t["index"] for t in info["turns"]] == indices
        for turn in info["turns"]:
            i, original = turn["index"], before["messages"][turn["index"]]["content"]
            assert turn["original"] == original and turn["final"] == f"{original} [rev] [rev]"
            assert row["messages"][i]["content"] == turn["final"]
            texts = [original, f"{original} [rev]"]
            for r, (h, text) in enumerate(zip(turn["history"], texts), 1):
                p = c.draw(11, row["id"], i, r)
                drawn[p.id] += 1
                assert h == {
                    "round": r,
                    "principle": p.id,
                    "critique": f"Critique [{p.critique[:24]}] of: {text}",
                    "revision": f"{text} [rev]",
                    "accepted": True,
                    "reason": None,
                }
        # keep: the user turns are untouched
        assert [m for m in row["messages"] if m["role"] != "assistant"] == [
            m for m in before["messages"] if m["role"] != "assistant"
        ]
    assert report["turns_selected"] == 5 and report["turns_revised"] == 5 and report["critiques"] == 10
    assert report["revisions"] == {
        "accepted": 10,
        "rejected": dict.fromkeys(
            ["empty", "runaway", "truncated", "unchanged", "empty_critique", "worse", "better"], 0
        ),
    }
    assert {k: v for k, v in report["principles"].items() if v} == dict(drawn)
    # later turns are critiqued in a context holding the earlier revisions, system prompt included
    second = [p for p in backend.prompts if p[0]["content"].startswith("You review") and "It is 6." in p[1]["content"]]
    assert second and all(
        "[system]\nBe brief." in p[1]["content"] and "It is 4. [rev] [rev]" in p[1]["content"] for p in second
    )
    calls = srv.requests
    run(load_recipe(path), tmp_path / "runs")  # cached: the server sees nothing new
    assert srv.requests == calls


def test_rejected_revisions_keep_the_previous_text_and_are_counted(tmp_path, scripted):
    srv, backend = scripted
    rows = [
        conv("Q?", f"A reply {marker}.", id=marker.strip("()") or "ok")
        for marker in ("(empty)", "(runaway)", "(same)", "(cut)", "(nocrit)", "")
    ]
    path = project(
        tmp_path,
        srv.url,
        """
        [stages.rev]
        kind = "critique_revise"
        input = "convs"
        model = "critic"
        constitution = "short"
        turns = "last"
    """,
        rows,
    )
    out, report = stage_out(run(load_recipe(path), tmp_path / "runs"))
    reasons = {r["id"]: r["meta"]["critique_revise"]["turns"][0]["history"][0]["reason"] for r in out}
    assert reasons == {
        "empty": "empty",
        "runaway": "runaway",
        "same": "unchanged",
        "cut": "truncated",
        "nocrit": "empty_critique",
        "ok": None,
    }
    for r, before in zip(out, rows):
        [turn] = r["meta"]["critique_revise"]["turns"]
        kept = turn["history"][0]["reason"] is not None
        assert (turn["final"] == turn["original"] == before["messages"][1]["content"]) == kept
        assert r["messages"][1]["content"] == turn["final"]
    nocrit = next(r for r in out if r["id"] == "nocrit")["meta"]["critique_revise"]["turns"][0]["history"][0]
    assert nocrit["critique"] == "" and nocrit["revision"] == "" and not nocrit["accepted"]
    revision_prompts = [p for p in backend.prompts if p[0]["content"].startswith("You revise")]
    assert len(revision_prompts) == 5  # no critique, no revision
    assert report["revisions"] == {
        "accepted": 1,
        "rejected": {
            "empty": 1,
            "runaway": 1,
            "truncated": 1,
            "unchanged": 1,
            "empty_critique": 1,
            "worse": 0,
            "better": 0,
        },
    }
    assert report["turns_revised"] == 1


def test_rewards_keep_only_revisions_that_score_at_least_as_well(tmp_path, scripted):
    srv, _ = scripted  # its revision is the reply plus " [rev]"
    rows = [
        conv("Q?", "Plain answer.", id="better"),  # gains the required phrase, stays short
        conv("Q?", "One two three four.", id="worse"),  # gains it too, but runs past max_words
        conv("Q1?", "Fine.", "Q2?", "Sure thing.", id="turns", meta={"expected": ["comply", "refuse"]}),
    ]
    path = project(
        tmp_path,
        srv.url,
        """
        [stages.rev]
        kind = "critique_revise"
        input = "convs"
        model = "critic"
        constitution = "short"
        [stages.rev.rewards]
        required = ["rev"]
        max_words = 4
        length = 1.0
    """,
        rows,
    )
    out, report = stage_out(run(load_recipe(path), tmp_path / "runs"))
    hist = {r["id"]: [t["history"][0] for t in r["meta"]["critique_revise"]["turns"]] for r in out}
    assert [h["reason"] for h in hist["better"]] == [None] and hist["better"][0]["score_after"] == 1.0
    assert [h["reason"] for h in hist["worse"]] == ["worse"]
    assert hist["worse"][0]["score_before"] == 0.8 and hist["worse"][0]["score_after"] == 0.2
    worse = next(r for r in out if r["id"] == "worse")
    assert worse["messages"][-1]["content"] == "One two three four."  # the turn kept its text
    # one expectation per assistant turn: the second turn should have refused, and scores lower
    first, second = hist["turns"]
    assert first["score_before"] == pytest.approx(2 / 2.25) and second["score_before"] == pytest.approx(1 / 2.25)
    assert report["revisions"]["rejected"]["worse"] == 1
    assert {h["principle"] for hs in hist.values() for h in hs} == set(report["by_principle"])
    assert sum(v["kept"] for v in report["by_principle"].values()) == report["revisions"]["accepted"]
    assert sum(v["rejected"].get("worse", 0) for v in report["by_principle"].values()) == 1
    # a control run turns the gate around: only the revision that scores no better is kept
    control = path.read_text().replace("[stages.rev.rewards]", 'prefer = "lower"\n[stages.rev.rewards]')
    path.write_text(control)
    out, report = stage_out(run(load_recipe(path), tmp_path / "runs"))
    hist = {r["id"]: [t["history"][0] for t in r["meta"]["critique_revise"]["turns"]] for r in out}
    assert [h["reason"] for h in hist["better"]] == ["better"] and [h["reason"] for h in hist["worse"]] == [None]
    assert next(r for r in out if r["id"] == "worse")["messages"][-1]["content"].endswith("[rev]")


def test_a_judge_gates_revisions_in_their_context(tmp_path, scripted):
    """With `judge`, the judge scores the text a revision would replace and the revision (each in
    its conversation); one it scores lower is rejected as worse, an unparsed score keeps it."""
    srv, backend = scripted
    rows = [
        conv("Q?", "Plain answer.", id="kept"),  # 6 -> 6: kept
        conv("Q?", "Risky answer (rev-worse).", id="worse"),  # 6 -> 3: rejected
        conv("Q?", "Odd answer (unscored).", id="unscored"),  # no score: kept, counted
    ]
    path = project(
        tmp_path,
        srv.url,
        """
        [stages.rev]
        kind = "critique_revise"
        input = "convs"
        model = "critic"
        judge = "critic"
        constitution = "short"
    """,
        rows,
    )
    out, report = stage_out(run(load_recipe(path), tmp_path / "runs"))
    hist = {r["id"]: r["meta"]["critique_revise"]["turns"][0]["history"][0] for r in out}
    assert hist["kept"]["reason"] is None and (hist["kept"]["score_before"], hist["kept"]["score_after"]) == (6, 6)
    assert hist["worse"]["reason"] == "worse" and hist["worse"]["score_after"] == 3
    assert hist["unscored"]["reason"] is None and hist["unscored"]["score_before"] is None
    assert report["revisions"]["rejected"]["worse"] == 1
    judged = [p for p in backend.prompts if p[0]["content"].startswith("You are a careful, impartial evaluator")]
    assert len({p[-1]["content"] for p in judged}) == 6  # before and after of each; unparsed ones asked again
    assert all("Conversation before the reply:" in p[-1]["content"] for p in judged)
    # both gates at once is a validation error, as is a reversed gate with no gate
    path.write_text(path.read_text() + "[stages.rev.rewards]\nmin_words = 1\n")
    proc = run_cli_subprocess("validate", path)
    assert proc.returncode == 2 and "stages.rev.judge: both a judge and [rewards] would gate" in proc.stderr
    path.write_text(path.read_text().replace('judge = "critic"', 'prefer = "lower"').split("[stages.rev.rewards]")[0])
    proc = run_cli_subprocess("validate", path)
    assert proc.returncode == 2 and 'stages.rev.prefer: prefer = "lower" turns around a gate' in proc.stderr


def test_resimulate_regenerates_what_follows_a_revised_turn(tmp_path, scripted):
    srv, backend = scripted
    policy = ChatServer(Scripted("Policy answer"), model_name="policy").start()
    three = conv(
        "Help me train for a 10k.",
        "Run three times a week.",
        "I only have mornings.",
        "Run at 7am then.",
        "What about shoes?",
        "Any comfortable pair.",
        id="run",
        meta={"scenario": "a beginner trains for a 10k", "persona": ""},
    )
    untouched = conv("Hi.", "Hello (nocrit).", "Bye.", "Goodbye (nocrit).", id="still")
    path = project(
        tmp_path,
        srv.url,
        """
        [stages.rev]
        kind = "critique_revise"
        input = "convs"
        model = "critic"
        constitution = "short"
        after_revision = "resimulate"
        assistant_model = "policy"
        turns = [0, -1]
        [models.policy]
        path = "policy"
        backend = "openai"
        base_url = "{policy.url}"
    """.replace("{policy.url}", policy.url),
        [three, untouched],
    )
    try:
        out, report = stage_out(run(load_recipe(path), tmp_path / "runs"))
    finally:
        policy.stop()
    row = out[0]
    info = row["meta"]["critique_revise"]
    assert info["after_revision"] == "resimulate"
    assert [m["role"] for m in row["messages"]] == [m["role"] for m in three["messages"]]
    first = "Run three times a week. [rev]"
    u2 = "User turn 2 on a beginner trains for a 10k"
    u3 = "User turn 3 on a beginner trains for a 10k"
    a2 = f"Policy answer to: {u2}"  # assistant turns come from assistant_model, the rest from model
    a3 = f"Policy answer to: {u3}"
    assert [m["content"] for m in row["messages"]] == ["Help me train for a 10k.", first, u2, a2, u3, f"{a3} [rev]"]
    # the last turn was critiqued as regenerated, in the regenerated context
    assert [(t["index"], t["original"], t["final"]) for t in info["turns"]] == [
        (1, "Run three times a week.", first),
        (5, a3, f"{a3} [rev]"),
    ]
    # a turn that was not revised (no critique) is not resimulated
    assert out[1]["messages"] == untouched["messages"] and report["resimulated_turns"] == 1
    sims = [p for p in backend.prompts if p[0]["content"].startswith("You are playing a person")]
    assert len(sims) == 2 and first in sims[0][1]["content"] and "Write user message 2 of 3" in sims[0][1]["content"]


def test_a_conversation_with_no_selected_turn_passes_through(tmp_path, scripted):
    srv, backend = scripted
    path = project(
        tmp_path,
        srv.url,
        """
        [stages.rev]
        kind = "critique_revise"
        input = "convs"
        model = "critic"
        constitution = "short"
        turns = [2]
    """,
        [ROWS[0], ROWS[2]],
    )
    out, report = stage_out(run(load_recipe(path), tmp_path / "runs"))
    assert out[1]["messages"] == ROWS[2]["messages"] and out[1]["meta"]["critique_revise"]["turns"] == []
    assert out[0]["messages"] == ROWS[0]["messages"] and out[0]["meta"]["critique_revise"]["turns"] == []
    assert report["rows_without_selected_turn"] == 2 and report["turns_selected"] == 0 and not backend.prompts


def test_simulator_models_need_resimulate(tmp_path):
    write_jsonl(tmp_path / "convs.jsonl", [conv("Hi there.", "Hello, how can I help?", id="a")])
    path = tmp_path / "r.toml"
    path.write_text(
        textwrap.dedent(HEAD.format(url="http://127.0.0.1:9/v1", short=SHORT))
        + textwrap.dedent("""
        [stages.rev]
        kind = "critique_revise"
        input = "convs"
        model = "critic"
        user_model = "critic"
        constitution = "short"
    """)
    )
    proc = run_cli_subprocess("validate", path)
    assert (
        proc.returncode == 2
        and "stages.rev.user_model: user_model is only used with after_revision = "
        '"resimulate". Remove user_model, or set after_revision = "resimulate".'
        in proc.stderr
    )
    assert run_cli_subprocess("validate", path, "--set", "stages.rev.after_revision=resimulate").returncode == 0


def test_an_empty_input_is_an_error_naming_the_stage(tmp_path):
    write_jsonl(tmp_path / "convs.jsonl", [conv("Hi there.", "Hello, how can I help?", id="a")])
    (tmp_path / "r.toml").write_text(
        textwrap.dedent(f"""
        [recipe]
        name = "empty"
        [models.policy]
        path = "builtin:tiny-chat"
        [datasets.convs]
        path = "convs.jsonl"
        [constitutions.short]
        path = "{SHORT}"
        [stages.none]
        kind = "filter"
        input = "convs"
        min_words = 100
        [stages.rev]
        kind = "critique_revise"
        input = "none"
        model = "policy"
        constitution = "short"
    """)
    )
    proc = run_cli_subprocess("run", tmp_path / "r.toml", "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 2
    assert "stage 'rev': its input 'none' has no rows, so there is nothing to critique." in proc.stderr


def test_the_constitution_file_and_templates_enter_the_fingerprint(tmp_path):
    cons = tmp_path / "c.toml"
    cons.write_text(SHORT.read_text())
    write_jsonl(tmp_path / "convs.jsonl", [conv("Hi there.", "Hello, how can I help?", id="a")])
    path = tmp_path / "r.toml"
    path.write_text(
        textwrap.dedent("""
        [recipe]
        name = "fp"
        [models.policy]
        path = "builtin:tiny-chat"
        [datasets.convs]
        path = "convs.jsonl"
        [constitutions.mine]
        path = "c.toml"
        [stages.rev]
        kind = "critique_revise"
        input = "convs"
        model = "policy"
        constitution = "mine"
    """)
    )
    before = make_plan(load_recipe(path), tmp_path / "runs")[0].fingerprint
    cons.write_text(cons.read_text().replace("Say what is wrong.", "Say exactly what is wrong."))
    [item] = make_plan(load_recipe(path), tmp_path / "runs")
    # the constitution is an input, like a dataset: by content, under the field that names it
    assert item.fingerprint != before and item.components["inputs"]["constitution"][0]["source"] == "constitutions"
    assert not any("constitution" in k for k in item.components["templates"])
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "revision.j2").write_text(
        "### user\n{{ conversation[-1].content }} {{ critique }} {{ revision_request }}\n"
    )
    assert make_plan(load_recipe(path), tmp_path / "runs")[0].fingerprint != item.fingerprint
    (tmp_path / "templates" / "revision.j2").write_text("### user\n{{ conversation[-1].content }} {{ tone }}\n")
    proc = run_cli_subprocess("validate", path)
    assert (
        proc.returncode == 2
        and "template revision.j2 line 2 uses 'tone', which stage 'rev' does not pass" in proc.stderr
    )


# --------------------------------------------------------------------------- builtin model, end to end

BUILTIN = """
[recipe]
name = "crb"
seed = 4
[models.policy]
path = "builtin:tiny-chat"
[datasets.convs]
path = "convs.jsonl"
[constitutions.short]
path = "{short}"
[stages.rev]
kind = "critique_revise"
input = "convs"
model = "policy"
constitution = "short"
rounds = 2
after_revision = "{after}"
max_new_tokens = 6
temperature = 0.9
shard_size = 2
"""


def builtin_project(tmp_path: Path, after: str = "keep") -> Path:
    rows = [
        conv(f"Question {i} about topic {i}?", f"Answer {i}.", f"Follow-up {i}?", f"More on {i}.", id=f"q{i}")
        for i in range(4)
    ]
    write_jsonl(tmp_path / "convs.jsonl", rows)
    path = tmp_path / "r.toml"
    path.write_text(textwrap.dedent(BUILTIN.format(short=SHORT, after=after)))
    return path


def assert_complete_histories(rows: list[dict], rounds: int) -> None:
    keys = {"round", "principle", "critique", "revision", "accepted", "reason"}
    for row in rows:
        info = row["meta"]["critique_revise"]
        assistant = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
        assert [t["index"] for t in info["turns"]] == assistant
        for turn in info["turns"]:
            assert [h["round"] for h in turn["history"]] == list(range(1, rounds + 1))
            assert all(set(h) == keys and (h["reason"] is None) == h["accepted"] for h in turn["history"])
            accepted = [h["revision"] for h in turn["history"] if h["accepted"]]
            assert turn["final"] == (accepted[-1] if accepted else turn["original"])
            assert row["messages"][turn["index"]]["content"] == turn["final"]


@pytest.mark.slow
def test_builtin_model_crash_and_resume_equals_an_uninterrupted_run(tmp_path):
    path = builtin_project(tmp_path, "keep")
    runs, fresh = tmp_path / "runs", tmp_path / "fresh"
    crashed = run_cli_subprocess("run", path, "--runs-dir", runs, faults={"RECIPE_CRASH_AFTER_SHARDS": "1"})
    assert crashed.returncode == 137 and len(list((runs / "cache" / "partial").glob("*/shard-*"))) == 1
    assert run_cli_subprocess("run", path, "--runs-dir", runs).returncode == 0
    assert "resumed: 1 of 2 shards" in (runs / "crb" / "latest" / "logs" / "rev.log").read_text()
    assert run_cli_subprocess("run", path, "--runs-dir", fresh).returncode == 0
    a = read_rows(runs / "crb" / "latest" / "stages" / "rev" / "rows.parquet")
    b = read_rows(fresh / "crb" / "latest" / "stages" / "rev" / "rows.parquet")
    assert a == b and len(a) == 4
    assert_complete_histories(a, rounds=2)
