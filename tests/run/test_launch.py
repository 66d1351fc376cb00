"""`[stages.X.resources]`: validation (fast) and a real 2-process CPU run under accelerate (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.load.loader import load_recipe
from engine.run.executor import run
from engine.run.launch import command
from engine.run.plan import make_plan

from conftest import make_training_project as make


def test_processes_do_not_change_the_fingerprint(tmp_path):
    one = make(tmp_path / "one")
    two = make(tmp_path / "two", "[stages.train.resources]\nprocesses = 2")
    fp1 = make_plan(load_recipe(one), tmp_path / "runs")[0].fingerprint
    fp2 = make_plan(load_recipe(two), tmp_path / "runs")[0].fingerprint
    assert fp1 == fp2


def test_only_training_stages_take_processes(project, cli):
    text = (project / "recipe.toml").read_text()
    (project / "recipe.toml").write_text(text + "\n[stages.clean.resources]\nprocesses = 2\n")
    result = cli("validate", project / "recipe.toml")
    assert result.exit_code == 2
    assert "cannot run on 2 processes" in result.output and "stages.clean.resources.processes" in result.output


def test_missing_accelerate_config_is_a_validation_error(tmp_path, cli):
    path = make(tmp_path, '[stages.train.resources]\nprocesses = 2\naccelerate_config = "fsdp.yaml"')
    result = cli("validate", path)
    assert result.exit_code == 2 and "fsdp.yaml" in result.output and "not a file" in result.output


def test_command_line():
    cmd = command(2, None, Path("/tmp/p.pkl"))
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-3:] == ["-m", "engine.run.launch", "/tmp/p.pkl"]
    cfg = command(4, "/x/fsdp.yaml", Path("/tmp/p.pkl"))
    assert cfg[cfg.index("--config_file") + 1] == "/x/fsdp.yaml" and "--multi_gpu" not in cfg


def _losses(entry: Path) -> list[float]:
    return [s["loss"] for s in json.loads((entry / "metrics.json").read_text())["steps"]]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """Same recipe and global batch on 1 and on 2 CPU processes (gloo): the same number of
    steps, both losses fall, and they end close to each other."""
    one = run(load_recipe(make(tmp_path / "one")), tmp_path / "runs1")
    two = run(load_recipe(make(tmp_path / "two", "[stages.train.resources]\nprocesses = 2")), tmp_path / "runs2")
    e1, e2 = one.dir / "stages" / "train", two.dir / "stages" / "train"
    r1, r2 = (json.loads((e / "report.json").read_text()) for e in (e1, e2))
    assert r1["batch"] == {"global": 4, "per_device": 2, "accumulation": 2}
    assert r2["batch"] == {"global": 4, "per_device": 2, "accumulation": 1}
    assert r1["steps"] == r2["steps"] == 8
    l1, l2 = _losses(e1), _losses(e2)
    assert l1[-1] < l1[0] and l2[-1] < l2[0]
    assert abs(l1[-1] - l2[-1]) < 0.25 * l1[0], (l1, l2)
    log = (two.dir / "logs" / "train.log").read_text()
    assert "running on 2 processes" in log
    assert (e2 / "model" / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(e2 / "model")


@pytest.mark.slow
def test_warnings_of_a_multi_process_stage_reach_the_record(tmp_path):
    """Rank 0 says them in its own process; the run that launched it records and reports them."""
    path = make(tmp_path, "[stages.train.resources]\nprocesses = 2")
    path.write_text(path.read_text().replace("max_length = 256", "max_length = 40\nmax_dropped = 0.5"))
    record = run(load_recipe(path), tmp_path / "runs")
    warnings = record.data["stages"]["train"].get("warnings", [])
    assert any("exceed max_length 40" in w for w in warnings), warnings


def test_bad_input_found_inside_a_multi_process_stage_is_exit_2_with_its_message(tmp_path):
    """A user error a launched process raises (here: too many rows over max_length) reaches the user as
    the same one-paragraph error and exit 2 as in one process, not as a failed launch."""
    from engine.core.errors import RecipeError

    path = make(tmp_path, "[stages.train.resources]\nprocesses = 2")
    path.write_text(path.read_text().replace("max_length = 256", "max_length = 40"))
    with pytest.raises(RecipeError, match="conversations are over max_length = 40 tokens") as err:
        run(load_recipe(path), tmp_path / "runs")
    assert "keep_recent" in err.value.format()
    (problem,) = err.value.problems  # handed back whole: located at the key, in the recipe file
    assert problem.key == "stages.train.max_length" and problem.file and problem.file.endswith("recipe.toml")
