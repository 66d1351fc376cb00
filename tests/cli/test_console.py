"""What a user sees on the console: third-party noise kept in stage logs, progress bars that fit
80 columns, resumes announced, SIGTERM handled like Ctrl-C, dead runs shown as interrupted,
status tables that fit, and model output that cannot drive the terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import GOOD, ROOT, conv, run_cli_subprocess, write_jsonl


def test_third_party_warnings_and_bars_go_to_the_stage_log(tmp_path):
    from conftest import make_training_project as make

    path = make(tmp_path / "p")
    proc = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs", timeout=300)
    assert proc.returncode == 0, proc.stderr
    for noise in ("FutureWarning", "warnings.warn", "Loading weights", "Tokenizing", "it/s]", "Map"):
        assert noise not in proc.stderr, (noise, proc.stderr)
    assert "train: training" in proc.stderr  # our own progress stays
    log = (tmp_path / "runs" / "launch" / "latest" / "logs" / "train.log").read_text()
    assert "[stderr]" in log and "FutureWarning" in log  # kept, in the stage's log


def test_progress_bars_fit_80_columns_with_counts_rate_and_eta():
    from rich.console import Console

    from engine.core.console import progress_bars

    sink = io.StringIO()
    bars = progress_bars(Console(file=sink, width=80, force_terminal=False, color_system=None))
    task = bars.add_task("best_of_n: best of 4 with a very long label indeed", total=1600)
    bars.advance(task, 100)  # resumed rows: the first jump, left out of the rate
    time.sleep(0.05)
    bars.advance(task, 500)
    time.sleep(0.05)
    bars.advance(task, 6)
    bars.live.console.print(bars.live.make_tasks_table(bars.live.tasks))
    lines = [line for line in sink.getvalue().splitlines() if line.strip()]
    assert lines and all(len(line) <= 80 for line in lines), lines
    line = lines[0]
    assert "best_of_n" in line and "606/1600" in line and "rows/s" in line and "eta" in line, line
    rate = float(line.split("rows/s")[0].split()[-1].replace(",", ""))
    assert rate < 506 / 0.05  # the 100 resumed rows are not counted as work of this run


SLOW = """
[recipe]
name = "slow"
seed = 3

[models.policy]
path = "builtin:tiny-chat"

[datasets.prompts]
path = "prompts.jsonl"
type = "prompts"

[stages.gen]
kind = "generate"
input = "prompts"
model = "policy"
max_new_tokens = 48
shard_size = 2
batch_size = 2
"""


def slow_project(root: Path) -> Path:
    write_jsonl(root / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Tell me about thing {i}."} for i in range(60)])
    (root / "r.toml").write_text(textwrap.dedent(SLOW))
    return root / "r.toml"


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c_and_the_run_resumes(tmp_path):
    path, runs = slow_project(tmp_path), tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "run", str(path), "--runs-dir", str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while not list((runs / "cache" / "partial").glob("*/shard-*")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated: committed stages and shards are kept" in stderr and "Traceback" not in stderr
    record = json.loads((runs / "slow" / "latest" / "record.json").read_text())
    assert record["status"] == "interrupted" and record["stages"]["gen"]["status"] == "interrupted"
    again = run_cli_subprocess("run", path, "--runs-dir", runs, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "gen: resuming: " in again.stderr and " of 30 shards committed" in again.stderr


def test_a_run_killed_outright_shows_as_interrupted(project, runs):
    proc = run_cli_subprocess(
        "run", project / "recipe.toml", "--runs-dir", runs, faults={"RECIPE_CRASH_AFTER_SHARDS": "1"}
    )
    assert proc.returncode == 137  # os._exit: no handler ran, the record still says "running"
    assert json.loads((runs / "basic" / "latest" / "record.json").read_text())["status"] == "running"
    listing = run_cli_subprocess("status", "--runs-dir", runs)
    assert "interrupted" in listing.stdout and "running" not in listing.stdout
    detail = run_cli_subprocess("status", "basic", "--runs-dir", runs)
    assert "basic/" in detail.stdout and ": interrupted" in detail.stdout
    assert "clean" in detail.stdout and "running" not in detail.stdout


def test_status_of_a_run_fits_80_columns_in_dag_order(project, runs):
    assert run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs).returncode == 0
    out = run_cli_subprocess("status", "basic", "--runs-dir", runs, env_extra={"COLUMNS": "80"}).stdout
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    assert out.index("clean") < out.index("again")  # DAG order: `again` reads `clean`
    assert "40>40" in out


def test_show_escapes_control_characters_in_model_output(project, runs):
    rows = [
        conv("Say something colourful please, friend.", "Here: \x1b[31mred\x1b[0m and a NUL \x00 byte, ok.", id="esc")
    ] + GOOD
    write_jsonl(project / "data" / "convs.jsonl", rows)
    assert run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs).returncode == 0
    shown = run_cli_subprocess("show", "basic", "clean", "-n", "1", "--runs-dir", runs)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x00" not in shown.stdout
    assert "\\x1b[31mred" in shown.stdout and "\\x00" in shown.stdout


def test_the_run_summary_says_why_each_stage_ran_and_no_rows_in_for_stages_without_row_inputs():
    from types import SimpleNamespace

    from rich.console import Console

    from engine.report.console import print_run_summary

    record = SimpleNamespace(
        run_id="20261203-000000",
        data={
            "stages": {
                "clean": {"status": "run", "rows_in": 40, "rows_out": 38, "duration_s": 1.0, "reasons": ["config: min_words 3 -> 6"]},
                "eval": {"status": "cached", "rows_in": None, "rows_out": 12, "duration_s": 0.0, "reasons": []},
            }
        },
    )  # fmt: skip
    sink = io.StringIO()
    print_run_summary(Console(file=sink, width=120), "basic", record)
    out = sink.getvalue()
    assert "why" in out and "config: min_words 3 -> 6" in out
    eval_line = next(line for line in out.splitlines() if "eval" in line)
    assert " 0 " not in eval_line and "-" in eval_line


def test_recipe_report_lists_each_file_once(project, runs, cli):
    assert cli("run", project / "recipe.toml").exit_code == 0
    out = cli("report", "basic").output
    assert sum(line.strip().endswith("report.md") for line in out.splitlines()) == 1, out


def test_a_training_stage_resuming_says_so_on_the_console(tmp_path):
    from types import SimpleNamespace

    from engine.lib.trainer import last_checkpoint

    said: list[str] = []
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint-3").mkdir(parents=True)
    (ckpt / "checkpoint-3" / "trainer_state.json").write_text("{}")
    ctx = SimpleNamespace(say=said.append, log=SimpleNamespace(warning=print), is_main=True)
    assert last_checkpoint(ckpt, ctx).endswith("checkpoint-3")
    assert said == ["resuming from checkpoint checkpoint-3 (the steps before it are kept)"]


@pytest.mark.own_builtin
def test_the_first_build_of_a_builtin_is_announced(tmp_path):
    from conftest import make_training_project as make

    path = make(tmp_path / "p")
    env = {"RECIPE_BUILTIN_DIR": str(tmp_path / "builtin")}
    proc = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs", env_extra=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train: building builtin:tiny-chat (first use only" in proc.stderr
    again = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs2", env_extra=env, timeout=300)
    assert "building builtin" not in again.stderr  # built once


def test_status_keeps_run_ids_whole_at_80_columns(project, runs):
    text = (
        (project / "recipe.toml").read_text().replace('name = "basic"', 'name = "a-rather-long-recipe-name-for-status"')
    )
    (project / "recipe.toml").write_text(text)
    assert run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs).returncode == 0
    out = run_cli_subprocess("status", "--runs-dir", runs, env_extra={"COLUMNS": "80"}).stdout
    run_id = (runs / "a-rather-long-recipe-name-for-status" / "latest").resolve().name
    assert run_id in out and "a-rather-long-recipe-name-for-status" in out, out
