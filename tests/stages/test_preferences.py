"""The preferences stage: best_vs_worst after a judge, pairwise AI feedback under constitution
principles (order swap, soft labels, CoT clamping, thresholds), revision pairs from
critique_revise-shaped rows, context negatives, and the errors for zero pairs.

Judges and policies are scripted behind the OpenAI-compatible server: a judge that reads the
two replies and prefers the one marked GOOD in both orders, or one that always answers "A"."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.errors import RecipeError, StageFailed
from engine.data.rows import read_rows
from engine.lib.pairs import best_and_worst, selected_turns
from engine.lib.scoring import logprob_judgments, pairwise_label, parse_choice, soft_label
from engine.load.loader import load_recipe
from engine.models.backends import Completion
from engine.run.executor import run

from chatserver import ChatServer
from conftest import conv, run_cli_subprocess, write_jsonl

CONSTITUTION = Path(__file__).resolve().parents[2] / "recipes" / "constitutions" / "short.toml"


class Scripted:
    """mode "content": prefers the reply holding GOOD, whatever its position; "position":
    always "A"; "mixed" (with n = 2 votes): one vote for GOOD, one for position A; "garbage":
    never a verdict. Non-judge prompts (context_negative) get a context-free reply."""

    name = "scripted"

    def __init__(self) -> None:
        self.mode, self.prompts = "content", []

    def verdict(self, text: str, vote: int) -> str:
        if self.mode == "garbage":
            return "I cannot decide."
        a = re.search(r"<reply_a>(.*?)</reply_a>", text, re.S).group(1)
        good = "A" if "GOOD" in a else "B"
        choice = "A" if self.mode == "position" or (self.mode == "mixed" and vote == 1) else good
        if "step by step" in text:
            return f"Reply {good} follows the principle better.\nVerdict: {choice}"
        return choice  # a bare letter: the lenient parser must read it

    def generate(self, prompts, params, seed):
        self.prompts += prompts
        out = []
        for p in prompts:
            text = p[-1]["content"]
            if "<reply_a>" in text:
                out.append([Completion(self.verdict(text, k), 5, 5, "stop") for k in range(params.n)])
            else:
                out.append([Completion(f"A reply to '{text}' alone.", 5, 5, "stop") for _ in range(params.n)])
        return out

    def close(self):
        pass


@pytest.fixture
def server():
    srv = ChatServer(Scripted(), model_name="judge")
    srv.start()
    yield srv
    srv.stop()


def project(tmp_path: Path, rows: list[dict], stage: str, server=None, name: str = "prefs") -> Path:
    root = tmp_path / name
    write_jsonl(root / "convs.jsonl", rows)
    (root / "r.toml").write_text(
        textwrap.dedent(f"""
        [recipe]
        name = "{name}"
        seed = 11
        [models.judge]
        path = "judge"
        backend = "openai"
        base_url = "{server.url if server else "http://127.0.0.1:9/v1"}"
        [models.tiny]
        path = "builtin:tiny-chat"
        [constitutions.short]
        path = "{CONSTITUTION}"
        [datasets.convs]
        path = "convs.jsonl"
    """)
        + textwrap.dedent(stage)
    )
    return root / "r.toml"


def pairs_of(rec, stage="pairs") -> tuple[list[dict], dict]:
    d = rec.dir / "stages" / stage
    return read_rows(d / "rows.parquet"), json.loads((d / "report.json").read_text())


# --------------------------------------------------------------------------- pure functions


def test_pairwise_label_cancels_position_bias():
    # a judge that always answers "A" prefers a when a is first and b when b is first: a tie
    assert pairwise_label(["A"], ["A"]) == 0.5
    assert pairwise_label(["A"], ["B"]) == 1.0 and pairwise_label(["B"], ["A"]) == 0.0
    assert pairwise_label(["A", "A"], ["B", "A"]) == 0.75
    assert pairwise_label(["A", None], ["B"]) == 1.0  # unparsed votes are left out
    assert pairwise_label(["A"], [None]) is None  # one order alone carries the position bias


@given(st.floats(0, 1))
def test_cot_labels_are_clamped(p):
    assert 0.4 <= soft_label(p, True) <= 0.6 and soft_label(p, False) == p
    assert soft_label(p, True) == p or p < 0.4 or p > 0.6


def test_parse_choice():
    assert parse_choice("Reasoning.\nVerdict: B") == "B" and parse_choice(" (a) ") == "A"
    assert parse_choice("Response B.") == "B" and parse_choice("I cannot decide.") is None
    assert parse_choice("A or B") is None


def test_best_and_worst_and_turns():
    assert best_and_worst([("x", 3.0), ("y", 7.0), ("z", 7.0), ("w", 3.0)]) == ("y", "x", 4.0)
    assert best_and_worst([("x", 3.0), ("y", 7.0)], "lower") == ("x", "y", 4.0)
    assert best_and_worst([("x", 3.0)]) is None
    msgs = conv("u1", "a1", "u2", "a2", "u3", "a3")["messages"]
    assert (
        selected_turns(msgs, None) == [5] and selected_turns(msgs, 1) == [3, 5] and selected_turns(msgs, 0) == [1, 3, 5]
    )


# --------------------------------------------------------------------------- best_vs_worst


SCORED = [
    conv("What is 7 + 5?", reply, id=f"q1#{k}", meta={"source_id": "q1", "answer": "12"})
    for k, reply in enumerate(["It is 13.", "It is 12.", "It is 11."])
] + [
    conv("What is 2 + 2?", reply, id=f"q2#{k}", meta={"source_id": "q2", "answer": "4"})
    for k, reply in enumerate(["4", "Four, i.e. 4."])
]


def test_best_vs_worst_after_a_judge(tmp_path):
    path = project(
        tmp_path,
        SCORED,
        """
        [stages.check]
        kind = "judge"
        input = "convs"
        scorer = "function"
        function = "math_answer"
        name = "correct"
        [stages.pairs]
        kind = "preferences"
        method = "best_vs_worst"
        input = "check"
        score = "correct"
    """,
    )
    rec = run(load_recipe(path), tmp_path / "runs")
    pairs, report = pairs_of(rec)
    assert [p["id"] for p in pairs] == ["q1"]  # q2: both right, no gap
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 7 + 5?"}]
    assert pairs[0]["chosen"][0]["content"] == "It is 12." and pairs[0]["rejected"][0]["content"] == "It is 13."
    assert pairs[0]["meta"]["chosen_id"] == "q1#1" and pairs[0]["meta"]["margin"] == 1.0
    assert report["below_margin"] == 1 and report["comparable_groups"] == 2
    spot = json.loads((rec.dir / "stages" / "pairs" / "pairs_sample.json").read_text())
    assert [p["id"] for p in spot] == ["q1"]
    # zero pairs: an error naming the stage and the knob, and no artifact downstream
    proc = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs", "--set", "stages.pairs.min_margin=2")
    assert proc.returncode == 2
    assert (
        "stage 'pairs' made no preference pairs: no group of samples has a score gap of at least min_margin = 2"
        in proc.stderr
    )
    assert "stages.pairs.min_margin" in proc.stderr and "largest gap: 1" in proc.stderr
    proc = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs", "--set", "stages.pairs.score=nope")
    assert proc.returncode == 2 and "stage 'pairs': no input row has scores.nope" in proc.stderr


# --------------------------------------------------------------------------- pairwise_judge


CANDIDATES = [
    conv("How do I boil an egg?", "GOOD: simmer it for nine minutes.", id="e#0", meta={"source_id": "e"}),
    conv("How do I boil an egg?", "Eggs are oval.", id="e#1", meta={"source_id": "e"}),
    conv("How do I boil an egg?", "Put it in water. GOOD", id="e#2", meta={"source_id": "e"}),
    conv("Name a prime.", "7 is prime.", id="p#0", meta={"source_id": "p"}),  # alone: nothing to compare
    conv("Name a river.", "The Nile.", id="r#0", meta={"source_id": "r"}),
    conv("Name a river.", "GOOD: the Danube.", id="r#1", meta={"source_id": "r"}),
]

PAIRWISE = """
    [stages.pairs]
    kind = "preferences"
    method = "pairwise_judge"
    input = "convs"
    model = "judge"
    constitution = "short"
    max_new_tokens = 64
"""


def test_pairwise_judge_compares_in_both_orders(tmp_path, server):
    rec = run(load_recipe(project(tmp_path, CANDIDATES, PAIRWISE, server)), tmp_path / "runs")
    pairs, report = pairs_of(rec)
    # e: 3 candidates -> 3 pairs, of which (e#0, e#2) both hold GOOD: the verdicts follow position, a tie
    assert [p["id"] for p in pairs] == ["e#0|e#1@1", "e#1|e#2@1", "r#0|r#1@1"]
    assert [(p["meta"]["chosen_id"], p["meta"]["rejected_id"]) for p in pairs] == [
        ("e#0", "e#1"),
        ("e#2", "e#1"),
        ("r#1", "r#0"),
    ]
    assert all("GOOD" in p["chosen"][0]["content"] and p["meta"]["label"] == 1.0 for p in pairs)
    assert pairs[0]["meta"]["verdicts"] == {"a": "e#0", "a_first": ["A"], "b_first": ["B"]}
    assert pairs[0]["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    principles = {"helpful", "honest", "harmless"}
    assert {p["meta"]["principle"] for p in pairs} <= principles
    assert report["compared"] == 4 and report["ties"] == 1 and sum(report["principles"].values()) == 4
    # the drawn principle's comparison question reached the judge, and each pair was asked twice
    judge_prompts = [p[-1]["content"] for p in server.backend.prompts]
    assert len(judge_prompts) == 8 and all("Question: Which reply" in t for t in judge_prompts)
    judged = read_rows(rec.dir / "stages" / "pairs" / "judgments.parquet")
    assert len(judged) == 4 and {j["principle"] for j in judged} <= principles
    # the same recipe draws the same principles (seeded), with no new judge request
    again = run(load_recipe(project(tmp_path, CANDIDATES, PAIRWISE, server)), tmp_path / "runs2")
    assert [p["meta"]["principle"] for p in pairs_of(again)[0]] == [p["meta"]["principle"] for p in pairs]


def test_a_position_biased_judge_makes_no_pairs(tmp_path, server):
    server.backend.mode = "position"
    with pytest.raises(RecipeError) as exc:
        run(load_recipe(project(tmp_path, CANDIDATES, PAIRWISE, server)), tmp_path / "runs")
    msg = str(exc.value)
    assert (
        "stage 'pairs' made no preference pairs: no compared pair reached confidence threshold = 0.5 (4 ties of 4"
        in msg
    )
    assert "share of 'A' verdicts 1.00" in msg and "stages.pairs.threshold" in msg


def test_soft_labels_from_votes_and_threshold(tmp_path, server):
    server.backend.mode = "mixed"  # per order: one vote on content, one on position -> label 0.75
    stage = PAIRWISE + "votes = 2\njudge_temperature = 0.7\n"
    rec = run(load_recipe(project(tmp_path, CANDIDATES, stage, server)), tmp_path / "runs")
    pairs, _ = pairs_of(rec)
    assert len(pairs) == 3 and all(p["meta"]["label"] == 0.75 and p["meta"]["confidence"] == 0.5 for p in pairs)
    with pytest.raises(RecipeError, match="threshold = 0.6"):
        run(load_recipe(project(tmp_path, CANDIDATES, stage + "threshold = 0.6\n", server)), tmp_path / "runs")


def test_chain_of_thought_labels_are_clamped(tmp_path, server):
    rec = run(
        load_recipe(project(tmp_path, CANDIDATES, PAIRWISE + "chain_of_thought = true\n", server)), tmp_path / "runs"
    )
    pairs, _ = pairs_of(rec)
    assert len(pairs) == 3 and all(p["meta"]["label"] == 0.6 and p["meta"]["raw_label"] == 1.0 for p in pairs)
    assert all("step by step" in p[-1]["content"] for p in server.backend.prompts)


def test_a_judge_that_never_parses_fails_the_stage(tmp_path, server):
    server.backend.mode = "garbage"
    with pytest.raises(StageFailed) as exc:
        run(load_recipe(project(tmp_path, CANDIDATES, PAIRWISE, server)), tmp_path / "runs")
    assert exc.value.stage == "pairs" and "no answer of the judge could be parsed (4 pairs" in exc.value.cause


def test_pairwise_needs_candidates_sharing_a_source(tmp_path, server):
    with pytest.raises(RecipeError, match="no two distinct replies share a source"):
        run(load_recipe(project(tmp_path, CANDIDATES[3:5], PAIRWISE, server)), tmp_path / "runs")


# --------------------------------------------------------------------------- revision


def revised(id: str, turns: list[tuple[int, str, str]], *texts: str) -> dict:
    row = conv(*texts, id=id)
    row["meta"] = {
        "scenario": "s",
        "critique_revise": {
            "rounds": 1,
            "after_revision": "keep",
            "turns": [
                {
                    "index": i,
                    "original": o,
                    "final": f,
                    "history": [
                        {
                            "round": 1,
                            "principle": "honest",
                            "critique": "c",
                            "revision": f,
                            "accepted": o != f,
                            "reason": None if o != f else "unchanged",
                        }
                    ],
                }
                for i, o, f in turns
            ],
        },
    }
    return row


REVISED = [
    revised("c1", [(1, "old one", "new one"), (3, "old two", "new two")], "u1", "new one", "u2", "new two"),
    revised("c2", [(1, "same", "same")], "u1", "same"),
    revised("c3", [(1, "first draft", "better draft"), (3, "keep", "keep")], "u1", "better draft", "u2", "keep"),
]


def test_revision_pairs(tmp_path):
    stage = '[stages.pairs]\nkind = "preferences"\nmethod = "revision"\ninput = "convs"\n'
    rec = run(load_recipe(project(tmp_path, REVISED, stage)), tmp_path / "runs")
    pairs, report = pairs_of(rec)
    assert [p["id"] for p in pairs] == ["c1@3"]  # the last turn only; c2 and c3 left theirs unchanged
    p = pairs[0]
    assert p["prompt"] == [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "new one"},
        {"role": "user", "content": "u2"},
    ]
    assert p["chosen"][0]["content"] == "new two" and p["rejected"][0]["content"] == "old two"
    assert p["meta"]["principles"] == ["honest"] and p["meta"]["source_meta"] == {"scenario": "s"}
    assert report["unchanged"] == 2
    rec = run(load_recipe(project(tmp_path, REVISED, stage + "from_turn = 0\n")), tmp_path / "runs")
    pairs, _ = pairs_of(rec)
    assert [p["id"] for p in pairs] == ["c1@1", "c1@3", "c3@1"]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "u1"}]
    # a critic that changed nothing is a measured outcome: a warning and no pairs, not a failed run
    none, report = pairs_of(run(load_recipe(project(tmp_path, REVISED[1:2], stage)), tmp_path / "runs"))
    assert none == [] and report["pairs"] == 0 and report["unchanged"] >= 1
    with pytest.raises(RecipeError, match="no input row has meta.critique_revise"):
        run(load_recipe(project(tmp_path, [conv("u", "a", id="x")], stage)), tmp_path / "runs")
    # a control run: the original is chosen over its revision
    rec = run(load_recipe(project(tmp_path, REVISED, stage + 'prefer = "lower"\n')), tmp_path / "runs")
    (swapped,), _ = pairs_of(rec)
    assert swapped["chosen"][0]["content"] == "old two" and swapped["rejected"][0]["content"] == "new two"


# --------------------------------------------------------------------------- context_negative


MULTI = [
    conv("My name is Ada.", "Nice to meet you, Ada.", "What is my name?", "Your name is Ada.", id="m1"),
    conv("Hi.", "Hello!", id="m2"),
]  # a single turn: nothing earlier to ignore


def test_context_negative_over_http(tmp_path, server):
    stage = '[stages.pairs]\nkind = "preferences"\nmethod = "context_negative"\ninput = "convs"\nmodel = "judge"\n'
    rec = run(load_recipe(project(tmp_path, MULTI, stage, server)), tmp_path / "runs")
    pairs, report = pairs_of(rec)
    assert [p["id"] for p in pairs] == ["m1@3"] and report["first_turns_skipped"] == 1
    assert pairs[0]["prompt"] == MULTI[0]["messages"][:3]
    assert pairs[0]["chosen"][0]["content"] == "Your name is Ada."
    assert pairs[0]["rejected"][0]["content"] == "A reply to 'What is my name?' alone."
    assert server.backend.prompts == [[{"role": "user", "content": "What is my name?"}]]  # the earlier turns dropped


def test_logprob_labels_average_both_orders_so_position_bias_cancels():
    task = {"id": "t", "a": "x", "b": "y"}
    # a judge that always favours the first position by the same margin: no preference left
    [same] = logprob_judgments([task], [[math.log(0.8), math.log(0.2)], [math.log(0.8), math.log(0.2)]])
    assert same["label_a"] == pytest.approx(0.5) and same["a_first"] == same["b_first"] == ["A"]
    # a judge that prefers a in both orders: P(A)=0.9 with a first, P(B)=0.7 with a second
    [pref] = logprob_judgments([task], [[math.log(0.9), math.log(0.1)], [math.log(0.3), math.log(0.7)]])
    assert pref["label_a"] == pytest.approx(0.8) and pref["a_first"] == ["A"] and pref["b_first"] == ["B"]


@pytest.mark.slow
def test_logprob_verdicts_from_the_builtin_judge(tmp_path):
    """A model that cannot write a verdict still gives one by its probabilities of "A" and "B"."""
    import torch

    from engine.models.backends.hf import HFBackend
    from engine.models.weights import load_model

    stage = (
        '[stages.pairs]\nkind = "preferences"\nmethod = "pairwise_judge"\ninput = "convs"\nmodel = "tiny"\n'
        'constitution = "short"\nverdict = "logprobs"\nthreshold = 0.0\n'
    )
    rec = run(load_recipe(project(tmp_path, CANDIDATES, stage)), tmp_path / "runs")
    pairs, report = pairs_of(rec)
    judged = read_rows(rec.dir / "stages" / "pairs" / "judgments.parquet")
    assert len(judged) == report["compared"] > 0 and report["unparsed"] == 0
    assert all(0.0 < t["label_a"] < 1.0 and t["label_a"] != 0.5 for t in judged)
    assert len(pairs) == len(judged) and all(p["meta"]["raw_label"] > 0.5 for p in pairs)
    # option_logprobs matches an unbatched forward pass over prompt + "Verdict: " + option
    model, tok = load_model("builtin:tiny-chat", cache_root=tmp_path / "runs" / "cache")
    backend = HFBackend(model, tok, batch_size=3)
    prompts = [[{"role": "user", "content": "Pick one."}], [{"role": "user", "content": "A longer question here?"}]]
    got = backend.option_logprobs(prompts, "Verdict: ", ["A", "B"])
    for prompt, row in zip(prompts, got):
        head = backend._encode([prompt])[0] + tok.encode("Verdict: ", add_special_tokens=False)
        for option, value in zip(["A", "B"], row):
            tail = tok.encode("Verdict: " + option, add_special_tokens=False)[
                len(head) - len(backend._encode([prompt])[0]) :
            ]
            with torch.no_grad():
                logps = torch.log_softmax(model(torch.tensor([head + tail])).logits.float(), -1)[0]
            assert value == pytest.approx(sum(float(logps[len(head) + j - 1, t]) for j, t in enumerate(tail)), abs=1e-4)


@pytest.mark.slow
def test_context_negative_on_the_builtin_model(tmp_path):
    stage = (
        '[stages.pairs]\nkind = "preferences"\nmethod = "context_negative"\ninput = "convs"\nmodel = "tiny"\n'
        "max_new_tokens = 12\nfrom_turn = 0\n"
    )
    rows = MULTI + [conv("a", "b", "c", "d", "e", "f", id="m3")]
    path = project(tmp_path, rows, stage)
    proc = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    pairs = read_rows(tmp_path / "runs" / "prefs" / "latest" / "stages" / "pairs" / "rows.parquet")
    assert [p["id"] for p in pairs] == ["m1@3", "m3@3", "m3@5"]
    assert pairs[2]["prompt"] == rows[2]["messages"][:5] and pairs[2]["chosen"][0]["content"] == "f"
    assert all(p["rejected"][0]["content"] and p["rejected"] != p["chosen"] for p in pairs)
    show = run_cli_subprocess("show", "prefs", "pairs", "--runs-dir", tmp_path / "runs")
    assert show.returncode == 0 and "spot-check sample" in show.stdout and "3 pairs in pairs_sample.json" in show.stdout


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "stage, expected",
    [
        ('method = "pairwise_judge"\nconstitution = "short"', "method 'pairwise_judge' needs a model"),
        ('method = "pairwise_judge"\nmodel = "judge"', "method 'pairwise_judge' needs a constitution"),
        (
            'method = "pairwise_judge"\nmodel = "judge"\nconstitution = "hh"',
            "uses constitution 'hh', which is not defined",
        ),
        (
            'method = "pairwise_judge"\nmodel = "judge"\nconstitution = "short"\nvotes = 3',
            "votes > 1 with judge_temperature = 0",
        ),
        (
            'method = "pairwise_judge"\nmodel = "judge"\nconstitution = "short"\ntemplate = "judge_pointwise.j2"',
            "uses 'conversation', which stage 'pairs' does not pass",
        ),
        ('method = "best_vs_worst"\nthreshold = 0.9', "threshold is not used by method 'best_vs_worst'"),
        ('method = "revision"\nmodel = "judge"', "model is not used by method 'revision'"),
        ('method = "context_negative"', "method 'context_negative' needs a model"),
        (
            'method = "pairwise_judge"\nmodel = "judge"\nconstitution = "short"\nverdict = "logprobs"',
            "model 'judge' (openai backend) does not give",
        ),
        (
            'method = "pairwise_judge"\nmodel = "tiny"\nconstitution = "short"\nverdict = "logprobs"\nchain_of_thought = true',
            'verdict = "logprobs" reads one probability per order',
        ),
    ],
)
def test_validate_catches_bad_settings(tmp_path, stage, expected):
    path = project(tmp_path, CANDIDATES, f'[stages.pairs]\nkind = "preferences"\ninput = "convs"\n{stage}\n')
    proc = run_cli_subprocess("validate", path)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


def test_constitution_and_template_bytes_enter_the_fingerprint(tmp_path):
    from engine.core.hashing import HashMemo
    from engine.store.fingerprint import fingerprints

    path = project(tmp_path, CANDIDATES, PAIRWISE)
    local = path.parent / "short.toml"
    local.write_text(CONSTITUTION.read_text())
    path.write_text(path.read_text().replace(str(CONSTITUTION), "short.toml"))
    fp = lambda: fingerprints(load_recipe(path), HashMemo(None))["pairs"][0]  # noqa: E731
    first = fp()
    local.write_text(local.read_text().replace("more helpful", "most helpful"))
    second = fp()
    (path.parent / "templates").mkdir()
    (path.parent / "templates" / "pairwise_principle.j2").write_text(
        "{{ context }}{{ response_a }}{{ response_b }}{{ principle }}{{ chain_of_thought }}"
    )
    assert len({first, second, fp()}) == 3


def test_validating_these_stages_stays_light(tmp_path):
    import subprocess
    import sys

    path = project(
        tmp_path,
        CANDIDATES,
        PAIRWISE
        + """
        [stages.best]
        kind = "rejection_sample"
        input = "convs"
        model = "tiny"
        scorer = "llm"
        judge_model = "judge"
        output = "preferences"
    """,
    )
    code = (
        "import sys; from engine.load.loader import load_recipe; load_recipe(sys.argv[1]); "
        "print(sorted(m for m in ('torch','transformers','trl','peft','datasets','matplotlib','numpy') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    assert out.stdout.strip() == "[]"
