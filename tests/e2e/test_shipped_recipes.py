"""Every file in recipes/ validates; slow tests run each one end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.load.loader import load_recipe

from conftest import ROOT, run_cli_subprocess

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.toml"))
# The alignment recipe and its control train a real model for about 20 minutes each at their
# shipped sizes: tests/e2e/test_alignment.py runs them at reduced size, bench/alignment.py in full.
# The flagship runs at reduced size once per session (conftest.reduced_flagship), checked below.
QUICK = [p for p in RECIPES if not p.name.startswith("align_smollm2") and p.name != "caI_multiturn.toml"]


def test_there_are_shipped_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_opens_with_its_command(path: Path):
    load_recipe(path)
    head = path.read_text().splitlines()[:6]
    assert any(f"recipe run recipes/{path.name}" in line for line in head), "open with the command that runs it"


@pytest.mark.slow
@pytest.mark.parametrize("path", QUICK, ids=lambda p: p.name)
def test_recipe_runs_end_to_end_and_then_is_cached(path: Path, tmp_path):
    runs = tmp_path / "runs"
    first = run_cli_subprocess("run", path, "--runs-dir", runs, timeout=900)
    assert first.returncode == 0, first.stderr
    plan = json.loads(run_cli_subprocess("plan", path, "--runs-dir", runs, "--json").stdout)
    assert {s["status"] for s in plan["stages"]} == {"cached"}
    name = load_recipe(path).name
    run_dir = (runs / name / "latest").resolve()
    assert (run_dir / "report.md").is_file() and (run_dir / "report.html").is_file()
    CHECKS.get(path.name, lambda *a: None)(run_dir, runs, name)


@pytest.mark.slow
def test_the_flagship_at_reduced_size_runs_end_to_end_and_then_is_cached(reduced_flagship):
    from conftest import FLAGSHIP, REDUCED_FLAGSHIP, set_args

    runs = reduced_flagship.parent.parent
    plan = json.loads(
        run_cli_subprocess("plan", FLAGSHIP, *set_args(REDUCED_FLAGSHIP), "--runs-dir", runs, "--json").stdout
    )
    assert {s["status"] for s in plan["stages"]} == {"cached"}
    assert (reduced_flagship / "report.md").is_file() and (reduced_flagship / "report.html").is_file()
    check_flagship(reduced_flagship, runs, "cai-multiturn")


def _report(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "stages" / stage / "report.json").read_text())


def check_flagship(run_dir: Path, runs: Path, name: str) -> None:
    """Every step of the pipeline made something, and the eval compares base, SFT and DPO."""
    from engine.data.rows import read_rows

    record = json.loads((run_dir / "record.json").read_text())
    assert all(s["status"] == "run" for s in record["stages"].values())
    revised = read_rows(run_dir / "stages" / "revised" / "rows.parquet")
    history = revised[0]["meta"]["revisions"] if "revisions" in revised[0]["meta"] else revised[0]["meta"]
    assert history, "critique_revise keeps its history in meta"
    pairs = read_rows(run_dir / "stages" / "revision_pairs" / "rows.parquet")
    assert pairs and all(p["prompt"][-1]["role"] == "user" for p in pairs)
    assert _report(run_dir, "dpo")["reference"].endswith("with the LoRA adapter disabled (frozen base)")
    assert [m["input"] for m in _report(run_dir, "dpo")["mixture"]] == ["revision_pairs", "best_of_n"]
    assert _report(run_dir, "eval")["models"] == ["policy", "sft", "dpo"]
    md = (run_dir / "report.md").read_text()
    assert "## Eval: eval" in md and "| metric | policy | sft | dpo |" in md and "builtin:tiny-chat" in md
    shown = run_cli_subprocess("show", name, "eval", "-n", "0", "--runs-dir", runs)
    assert shown.returncode == 0 and re.search(r"metric\s*┃\s*policy\s*┃\s*sft\s*┃\s*dpo", shown.stdout), shown.stdout


def check_rft(run_dir: Path, runs: Path, name: str) -> None:
    """Two rounds, each keeping only verified samples; status shows each round's diversity."""
    from engine.data.rows import read_rows

    for k in (1, 2):
        kept = read_rows(run_dir / "stages" / f"sample@{k}" / "rows.parquet")
        assert kept and all(r["scores"]["score"] == 1.0 for r in kept)
    status = run_cli_subprocess("status", name, "--runs-dir", runs)
    assert status.returncode == 0 and "output diversity per round" in status.stdout


CHECKS = {"rft_verifier.toml": check_rft}


def test_seed_data_filter_removes_what_was_planted(tmp_path):
    """The shipped seed pool carries deliberately flawed rows (topic = the flaw): the shipped
    filter settings must remove every one of them and keep the good ones."""
    from engine.data.rows import read_rows
    from engine.run.executor import run

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


@pytest.mark.own_builtin  # where a build would land: this runs dir, which must stay without one
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_plans_on_the_real_builtin_model(path: Path, tmp_path):
    """Every shipped recipe takes builtin:smollm2-135m for its policy (the GGUF is hashed, not built)."""
    sets = ("--set", "models.policy.path=builtin:smollm2-135m")
    check = run_cli_subprocess("validate", path, *sets)
    assert check.returncode == 0, check.stderr
    plan = run_cli_subprocess("plan", path, *sets, "--runs-dir", tmp_path / "runs", "--json")
    assert plan.returncode == 0, plan.stderr
    assert {s["status"] for s in json.loads(plan.stdout)["stages"]} == {"run"}
    assert not (tmp_path / "runs" / "cache" / "builtin").exists()  # planning builds nothing
