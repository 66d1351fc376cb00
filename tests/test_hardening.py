"""Inputs that used to give a traceback or hang: data paths that are not datasets, devices,
malformed CSV rows; and the remote-code note at validate."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import run_cli_subprocess


def recipe_with_data(root: Path, data_path: str) -> Path:
    path = root / "r.toml"
    path.write_text(textwrap.dedent(f"""
        [recipe]
        name = "h"
        [datasets.d]
        path = "{data_path}"
        [stages.s]
        kind = "filter"
        input = "d"
    """))
    return path


@pytest.mark.parametrize("data_path, says", [
    ("/", "is not a dataset folder"),
    ("/dev/zero", "is not a regular file"),
    ("notds", "is a directory with no data file"),
    ("ragged.csv", "line 3 has 3 cells but the header has 2 columns"),
])
def test_data_paths_that_are_not_datasets_are_exit_2_at_validate_plan_and_run(tmp_path, data_path, says):
    (tmp_path / "notds").mkdir()
    (tmp_path / "notds" / "README.md").write_text("not data")
    (tmp_path / "ragged.csv").write_text("messages,meta\n\"[]\",{}\n1,2,3\n")
    path = recipe_with_data(tmp_path, data_path)
    for command in (["validate", path], ["plan", path, "--runs-dir", tmp_path / "runs"],
                    ["run", path, "--runs-dir", tmp_path / "runs"]):
        out = run_cli_subprocess(*command, timeout=60)
        assert out.returncode == 2, (command, out.stderr)
        assert says in out.stderr and "Traceback" not in out.stderr and "datasets.d.path" in out.stderr


def test_validate_prints_the_remote_code_note_that_plan_prints(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    path = tmp_path / "r.toml"
    path.write_text(textwrap.dedent(f"""
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
    """))
    (tmp_path / "d.jsonl").write_text('{"prompt": "hi"}\n')
    out = run_cli_subprocess("validate", path)
    assert out.returncode == 0, out.stderr
    assert "trust_remote_code = true" in out.stdout and "runs code from the model repository" in out.stdout
