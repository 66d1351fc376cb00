"""The generate stage on the builtin model: single and multi-turn, template checks, SIGKILL resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.core.errors import RecipeError
from engine.data.rows import read_rows
from engine.load.loader import load_recipe
from stages.generate import parse_teacher

from conftest import ROOT, run_cli_subprocess, write_jsonl

RECIPE = """
[recipe]
name = "gen"
seed = 3

[models.policy]
path = "builtin:tiny-chat"

[datasets.seeds]
path = "data/seeds.jsonl"
type = "prompts"

[stages.single]
kind = "generate"
input = "seeds"
model = "policy"
n = 2
max_new_tokens = 16
temperature = 0.9

[stages.multi]
kind = "generate"
mode = "multi_turn"
input = "seeds"
model = "policy"
turns = 2
max_new_tokens = 16
system_prompt = "You are a careful assistant."
shard_size = 2
"""


@pytest.fixture
def gen_project(tmp_path: Path) -> Path:
    root = tmp_path / "gen"
    write_jsonl(
        root / "data" / "seeds.jsonl",
        [{"id": f"s{i}", "prompt": f"Scenario {i}: someone asks about topic {i}."} for i in range(8)],
    )
    (root / "recipe.toml").write_text(textwrap.dedent(RECIPE))
    return root


def test_template_variables_are_checked_at_validation(gen_project):
    (gen_project / "templates").mkdir()
    (gen_project / "templates" / "ask.j2").write_text("### user\nAbout {{ row.prompt }}:\n{{ tone }}\n")
    text = (gen_project / "recipe.toml").read_text().replace("n = 2\n", 'n = 2\ntemplate = "ask.j2"\n', 1)
    (gen_project / "recipe.toml").write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(gen_project / "recipe.toml")
    [p] = info.value.problems
    assert p.key == "stages.single.template" and p.line is not None
    assert (
        "template ask.j2 line 3 uses 'tone', which stage 'single' does not pass. Available: meta, prompt, row."
        in p.message
    )


def test_recipe_local_template_shadows_and_enters_the_fingerprint(gen_project):
    from engine.run.plan import make_plan

    (gen_project / "templates").mkdir()
    local = gen_project / "templates" / "user_simulator.j2"
    local.write_text(
        "### user\nContinue: {{ scenario }} ({{ turn }}/{{ turns }}) {{ conversation | length }} {{ persona }}\n"
    )
    r = load_recipe(gen_project / "recipe.toml")
    before = {p.name: p.fingerprint for p in make_plan(r, gen_project / "runs")}
    local.write_text(local.read_text() + "Be brief.\n")
    plan = {p.name: p for p in make_plan(load_recipe(gen_project / "recipe.toml"), gen_project / "runs")}
    assert plan["multi"].fingerprint != before["multi"] and plan["single"].fingerprint == before["single"]


def test_parse_teacher():
    good = {
        "scenario_safe": True,
        "turns": [{"index": 1, "role": "user", "text": "hi"}, {"index": 2, "role": "assistant", "text": "hello"}],
        "behaviors": ["callback"],
        "coherence": {"all_turns_advance": True, "breaks_at": None, "why": "ok"},
        "decision_basis": "fine",
    }
    assert parse_teacher("Here you go:\n" + json.dumps(good) + "\nDone.").turns[1].text == "hello"
    bad_roles = dict(
        good, turns=[{"index": 1, "role": "assistant", "text": "x"}, {"index": 2, "role": "user", "text": "y"}]
    )
    assert parse_teacher(json.dumps(bad_roles)) is None
    assert parse_teacher("not json at all") is None
    assert parse_teacher(json.dumps(dict(good, coherence="yes"))) is None


@pytest.mark.slow
def test_generate_runs_and_outputs_conversations(gen_project, tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli_subprocess("run", gen_project / "recipe.toml", "--runs-dir", runs)
    assert proc.returncode == 0, proc.stderr
    single = read_rows(runs / "gen" / "latest" / "stages" / "single" / "rows.parquet")
    multi = read_rows(runs / "gen" / "latest" / "stages" / "multi" / "rows.parquet")
    assert len(single) <= 16 and {r["meta"]["sample"] for r in single} <= {0, 1}
    for r in single:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["meta"]["model"] == "policy"
    for r in multi:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "user", "assistant"]
        assert r["meta"]["tokens"]["completion"] > 0 and r["meta"]["source_id"].startswith("s")


@pytest.mark.slow
def test_sigkill_mid_generation_then_resume_equals_uninterrupted(gen_project, tmp_path):
    runs, fresh = tmp_path / "runs", tmp_path / "fresh"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "run",
        str(gen_project / "recipe.toml"),
        "--runs-dir",
        str(runs),
        "--only",
        "multi",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((runs / "cache" / "partial").glob("*/shard-000001")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = list((runs / "cache" / "partial").glob("*/shard-*"))
    assert 1 <= len(shards) < 4, "killed mid-stage"
    assert run_cli_subprocess("run", gen_project / "recipe.toml", "--runs-dir", runs, "--only", "multi").returncode == 0
    assert "resumed:" in (runs / "gen" / "latest" / "logs" / "multi.log").read_text()
    assert (
        run_cli_subprocess("run", gen_project / "recipe.toml", "--runs-dir", fresh, "--only", "multi").returncode == 0
    )
    a = read_rows(runs / "gen" / "latest" / "stages" / "multi" / "rows.parquet")
    b = read_rows(fresh / "gen" / "latest" / "stages" / "multi" / "rows.parquet")
    assert a == b and len(a) == 8


def test_unknown_local_model_path_fails_validation(gen_project):
    text = (gen_project / "recipe.toml").read_text().replace('path = "builtin:tiny-chat"', 'path = "./models/nope"')
    (gen_project / "recipe.toml").write_text(text)
    proc = run_cli_subprocess("validate", gen_project / "recipe.toml")
    assert (
        proc.returncode == 2 and "models.policy.path: file not found" in proc.stderr and "Traceback" not in proc.stderr
    )


@pytest.mark.slow
def test_a_model_without_a_chat_template_is_a_clear_error(gen_project, tmp_path):
    import shutil

    from engine.models.builtins import builtin_dir

    model_dir = tmp_path / "plain-model"
    shutil.copytree(builtin_dir("tiny-chat", tmp_path / "c"), model_dir)
    (model_dir / "chat_template.jinja").unlink()
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    text = (gen_project / "recipe.toml").read_text().replace('path = "builtin:tiny-chat"', f'path = "{model_dir}"')
    (gen_project / "recipe.toml").write_text(text)
    proc = run_cli_subprocess("run", gen_project / "recipe.toml", "--runs-dir", tmp_path / "runs", "--only", "single")
    assert proc.returncode == 2, proc.stderr
    assert "model 'policy' has no chat template" in proc.stderr and "Traceback" not in proc.stderr
