"""Stages through the openai backend against a real local HTTP server. The server's backend
is scripted (a stand-in for a capable model), so the parsing paths that a random tiny model
never reaches run end to end: teacher JSON with retries, and a pointwise judge."""

from __future__ import annotations

import json
import textwrap

import pytest

from engine.data.rows import read_rows
from engine.load.loader import load_recipe
from engine.models.backends import Completion
from engine.run.executor import run

from chatserver import ChatServer
from conftest import GOOD, write_jsonl

TEACHER = {
    "scenario_safe": True,
    "turns": [
        {"index": 1, "role": "user", "text": "How do I start running?"},
        {"index": 2, "role": "assistant", "text": "Begin with short run-walk intervals three times a week."},
        {"index": 3, "role": "user", "text": "And shoes?"},
        {"index": 4, "role": "assistant", "text": "Get fitted at a running shop; comfort matters most."},
    ],
    "behaviors": ["callback"],
    "coherence": {"all_turns_advance": True, "breaks_at": None, "why": "each turn builds"},
    "decision_basis": "safe everyday topic",
}


class Scripted:
    """Answers like a model that follows the built-in templates: malformed JSON on the first
    teacher attempt for scenario 0 (to exercise retries), a Score line for judge prompts."""

    name = "scripted"

    def __init__(self) -> None:
        self.failed_once = False

    def generate(self, prompts, params, seed):
        out = []
        for messages in prompts:
            text = messages[-1]["content"]
            if "Score:" in text:
                answer = f"The reply is relevant.\nScore: {len(text) % 10 + 1}"
            elif "Scenario 0" in text and not self.failed_once:
                self.failed_once, answer = True, "{not json"
            else:
                answer = "```json\n" + json.dumps(TEACHER) + "\n```"
            out.append([Completion(answer, 10, 5, "stop") for _ in range(params.n)])
        return out

    def close(self):
        pass


@pytest.fixture
def server():
    srv = ChatServer(Scripted(), model_name="scripted-judge")
    srv.start()
    yield srv
    srv.stop()


def test_teacher_json_and_llm_judge_over_http(tmp_path, server):
    root = tmp_path / "p"
    write_jsonl(
        root / "seeds.jsonl",
        [{"id": f"s{i}", "prompt": f"Scenario {i}: a beginner asks about running."} for i in range(3)],
    )
    write_jsonl(root / "convs.jsonl", GOOD[:4])
    (root / "r.toml").write_text(
        textwrap.dedent(f"""
        [recipe]
        name = "http"
        [models.teacher]
        path = "scripted-judge"
        backend = "openai"
        base_url = "{server.url}"
        [datasets.seeds]
        path = "seeds.jsonl"
        type = "prompts"
        [datasets.convs]
        path = "convs.jsonl"
        [stages.convs_out]
        kind = "generate"
        mode = "teacher_json"
        input = "seeds"
        model = "teacher"
        turns = 2
        [stages.judged]
        kind = "judge"
        input = "convs"
        model = "teacher"
    """)
    )
    rec = run(load_recipe(root / "r.toml"), tmp_path / "runs")
    rows = read_rows(rec.dir / "stages" / "convs_out" / "rows.parquet")
    assert len(rows) == 3
    assert rows[0]["messages"][1]["content"].startswith("Begin with short")
    assert rows[0]["meta"]["behaviors"] == ["callback"] and rows[0]["meta"]["coherence"]["all_turns_advance"]
    assert max(r["meta"]["attempts"] for r in rows) == 2  # the malformed first answer was retried
    judged = read_rows(rec.dir / "stages" / "judged" / "rows.parquet")
    assert all(1 <= r["scores"]["score"] <= 10 for r in judged)
    assert all(r["scores"]["score_answer"].endswith(f"Score: {int(r['scores']['score'])}") for r in judged)
    calls = server.requests
    run(load_recipe(root / "r.toml"), tmp_path / "runs")  # fully cached: no request reaches the server
    assert server.requests == calls


class NeverJson(Scripted):
    """A teacher that never writes the JSON asked for; judge prompts still get a score."""

    def generate(self, prompts, params, seed):
        return [
            [
                Completion(
                    "Score: 7" if "Score:" in m[-1]["content"] else "Sure! Here is a conversation: {oops", 10, 5, "stop"
                )
                for _ in range(params.n)
            ]
            for m in prompts
        ]


def test_a_failed_stage_leaves_a_sample_of_the_bad_output_and_the_other_branch_still_runs(tmp_path):
    from engine.core.errors import StageFailed

    srv = ChatServer(NeverJson(), model_name="scripted-judge")
    srv.start()
    try:
        root = tmp_path / "p"
        write_jsonl(root / "seeds.jsonl", [{"id": f"s{i}", "prompt": f"Scenario {i}."} for i in range(2)])
        write_jsonl(root / "convs.jsonl", GOOD[:4])
        (root / "r.toml").write_text(
            textwrap.dedent(f"""
            [recipe]
            name = "kg"
            [models.teacher]
            path = "scripted-judge"
            backend = "openai"
            base_url = "{srv.url}"
            [datasets.seeds]
            path = "seeds.jsonl"
            type = "prompts"
            [datasets.convs]
            path = "convs.jsonl"
            [stages.convs_out]
            kind = "generate"
            mode = "teacher_json"
            input = "seeds"
            model = "teacher"
            turns = 2
            max_retries = 1
            [stages.clean_out]
            kind = "filter"
            input = "convs_out"
            [stages.judged]
            kind = "judge"
            input = "convs"
            model = "teacher"
        """)
        )
        runs = tmp_path / "runs"
        with pytest.raises(StageFailed, match="a teacher output that did not parse: .*Sure! Here is a conversation"):
            run(load_recipe(root / "r.toml"), runs)
        record = json.loads((runs / "kg" / "latest" / "record.json").read_text())
        stages = record["stages"]
        assert stages["convs_out"]["status"] == "failed"
        assert stages["clean_out"]["status"] == "skipped" and stages["clean_out"]["reasons"] == [
            "needs 'convs_out', which failed"
        ]
        assert stages["judged"]["status"] == "run"  # the independent branch ran (make -k)
        log = (runs / "kg" / "latest" / "logs" / "convs_out.log").read_text()
        assert "a sample of teacher output that did not parse" in log and "{oops" in log
        with pytest.raises(StageFailed):  # --fail-fast: nothing after the failure starts
            run(load_recipe(root / "r.toml"), tmp_path / "runs2", fail_fast=True)
        record = json.loads((tmp_path / "runs2" / "kg" / "latest" / "record.json").read_text())
        assert "judged" not in record["stages"] or record["stages"]["judged"]["status"] != "run"
    finally:
        srv.stop()


def test_an_api_key_named_by_api_key_env_is_in_no_file_of_the_run(tmp_path, monkeypatch):
    secret = "sk-recipe-test-7f3a9c-secret"
    srv = ChatServer(Scripted(), model_name="scripted-judge", api_key=secret)
    srv.start()
    try:
        monkeypatch.setenv("JUDGE_KEY", secret)
        root = tmp_path / "p"
        write_jsonl(root / "convs.jsonl", GOOD[:4])
        (root / "r.toml").write_text(
            textwrap.dedent(f"""
            [recipe]
            name = "secret"
            [models.teacher]
            path = "scripted-judge"
            backend = "openai"
            base_url = "{srv.url}"
            api_key_env = "JUDGE_KEY"
            [datasets.convs]
            path = "convs.jsonl"
            [stages.judged]
            kind = "judge"
            input = "convs"
            model = "teacher"
        """)
        )
        runs = tmp_path / "runs"
        run(load_recipe(root / "r.toml"), runs)
        from engine.report.runreport import write_run_report

        write_run_report(runs / "secret" / "latest")
        files = [p for p in runs.rglob("*") if p.is_file()]
        assert len(files) > 5
        assert not [p for p in files if secret.encode() in p.read_bytes()]
    finally:
        srv.stop()
