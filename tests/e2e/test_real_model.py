"""The flagship on a real model: builtin:smollm2-135m (SmolLM2-135M-Instruct), end to end at small
sizes, through the CLI as a user runs it. Checks that the mask check passed on SmolLM2's own ChatML
template (no {% generation %} markers: spans derived by rendering) and that every evaluated model
wrote real, non-empty replies that stop at the end of their turn."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, SHARED_BUILTIN, run_cli_subprocess

FLAGSHIP = ROOT / "recipes" / "caI_multiturn.toml"

# The shipped flagship (SmolLM2 is its default model) with a few items per stage: 4 rows of each
# dataset (openers too: its 40 rows were half of the run's time), one optimizer step per training
# stage, one item of two eval suites for the two trained models, short replies.
SMALL = [
    "datasets.single.limit=4",
    "datasets.multi.limit=4",
    "datasets.openers.limit=4",
    "stages.best_single.max_new_tokens=24",
    "stages.best_multi.max_new_tokens=24",
    "stages.revised.max_new_tokens=48",
    "stages.sft.max_steps=1",
    "stages.sft.batch_size=2",
    "stages.sft.per_device_batch_size=2",
    "stages.pairs_single.max_new_tokens=24",
    "stages.pairs_multi.max_new_tokens=24",
    "stages.dpo.max_steps=1",
    "stages.dpo.batch_size=2",
    "stages.dpo.per_device_batch_size=2",
    'stages.eval.suites=["safety", "refusal"]',  # multi-turn and single-turn
    'stages.eval.models=["sft", "dpo"]',  # the base model is evaluated in test_alignment.py
    "stages.eval.max_items=1",
    "stages.eval.max_new_tokens=16",
]


@pytest.mark.slow
@pytest.mark.real_model
def test_flagship_runs_on_smollm2_with_the_real_template(tmp_path, smollm2_dir):
    runs = tmp_path / "runs"
    sets = [a for s in SMALL for a in ("--set", s)]
    env = {"RECIPE_BUILTIN_DIR": str(SHARED_BUILTIN)}
    check = run_cli_subprocess("validate", FLAGSHIP, *sets, env_extra=env)
    assert check.returncode == 0, check.stdout + check.stderr
    result = run_cli_subprocess("run", FLAGSHIP, *sets, "--runs-dir", runs, env_extra=env, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = (runs / "cai-multiturn" / "latest").resolve()

    for stage in ("sft",):
        log = (run_dir / "logs" / f"{stage}.log").read_text()
        assert "derived by rendering" in log and "mask check ok" in log
        mask = (run_dir / "stages" / stage / "mask_check.txt").read_text()
        assert "<|im_end|>" in mask and "<|im_start|>" not in mask  # replies and their end token only
        assert "SmolLM" not in mask  # the template's default system prompt is never supervised

    from engine.data.rows import read_rows

    rows = read_rows(run_dir / "stages" / "eval" / "rows.parquet")
    metrics = json.loads((run_dir / "stages" / "eval" / "metrics.json").read_text())
    assert metrics["models"] == ["sft", "dpo"]
    for model in metrics["models"]:
        replies = [m["content"] for r in rows if r["model"] == model for m in r["messages"] if m["role"] == "assistant"]
        assert replies and all(isinstance(t, str) for t in replies)
        words = [t for t in replies if len(t.split()) >= 2]
        assert len(words) >= len(replies) // 2, replies  # a real model writes words, not byte noise
        assert not any("<|im_end|>" in t or "<|im_start|>" in t for t in replies)
    report = (run_dir / "report.md").read_text()
    assert "random seed" not in report  # the tiny-model disclaimer is for builtin:tiny-chat only
