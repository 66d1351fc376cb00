"""The judge stage: parsing verdicts, rules and function scorers, reward model, unparseable judges."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import GOOD, conv, run_cli_subprocess, write_jsonl
from engine.rows import read_rows
from stages.judge import parse_score, parse_verdict, rule_scores

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
    path = project(tmp_path, """
        [stages.rules]
        kind = "judge"
        input = "convs"
        scorer = "rules"
    """)
    runs = tmp_path / "runs"
    assert run_cli_subprocess("run", path, "--runs-dir", runs).returncode == 0
    rows = read_rows(runs / "j" / "latest" / "stages" / "rules" / "rows.parquet")
    assert len(rows) == 6 and rows[0]["scores"]["score.refusal"] == 0.0 and rows[0]["scores"]["score.words"] > 5


def test_function_scorer_from_an_entry_point(tmp_path):
    plugin = tmp_path / "plugin"
    (plugin / "myscorers-0.1.dist-info").mkdir(parents=True)
    (plugin / "myscorers-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: myscorers\nVersion: 0.1\n")
    (plugin / "myscorers-0.1.dist-info" / "entry_points.txt").write_text("[recipe.scorers]\nlength = myscorers:length\n")
    (plugin / "myscorers.py").write_text("def length(row):\n    return len(row['messages'][-1]['content'])\n")
    path = project(tmp_path, """
        [stages.len]
        kind = "judge"
        input = "convs"
        scorer = "function"
        function = "length"
        name = "chars"
    """)
    runs = tmp_path / "runs"
    proc = run_cli_subprocess("run", path, "--runs-dir", runs, env_extra={"PYTHONPATH": f"{Path.cwd()}:{plugin}"})
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(runs / "j" / "latest" / "stages" / "len" / "rows.parquet")
    assert [r["scores"]["chars"] for r in rows] == [float(len(r["messages"][-1]["content"])) for r in rows]
    bad = run_cli_subprocess("validate", path, "--set", "stages.len.function=nope", env_extra={"PYTHONPATH": f"{Path.cwd()}:{plugin}"})
    assert bad.returncode == 2 and "no scorer function 'nope' is registered" in bad.stderr and "length" in bad.stderr


def test_llm_scorer_needs_a_model(tmp_path):
    path = project(tmp_path, """
        [stages.j]
        kind = "judge"
        input = "convs"
    """)
    proc = run_cli_subprocess("validate", path)
    assert proc.returncode == 2 and "scorer 'llm' needs a model" in proc.stderr


@pytest.mark.slow
def test_reward_model_scores_deterministically(tmp_path):
    path = project(tmp_path, """
        [stages.rm]
        kind = "judge"
        input = "convs"
        scorer = "reward_model"
        model = "judge"
    """)
    a, b = tmp_path / "a", tmp_path / "b"
    for runs in (a, b):
        assert run_cli_subprocess("run", path, "--runs-dir", runs).returncode == 0
    ra = [r["scores"]["score"] for r in read_rows(a / "j" / "latest" / "stages" / "rm" / "rows.parquet")]
    rb = [r["scores"]["score"] for r in read_rows(b / "j" / "latest" / "stages" / "rm" / "rows.parquet")]
    assert ra == rb and len(set(ra)) > 1


@pytest.mark.slow
def test_a_judge_whose_answers_never_parse_fails_the_stage(tmp_path):
    # the builtin model is random: it never writes "Score: N"
    path = project(tmp_path, """
        [stages.j]
        kind = "judge"
        input = "convs"
        model = "judge"
        max_new_tokens = 8
        max_retries = 1
    """)
    proc = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 1
    assert "no answer of the judge could be parsed (6 rows)" in proc.stderr
    assert "rows got no parseable score" in proc.stderr


def test_pairwise_checks_the_input_type(tmp_path):
    path = project(tmp_path, """
        [stages.pw]
        kind = "judge"
        input = "convs"
        scorer = "pairwise"
        model = "judge"
    """)
    proc = run_cli_subprocess("validate", path)
    assert proc.returncode == 2 and "scorer 'pairwise' scores preferences, but 'convs' gives conversations" in proc.stderr


def test_pairwise_label_swaps_order(monkeypatch):
    from types import SimpleNamespace

    from engine.backends import Completion
    from engine.shards import Shard
    from stages.judge import Config, _Pairwise

    class Fake:  # always answers "A": pure position bias, which the swap must cancel
        def generate(self, prompts, params, seed):
            return [[Completion("Verdict: A", 1, 1, "stop")] for _ in prompts]

    cfg = Config(kind="judge", input="p", scorer="pairwise", model="m")
    ctx = SimpleNamespace(templates=lambda: __import__("engine.templates", fromlist=["Templates"]).Templates([]),
                          backend=lambda *a: Fake())
    scorer = _Pairwise(cfg, {"model": None}, ctx)
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    [out] = scorer(Shard(0, 0, [row], seed=1))
    assert out == {"score": 0.5, "score_position_consistent": False}
