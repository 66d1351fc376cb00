"""Every file in recipes/ validates; slow tests run each one end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_cli_subprocess
from engine.recipe import load_recipe

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.toml"))


def test_there_are_shipped_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_opens_with_its_command(path: Path):
    load_recipe(path)
    head = path.read_text().splitlines()[:6]
    assert any(f"recipe run recipes/{path.name}" in line for line in head), "open with the command that runs it"


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_end_to_end_and_then_is_cached(path: Path, tmp_path):
    runs = tmp_path / "runs"
    first = run_cli_subprocess("run", path, "--runs-dir", runs, timeout=900)
    assert first.returncode == 0, first.stderr
    plan = json.loads(run_cli_subprocess("plan", path, "--runs-dir", runs, "--json").stdout)
    assert {s["status"] for s in plan["stages"]} == {"cached"}


def test_seed_data_filter_removes_what_was_planted(tmp_path):
    """The shipped seed pool carries deliberately flawed rows (topic = the flaw): the shipped
    filter settings must remove every one of them and keep the good ones."""
    from engine.executor import run
    from engine.rows import read_rows

    recipe = load_recipe(ROOT / "recipes" / "filter_conversations.toml")
    rec = run(recipe, tmp_path / "runs")
    entry = rec.dir / "stages" / "clean"
    kept = read_rows(entry / "rows.parquet")
    dropped = read_rows(entry / "dropped.parquet")
    flaws = {"filler", "sycophancy", "exact_duplicate", "near_duplicate", "too_short"}
    assert not [r["id"] for r in kept if r["meta"].get("topic") in flaws]
    assert {r["meta"]["topic"] for r in dropped} <= flaws
    refusals = read_rows(rec.dir / "stages" / "refusals" / "rows.parquet")
    assert refusals and all(r["meta"].get("topic") not in flaws for r in refusals)
