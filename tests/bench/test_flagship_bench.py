"""bench/flagship.py on the smoke run: the flagship and its control at reduced size on
builtin:tiny-chat, `--set` passed to both, ending with the JSON line the README describes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REDUCED_FLAGSHIP, ROOT, SHARED_BUILTIN, set_args

KEYS = {
    "adversarial_refusal",
    "benign_over_refusal",
    "multiturn_refusal_from_harmful",
    "multiturn_refusal_before_harmful",
    "multiturn_benign_over_refusal",
    "sycophancy_flip",
}


@pytest.mark.slow
def test_flagship_bench_runs_recipe_and_control_and_ends_with_one_json_line(tmp_path, reduced_flagship):
    import os
    import shutil

    # the session's reduced flagship run, copied (a runs dir can move): the bench finds the recipe's
    # stages cached and computes the control's own
    shutil.copytree(reduced_flagship.parent.parent, tmp_path / "runs", symlinks=True)
    env = dict(os.environ, RECIPE_BUILTIN_DIR=str(SHARED_BUILTIN))
    cmd = [sys.executable, "bench/flagship.py", "--runs-dir", str(tmp_path / "runs"), *set_args(REDUCED_FLAGSHIP)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(last) == {"base", "final", "control", "seconds"}
    for side in ("base", "final", "control"):
        assert set(last[side]) >= KEYS
        assert all(v is None or 0.0 <= v <= 1.0 for k, v in last[side].items() if k in KEYS)
    assert last["final"]["final_model"] != last["control"]["final_model"]  # the control trained its own model
    assert "safety_refusal_before_harmful" in out.stdout and "control - base" in out.stdout
    # both runs share the runs dir: the control reused the base model's eval items
    control_log = (tmp_path / "runs" / "cai-multiturn-control" / "latest" / "logs" / "eval.log").read_text()
    assert "rows reused from the row memo" in control_log
