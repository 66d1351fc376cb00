"""[tracking] report_to: a tracker's missing package is a validate error, tracking never changes a
fingerprint, and (slow) a run streams its training curves to TensorBoard and trackio (its local
store) and logs the recipe, fingerprints and eval metrics once: read back from the event files and
from trackio's database."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT, make_training_project

EVAL = """
[stages.eval]
kind = "eval"
models = ["policy", "train"]
suites = ["refusal"]
max_items = 2
max_new_tokens = 8
"""


def with_tracking(path, trackers: str) -> None:
    path.write_text(path.read_text() + EVAL + f'\n[tracking]\nreport_to = {trackers}\nproject = "tracked"\n')


def test_a_tracker_without_its_package_fails_validate(tmp_path, cli):
    pytest.importorskip("tensorboard")
    path = make_training_project(tmp_path)
    with_tracking(path, '["tensorboard", "wandb"]')
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    result = cli("validate", path)
    assert result.exit_code == 2 and "report_to 'wandb' needs the wandb package" in result.output, result.output
    assert "report_to 'tensorboard'" not in result.output  # installed: no problem


def test_tracking_changes_no_fingerprint(tmp_path, cli):
    pytest.importorskip("tensorboard")
    path = make_training_project(tmp_path)
    path.write_text(path.read_text() + EVAL)
    before = json.loads(cli("plan", path, "--json").output)
    path.write_text(path.read_text() + '\n[tracking]\nreport_to = ["tensorboard"]\n')
    after = json.loads(cli("plan", path, "--json").output)
    assert [s["fingerprint"] for s in before["stages"]] == [s["fingerprint"] for s in after["stages"]]


@pytest.mark.slow
def test_a_run_streams_to_tensorboard_and_trackio(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("trackio")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = make_training_project(tmp_path / "proj")
    with_tracking(path, '["tensorboard", "trackio"]')
    runs, store = tmp_path / "runs", tmp_path / "trackio"
    env = {"TRACKIO_DIR": str(store), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(path), "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: tracking" not in done.stdout + done.stderr
    folders = {p.name: p for p in (runs / "launch" / "tracking").iterdir()}
    train = EventAccumulator(str(next(p for n, p in folders.items() if n.startswith("train-")))).Reload()
    assert len(train.Scalars("train/loss")) == 8  # every optimizer step's loss
    run = EventAccumulator(str(next(p for n, p in folders.items() if n.startswith("run-")))).Reload()
    assert "eval/eval/train/adversarial_refusal" in run.Tags()["scalars"]
    assert {"recipe/text_summary", "fingerprints/text_summary"} <= set(run.Tags()["tensors"])
    [db] = store.glob("tracked*.db")
    with sqlite3.connect(db) as con:
        logged = " ".join(str(r) for r in con.execute("select * from metrics").fetchall())
    assert "train/loss" in logged and "eval/train/adversarial_refusal" in logged
