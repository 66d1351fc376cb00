"""The judge stage: parsing verdicts, rules and function scorers (the builtin math_answer verifier
included), reward model, unparseable judges, scorers shared through make_scorer."""

from __future__ import annotations

import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.data.rows import read_rows
from engine.lib.scoring import parse_score, parse_verdict, rule_scores
from engine.lib.verifiers import last_number, math_answer, names, parse_answer, resolve

from conftest import GOOD, conv, run_cli_subprocess, write_jsonl

HEAD = """
[recipe]
name = "j"
[models.judge]
path = "builtin:tiny-chat"
[datasets.convs]
path = "data/convs.jsonl"
"""


def project(tmp_path: Path, stage: str, rows=None) -> Path:
    root = tmp_path / "j"
    write_jsonl(root / "data" / "convs.jsonl", rows or GOOD[:6])
    (root / "recipe.toml").write_text(textwrap.dedent(HEAD) + textwrap.dedent(stage))
    return root / "recipe.toml"


def test_parse_score_takes_the_last_valid_line():
    assert parse_score("Thinking... Score: 3 would be harsh.\nScore: 8") == 8.0
    assert parse_score("**Score:** 7.5") == 7.5
    assert parse_score("Score: 11") is None and parse_score("no verdict") is None
    assert parse_verdict("A is longer.\nVerdict: B") == "B" and parse_verdict("Verdict: maybe") is None


@given(st.integers(1, 10), st.text(alphabet=st.characters(blacklist_characters="\n", codec="utf-8"), max_size=40))
def test_parse_score_finds_any_final_score(n, reasoning):
    assert parse_score(f"{reasoning}\nScore: {n}") == float(n)


def test_rule_scores():
    s = rule_scores(conv("hi", "Great question! I can't help with that.")["messages"])
    assert s["refusal"] == 1.0 and s["sycophancy"] == 1.0 and s["words"] == 7


def test_rules_scorer_adds_scores(tmp_path):
    path = project(
        tmp_path,
        """
        [stages.rules]
        kind = "judge"
        input = "convs"
        scorer = "rules"
    """,
    )
    runs = tmp_path / "runs"
    assert run_cli_subprocess("run", path, "--runs-dir", runs).returncode == 0
    rows = read_rows(runs / "j" / "latest" / "stages" / "rules" / "rows.parquet")
    assert len(rows) == 6 and rows[0]["scores"]["score.refusal"] == 0.0 and rows[0]["scores"]["score.words"] > 5


def test_function_scorer_from_an_entry_point(tmp_path):
    plugin = tmp_path / "plugin"
    (plugin / "myscorers-0.1.dist-info").mkdir(parents=True)
    (plugin / "myscorers-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: myscorers\nVersion: 0.1\n"
    )
    (plugin / "myscorers-0.1.dist-info" / "entry_points.txt").write_text(
        "[recipe.scorers]\nlength = myscorers:length\n"
    )
    (plugin / "myscorers.py").write_text("def length(row):\n    return len(row['messages'][-1]['content'])\n")
    path = project(
        tmp_path,
        """
        [stages.len]
        kind = "judge"
        input = "convs"
        scorer = "function"
        function = "length"
        name = "chars"
    """,
    )
    runs = tmp_path / "runs"
    proc = run_cli_subprocess("run", path, "--runs-dir", runs, env_extra={"PYTHONPATH": f"{Path.cwd()}:{plugin}"})
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(runs / "j" / "latest" / "stages" / "len" / "rows.parquet")
    assert [r["scores"]["chars"] for r in rows] == [float(len(r["messages"][-1]["content"])) for r in rows]
    bad = run_cli_subprocess(
        "validate", path, "--set", "stages.len.function=nope", env_extra={"PYTHONPATH": f"{Path.cwd()}:{plugin}"}
    )
    assert bad.returncode == 2 and "no scorer function 'nope' is registered" in bad.stderr and "length" in bad.stderr


def test_llm_scorer_needs_a_model(tmp_path):
    path = project(
        tmp_path,
        """
        [stages.j]
        kind = "judge"
        input = "convs"
    """,
    )
    proc = run_cli_subprocess("validate", path)
    assert proc.returncode == 2 and "scorer 'llm' needs a model" in proc.stderr


@pytest.mark.slow
def test_reward_model_scores_deterministically(tmp_path):
    path = project(
        tmp_path,
        """
        [stages.rm]
        kind = "judge"
        input = "convs"
        scorer = "reward_model"
        model = "judge"
    """,
    )
    a, b = tmp_path / "a", tmp_path / "b"
    for runs in (a, b):
        assert run_cli_subprocess("run", path, "--runs-dir", runs).returncode == 0
    ra = [r["scores"]["score"] for r in read_rows(a / "j" / "latest" / "stages" / "rm" / "rows.parquet")]
    rb = [r["scores"]["score"] for r in read_rows(b / "j" / "latest" / "stages" / "rm" / "rows.parquet")]
    assert ra == rb and len(set(ra)) > 1


@pytest.mark.slow
def test_a_judge_whose_answers_never_parse_fails_the_stage(tmp_path):
    # the builtin model is random: it never writes "Score: N"
    path = project(
        tmp_path,
        """
        [stages.j]
        kind = "judge"
        input = "convs"
        model = "judge"
        max_new_tokens = 8
        max_retries = 1
    """,
    )
    proc = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 1
    assert "no answer of the judge could be parsed (6 rows)" in proc.stderr
    assert "rows got no parseable score" in proc.stderr


def test_pairwise_checks_the_input_type(tmp_path):
    path = project(
        tmp_path,
        """
        [stages.pw]
        kind = "judge"
        input = "convs"
        scorer = "pairwise"
        model = "judge"
    """,
    )
    proc = run_cli_subprocess("validate", path)
    assert (
        proc.returncode == 2 and "scorer 'pairwise' scores preferences, but 'convs' gives conversations" in proc.stderr
    )


def test_pairwise_label_swaps_order(monkeypatch):
    from types import SimpleNamespace

    from engine.lib.scoring import _Pairwise
    from engine.models.backends import Completion
    from engine.store.shards import Shard
    from stages.judge import Config

    class Fake:  # always answers "A": pure position bias, which the swap must cancel
        def generate(self, prompts, params, seed):
            return [[Completion("Verdict: A", 1, 1, "stop")] for _ in prompts]

    cfg = Config(kind="judge", input="p", scorer="pairwise", model="m")
    from engine.core.seeds import Seeds

    ctx = SimpleNamespace(
        templates=lambda: __import__("engine.lib.prompts", fromlist=["Templates"]).Templates([]),
        backend=lambda *a: Fake(),
        seeds=Seeds(1, "fp"),
    )
    scorer = _Pairwise(cfg, {"model": None}, ctx)
    row = {
        "id": "r0",
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    [out] = scorer(Shard(0, 0, [row], seed=1))
    assert out == {"score": 0.5, "score_position_consistent": False}


# --------------------------------------------------------------------------- builtin function scorers


def reply(text: str, answer=None, where: str = "meta") -> dict:
    row = conv("What is the total?", text)
    if where == "meta":
        row["meta"] = {"answer": answer}
    else:
        row["answer"] = answer
    return row


def test_math_answer_on_hand_written_replies():
    assert math_answer(reply("7 + 5 = 12, so the answer is 12.", "12")) == 1.0
    assert math_answer(reply("First 3 boxes, then 4 more: 7 boxes in all.", 7)) == 1.0
    assert math_answer(reply("It is 12, or maybe 13.", "12")) == 0.0  # the last number counts
    assert math_answer(reply("The total is $1,234.50.", "1234.5")) == 1.0
    assert math_answer(reply("Temperature drops to -8 degrees.", "-8")) == 1.0
    assert math_answer(reply("5-3 leaves 2", "-3")) == 0.0  # "5-3" is a subtraction, not -3
    assert math_answer(reply("Half: 1/2", "0.5")) == 1.0 and math_answer(reply("That is 0.50", "1/2")) == 1.0
    assert math_answer(reply("I don't know.", "4")) == 0.0
    assert math_answer(reply("42", 42, where="row")) == 1.0
    assert math_answer(reply("42")) is None  # no answer to compare against
    assert math_answer({"messages": [{"role": "user", "content": "q"}], "meta": {"answer": "1"}}) is None
    with pytest.raises(ValueError, match="is not one number"):
        math_answer(reply("3", "three"))


@given(
    st.integers(-(10**9), 10**9),
    st.text(alphabet=st.characters(categories=["L", "Zs"]), max_size=30),
    st.sampled_from(["{:d}", "{:,d}", "{:d}.0", "{:d}.00"]),
)
def test_last_number_reads_any_final_integer(n, prefix, fmt):
    written = fmt.format(n)
    assert last_number(f"{prefix} 17 then {prefix} {written}.") == n
    assert math_answer(reply(f"{prefix} so: {written}", str(n))) == 1.0


@given(st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_parse_answer_and_reply_agree_on_decimals(d):
    assert last_number(f"The result is {d}.") == Fraction(d) == parse_answer(str(d))


def test_builtin_scorers_come_first():
    assert names()[0] == "math_answer" and resolve("math_answer") is math_answer
    with pytest.raises(KeyError):
        resolve("no-such-scorer")


def test_judge_uses_the_builtin_math_answer(tmp_path):
    rows = [
        conv("What is 2 + 2?", "It is 4.", id="a", answer="4"),
        conv("What is 3 * 3?", "It is 6.", id="b", answer="9"),
        conv("Say hi.", "Hi!", id="c"),
    ]
    path = project(
        tmp_path,
        """
        [stages.math]
        kind = "judge"
        input = "convs"
        scorer = "function"
        function = "math_answer"
    """,
        rows,
    )
    runs = tmp_path / "runs"
    proc = run_cli_subprocess("run", path, "--runs-dir", runs)
    assert proc.returncode == 0, proc.stderr
    out = read_rows(runs / "j" / "latest" / "stages" / "math" / "rows.parquet")
    assert [r["scores"]["score"] for r in out] == [1.0, 0.0, None]
    assert "1 of 3 rows got no parseable score" in proc.stderr
    bad = run_cli_subprocess("validate", path, "--set", "stages.math.function=maths_answer")
    assert bad.returncode == 2 and "no scorer function 'maths_answer' is registered" in bad.stderr
    assert "Known: math_answer" in bad.stderr


def test_make_scorer_lends_a_backend_and_leaves_it_open():
    from types import SimpleNamespace

    from engine.lib.prompts import Templates
    from engine.lib.scoring import ScorerSpec, make_scorer
    from engine.models.backends import Completion
    from engine.store.shards import Shard

    class Lent:
        closed = False

        def generate(self, prompts, params, seed):
            return [[Completion("Fine.\nScore: 7", 1, 1, "stop")] for _ in prompts]

        def close(self):
            self.closed = True

    lent = Lent()
    from engine.core.seeds import Seeds

    ctx = SimpleNamespace(
        templates=lambda: Templates([]), backend=lambda *a: pytest.fail("must not load a model"), seeds=Seeds(1, "fp")
    )
    scorer = make_scorer(ScorerSpec(scorer="llm", name="q"), None, ctx, backend=lent)
    [out] = scorer(Shard(0, 0, [conv("hi", "hello", id="c0")], seed=1))
    scorer.close()
    assert out["q"] == 7.0 and out["q_answer"].endswith("Score: 7") and not lent.closed
