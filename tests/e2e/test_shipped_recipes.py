"""Every file in recipes/ validates; slow tests run each one end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.load.loader import load_recipe

from conftest import ROOT, run_cli_subprocess

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.toml"))
# The alignment recipes, the flagship and their controls train a real model for many minutes each
# at their shipped sizes: tests/e2e/test_alignment.py runs align_smollm2 at reduced size, the
# flagship's smoke run (tiny-chat, reduced) runs once per session (conftest.reduced_flagship) and
# is checked below, its control is checked against it, and bench/alignment.py and
# bench/flagship.py run them in full. The GRPO recipes run below on tiny-chat at a few steps;
# bench/grpo.py runs grpo_arithmetic in full.
QUICK = [p for p in RECIPES if not p.name.startswith(("align_smollm2", "caI_multiturn", "grpo_"))]
GRPO_SMOKE = ["models.policy.path=builtin:tiny-chat", "stages.rl.max_steps=2", "stages.eval.max_items=6"]
GRPO_SMOKE_EXTRA = {  # its best-of-n and SFT on 16 prompts (two of which, with their written reply,
    # are longer than 256 of tiny-chat's byte-level tokens)
    "grpo_safety.toml": ["datasets.train.limit=16", "stages.sft.max_length=320"]
}


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
@pytest.mark.parametrize("name", ["grpo_arithmetic.toml", "grpo_safety.toml"])
def test_a_grpo_recipe_runs_as_a_smoke_run_with_its_rewards_logged(name: str, tmp_path):
    path, runs = ROOT / "recipes" / name, tmp_path / "runs"
    sets = [a for s in GRPO_SMOKE + GRPO_SMOKE_EXTRA.get(name, []) for a in ("--set", s)]
    out = run_cli_subprocess("run", path, "--runs-dir", runs, *sets, timeout=600)
    assert out.returncode == 0, out.stderr
    run_dir = (runs / load_recipe(path).name / "latest").resolve()
    steps = json.loads((run_dir / "stages" / "rl" / "metrics.json").read_text())["steps"]
    reward = "math_answer" if name == "grpo_arithmetic.toml" else "rule_reward"
    assert len(steps) == 2 and all(s[f"rewards/{reward}/mean"] is not None for s in steps)
    report = json.loads((run_dir / "stages" / "rl" / "report.json").read_text())
    assert report["merged"] and report["trainable_params"] > 0  # the adapter's, counted before the merge
    metrics = json.loads((run_dir / "stages" / "eval" / "metrics.json").read_text())
    suite = "arithmetic_accuracy" if name == "grpo_arithmetic.toml" else "adversarial_refusal"
    assert all(suite in m["headline"] for m in metrics["per_model"].values())
    assert suite in metrics["comparisons"]["rl"]


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
    """Every step of the pipeline made something, and the eval compares base and final."""
    from engine.data.rows import read_rows

    record = json.loads((run_dir / "record.json").read_text())
    assert all(s["status"] == "run" for s in record["stages"].values())
    revised = read_rows(run_dir / "stages" / "revised" / "rows.parquet")
    assert revised and all(r["meta"]["critique_revise"]["turns"] for r in revised)  # the history of each turn
    gate = _report(run_dir, "revised")
    assert sum(v["kept"] + sum(v["rejected"].values()) for v in gate["by_principle"].values()) == gate["critiques"]
    for stage in ("pairs_single", "pairs_multi"):  # on-policy pairs whose prompt ends where the reply is due
        pairs = read_rows(run_dir / "stages" / stage / "rows.parquet")
        assert pairs and all(p["prompt"][-1]["role"] == "user" for p in pairs)
    assert any(len(p["prompt"]) > 1 for p in read_rows(run_dir / "stages" / "pairs_multi" / "rows.parquet"))
    assert _report(run_dir, "dpo")["reference"].endswith("with the LoRA adapter disabled (frozen base)")
    assert {m["input"] for m in _report(run_dir, "dpo")["mixture"]} <= {
        "pairs_single",
        "pairs_openers",
        "pairs_multi",
        "revision_pairs",
    }
    assert _report(run_dir, "eval")["models"] == ["policy", "dpo"]
    md = (run_dir / "report.md").read_text()
    assert "## Eval: eval" in md and "| metric | policy | dpo |" in md and "builtin:tiny-chat" in md
    shown = run_cli_subprocess("show", name, "eval", "-n", "0", "--runs-dir", runs)
    assert shown.returncode == 0 and re.search(r"metric\s*┃\s*policy\s*┃\s*dpo", shown.stdout), shown.stdout


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


@pytest.mark.parametrize("recipe", ["caI_multiturn", "align_smollm2"])
def test_a_control_reverses_every_choice_and_changes_nothing_else(recipe):
    """The control recipe differs from its recipe in `prefer` only, and reverses it in every stage
    that makes a choice (best-of-n, revision gates, pairs)."""
    main = load_recipe(ROOT / "recipes" / f"{recipe}.toml")
    control = load_recipe(ROOT / "recipes" / f"{recipe}_control.toml")
    assert main.stages.keys() == control.stages.keys() and main.models == control.models
    choosing = 0
    for name, stage in main.stages.items():
        a, b = stage.config.model_dump(), control.stages[name].config.model_dump()
        if "prefer" in a and (stage.kind != "critique_revise" or a.get("rewards") or a.get("judge")):
            choosing += 1
            assert (a["prefer"], b["prefer"]) == ("higher", "lower"), name
        assert {k: v for k, v in a.items() if k != "prefer"} == {k: v for k, v in b.items() if k != "prefer"}, name
    assert choosing >= 2
