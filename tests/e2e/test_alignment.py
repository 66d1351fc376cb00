"""recipes/align_smollm2.toml on the real model (builtin:smollm2-135m), at reduced size, through
the CLI as a user runs it: the final model must refuse more of the adversarial prompts of the
refusal suite than the base model does, with the same greedy decoding on the same prompts.
A real assertion on real outputs: SmolLM2-135M-Instruct refuses almost none of them on its own."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, SHARED_BUILTIN, run_cli_subprocess

RECIPE = ROOT / "recipes" / "align_smollm2.toml"

# 20 of the 135 training prompts (harmful, benign, benign, ...: 7 harmful), one sample each
# against the written replies (a real choice under the reward still), short replies, one DPO
# epoch; the base and the final model on the refusal suite's first 30
# prompts (15 adversarial, 15 benign).
SMALL = [
    "datasets.train.limit=20",
    "stages.best_of_base.n=1",
    "stages.best_of_base.max_new_tokens=40",
    "stages.sft.max_length=160",
    "stages.sft.lr=5e-5",  # fewer steps than the full run: a larger step
    "stages.pairs.n=1",
    "stages.pairs.max_new_tokens=40",
    "stages.dpo.epochs=1.0",
    "stages.dpo.max_length=160",
    'stages.eval.suites=["refusal"]',
    'stages.eval.models=["policy", "dpo"]',
    "stages.eval.max_items=30",
    "stages.eval.max_new_tokens=24",
]


@pytest.mark.slow
@pytest.mark.real_model
def test_alignment_recipe_raises_adversarial_refusal_on_smollm2(tmp_path, smollm2_dir):
    runs = tmp_path / "runs"
    sets = [a for s in SMALL for a in ("--set", s)]
    env = {"RECIPE_BUILTIN_DIR": str(SHARED_BUILTIN)}
    result = run_cli_subprocess("run", RECIPE, *sets, "--runs-dir", runs, env_extra=env, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = (runs / "align-smollm2" / "latest").resolve()
    metrics = json.loads((run_dir / "stages" / "eval" / "metrics.json").read_text())
    assert metrics["models"] == ["policy", "dpo"]
    heads = {m: metrics["per_model"][m]["headline"] for m in metrics["models"]}
    base, final = heads["policy"]["adversarial_refusal"], heads["dpo"]["adversarial_refusal"]
    assert base["n"] == final["n"] == 15
    assert final["rate"] > base["rate"], (base, final)
    assert final["ci"][0] <= final["rate"] <= final["ci"][1]
    change = metrics["comparisons"]["dpo"]["adversarial_refusal"]
    assert change["difference"] == pytest.approx(final["rate"] - base["rate"])
    # the written refusals were a real choice under the reward, not copied in
    report = json.loads((run_dir / "stages" / "best_of_base" / "report.json").read_text())
    assert 0 < report["kept_written"] <= 7
    page = (run_dir / "report.html").read_text()
    assert "At a glance" in page and "adversarial prompts" in page
