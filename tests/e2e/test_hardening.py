"""Inputs that used to give a traceback or hang: data paths that are not datasets, devices,
malformed CSV rows; and the remote-code note at validate."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli_subprocess


def recipe_with_data(root: Path, data_path: str) -> Path:
    path = root / "r.toml"
    path.write_text(
        textwrap.dedent(f"""
        [recipe]
        name = "h"
        [datasets.d]
        path = "{data_path}"
        [stages.s]
        kind = "filter"
        input = "d"
    """)
    )
    return path


@pytest.mark.parametrize(
    "data_path, says",
    [
        ("/", "is not a dataset folder"),
        ("/dev/zero", "is not a regular file"),
        ("notds", "is a directory with no data file"),
        ("ragged.csv", "line 3 has 3 cells but the header has 2 columns"),
    ],
)
def test_data_paths_that_are_not_datasets_are_exit_2_at_validate_plan_and_run(tmp_path, data_path, says):
    (tmp_path / "notds").mkdir()
    (tmp_path / "notds" / "README.md").write_text("not data")
    (tmp_path / "ragged.csv").write_text('messages,meta\n"[]",{}\n1,2,3\n')
    path = recipe_with_data(tmp_path, data_path)
    for command in (
        ["validate", path],
        ["plan", path, "--runs-dir", tmp_path / "runs"],
        ["run", path, "--runs-dir", tmp_path / "runs"],
    ):
        out = run_cli_subprocess(*command, timeout=60)
        assert out.returncode == 2, (command, out.stderr)
        assert says in out.stderr and "Traceback" not in out.stderr and "datasets.d.path" in out.stderr


def test_validate_prints_the_remote_code_note_that_plan_prints(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    path = tmp_path / "r.toml"
    path.write_text(
        textwrap.dedent(f"""
        [recipe]
        name = "rc"
        [models.p]
        path = "{model}"
        trust_remote_code = true
        [datasets.d]
        path = "d.jsonl"
        type = "prompts"
        [stages.g]
        kind = "generate"
        input = "d"
        model = "p"
    """)
    )
    (tmp_path / "d.jsonl").write_text('{"prompt": "hi"}\n')
    out = run_cli_subprocess("validate", path)
    assert out.returncode == 0, out.stderr
    assert "trust_remote_code = true" in out.stdout and "runs code from the model repository" in out.stdout


# --------------------------------------------------------------------------- threads


def test_auto_threads_are_the_cores_this_process_may_use():
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    if shutil.which("taskset") is None:
        pytest.skip("no taskset here")
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-c",
            "from engine.core.threads import available_cores; print(available_cores())",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout.strip() == "1"


def test_threads_setting_reaches_the_stage_and_the_record(project, runs):
    import json

    out = run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs, "--threads", "1")
    assert out.returncode == 0, out.stderr
    record = json.loads((runs / "basic" / "latest" / "record.json").read_text())
    assert record["threads"] == 1
    assert "; 1 torch threads" in (runs / "basic" / "latest" / "logs" / "clean.log").read_text()
    bad = run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs, "--threads", "0")
    assert bad.returncode == 2 and "--threads" in bad.stderr and "Traceback" not in bad.stderr
    env = run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs, env_extra={"RECIPE_THREADS": "lots"})
    assert env.returncode == 2 and "RECIPE_THREADS" in env.stderr


def test_a_run_started_beside_another_says_how_to_share_the_cores(project, runs):
    import subprocess
    import sys

    from conftest import ROOT

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from engine.core.threads import Registration; import time; "
            "r = Registration(2); print('up', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "up"
        out = run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs)
        assert out.returncode == 0, out.stderr
        found = re.search(r"other recipe runs? (is|are) using this machine", out.stderr)
        assert found, out.stderr
        warning = out.stderr[found.start() :]
        pids = warning.split("(pid ", 1)[1].split(")")[0].split(", ")
        assert str(holder.pid) in pids  # (other tests' runs may be listed too)
        assert "--threads" in out.stderr and " 1 threads" not in out.stderr
    finally:
        holder.kill()
        holder.wait()


def test_the_sharing_warning_is_for_oversubscribed_cores_only():
    from engine.core.threads import oversubscribed

    assert not oversubscribed(1, [(101, 1)], cores=2)  # --threads 1 each on 2 cores: fine, no warning
    assert oversubscribed(2, [(101, 1)], cores=2) and oversubscribed(1, [(101, 1), (102, 1)], cores=2)
    assert not oversubscribed(2, [], cores=2)


# --------------------------------------------------------------------------- what held: keep it so


@pytest.mark.slow
def test_the_reduced_flagship_killed_twice_then_resumed_equals_an_uninterrupted_run(tmp_path, reduced_flagship):
    """SIGKILL of the whole process group in the middle of sharded sampling stages (twice),
    then `recipe run` again: every rows file and every weights file equals an uninterrupted run's,
    and the killed runs left nothing half-built behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import FLAGSHIP, REDUCED_FLAGSHIP, ROOT, set_args

    sets = set_args(REDUCED_FLAGSHIP)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def command(runs):
        return [sys.executable, "-m", "engine.cli", "run", str(FLAGSHIP), "--runs-dir", str(runs), *sets]

    runs = tmp_path / "killed"
    kills = 0
    for ready in ("*/shard-000000", "*/shard-000001"):  # mid best_single, then mid a later sharded stage
        proc = subprocess.Popen(
            command(runs),
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        seen = set(p.parent for p in (runs / "cache" / "partial").glob(ready)) if kills else set()
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            fresh = set(p.parent for p in (runs / "cache" / "partial").glob(ready)) - seen
            if fresh:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.05)
        proc.wait()
    assert kills >= 1
    final = subprocess.run(command(runs), env=env, capture_output=True, text=True, cwd=ROOT)
    assert final.returncode == 0, final.stderr
    assert list((runs / "cache" / "tmp").iterdir()) == []
    a, b = reduced_flagship / "stages", runs / "cai-multiturn" / "latest" / "stages"
    files = sorted(
        Path(link.name) / p.relative_to(link.resolve())
        for link in a.iterdir()
        for p in link.resolve().rglob("*")
        if p.suffix in (".parquet", ".safetensors")
    )
    assert any(str(f).endswith(".safetensors") for f in files) and any(str(f).endswith(".parquet") for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
