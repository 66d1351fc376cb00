"""The Ray executor on a local two-CPU cluster: the rows of a local run, retries of a killed
worker, resuming a killed driver, the shared-store check, and no Ray import at CLI start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, write_jsonl
from engine.errors import RecipeError
from engine.executor import run
from engine.recipe import load_recipe

ray = pytest.importorskip("ray")

PIPELINE = """
[recipe]
name = "onray"
seed = 9

[models.policy]
path = "builtin:tiny-chat"

[datasets.chats]
path = "chats.jsonl"

[datasets.prompts]
path = "prompts.jsonl"
type = "prompts"

[stages.clean]
kind = "filter"
input = "chats"
min_words = 2

[stages.gen]
kind = "generate"
input = "prompts"
model = "policy"
n = 2
temperature = 1.0
max_new_tokens = 12
shard_size = 3

[stages.scored]
kind = "judge"
input = "gen"
scorer = "rules"
shard_size = 4

[stages.talk]
kind = "generate"
mode = "multi_turn"
input = "prompts"
model = "policy"
turns = 2
max_new_tokens = 10
shard_size = 2
"""


def project(root: Path) -> Path:
    write_jsonl(root / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Question {i}: how do tides work, part {i}?"}
                                         for i in range(10)])
    write_jsonl(root / "chats.jsonl", [{"id": f"c{i}", "messages": [
        {"role": "user", "content": f"hello number {i}"},
        {"role": "assistant", "content": "hi there friend" if i % 3 else "ok"}]} for i in range(9)])
    (root / "r.toml").write_text(textwrap.dedent(PIPELINE))
    return root / "r.toml"


def start(**env) -> None:
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **env}})


@pytest.fixture
def cluster():
    start()
    yield
    ray.shutdown()


def same_rows(a, b, stages) -> None:
    for stage in stages:
        assert a.data["stages"][stage]["fingerprint"] == b.data["stages"][stage]["fingerprint"]
        assert (a.dir / "stages" / stage / "rows.parquet").read_bytes() == \
               (b.dir / "stages" / stage / "rows.parquet").read_bytes(), stage


STAGES = ("clean", "gen", "scored", "talk")


@pytest.mark.slow
def test_a_pipeline_on_ray_gives_the_rows_of_a_local_run(tmp_path, cluster):
    path = project(tmp_path / "proj")
    local = run(load_recipe(path), tmp_path / "local")
    onray = run(load_recipe(path), tmp_path / "ray", executor="ray")
    same_rows(local, onray, STAGES)
    logs = onray.dir / "logs"
    assert "on Ray: 2 workers" in (logs / "gen.log").read_text()
    assert "resumed: 4 of 4 shards were already committed" in (logs / "gen.log").read_text()
    assert (logs / "gen.log.ray0").is_file() and (logs / "gen.log.ray1").is_file()
    assert "loading model" not in (logs / "gen.log").read_text()  # the driver only assembled
    again = run(load_recipe(path), tmp_path / "ray", executor="ray")
    assert all(again.data["stages"][s]["status"] == "cached" for s in STAGES)


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_retried_and_the_rows_are_the_same(tmp_path):
    path = project(tmp_path / "proj")
    marker = tmp_path / "crashed-once"
    start(RECIPE_CRASH_ONCE_IN_SHARD=str(marker))
    try:
        onray = run(load_recipe(path), tmp_path / "ray", executor="ray", only=["gen"])
    finally:
        ray.shutdown()
    assert marker.is_file()  # a worker did die in the middle of a shard
    local = run(load_recipe(path), tmp_path / "local", only=["gen"])
    same_rows(local, onray, ["gen"])


@pytest.mark.slow
def test_a_killed_driver_resumes_from_committed_shards_on_ray(tmp_path, cluster):
    path = project(tmp_path / "proj")
    runs = tmp_path / "runs"
    killed = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(path), "--runs-dir", str(runs),
                             "--only", "gen"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "RECIPE_CRASH_AFTER_SHARDS": "2"})
    assert killed.returncode == 137
    assert len(list((runs / "cache" / "partial").glob("*/shard-*"))) == 2
    resumed = run(load_recipe(path), runs, executor="ray", only=["gen"])
    log = (resumed.dir / "logs" / "gen.log.ray0").read_text() + (resumed.dir / "logs" / "gen.log.ray1").read_text()
    assert sum(int(n) for n in re.findall(r"committed (\d+) of 4 shards", log)) == 2
    local = run(load_recipe(path), tmp_path / "local", only=["gen"])
    same_rows(local, resumed, ["gen"])


@pytest.mark.slow
def test_a_store_the_workers_cannot_see_stops_the_run_naming_runs_dir(tmp_path):
    path = project(tmp_path / "proj")
    start(RECIPE_RAY_PROBE_ROOT=str(tmp_path / "elsewhere"))  # the workers' view of the path differs
    try:
        with pytest.raises(RecipeError, match="is not shared with the Ray workers") as err:
            run(load_recipe(path), tmp_path / "runs", executor="ray")
        assert "--runs-dir" in err.value.format()
        assert not (tmp_path / "runs" / "onray").exists()  # nothing ran
    finally:
        ray.shutdown()


def test_the_cli_does_not_import_ray_at_start_up():
    code = ("import sys, engine.cli, engine.executor, engine.rayexec, stages.generate; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_an_unknown_executor_is_exit_2(tmp_path):
    path = project(tmp_path / "proj")
    out = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(path), "--runs-dir", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "RECIPE_EXECUTOR": "slurm"})
    assert out.returncode == 2 and "RECIPE_EXECUTOR is 'slurm'" in out.stderr and "Traceback" not in out.stderr


REDUCED = ("datasets.scenarios.limit=8", "stages.chats.shard_size=2", "stages.revised.shard_size=4",
           "stages.best_of_n.shard_size=3", "stages.eval.max_items=2", "stages.eval.shard_size=8")


@pytest.mark.slow
def test_the_flagship_at_reduced_size_on_ray_equals_the_local_run(tmp_path, cluster):
    def recipe():
        return load_recipe(ROOT / "recipes" / "caI_multiturn.toml", sets=list(REDUCED))

    local = run(recipe(), tmp_path / "local")
    onray = run(recipe(), tmp_path / "ray", executor="ray")
    rows = [s for s in local.data["stages"] if (local.dir / "stages" / s / "rows.parquet").is_file()]
    assert {"chats", "revised", "best_of_n", "eval"} <= set(rows)
    same_rows(local, onray, rows)
    for stage in ("warmup", "sft", "dpo"):  # trained in a Ray task: the same weights
        assert local.data["stages"][stage]["fingerprint"] == onray.data["stages"][stage]["fingerprint"]
        mine = sorted((local.dir / "stages" / stage / "model").glob("*.safetensors"))
        assert mine and [p.read_bytes() for p in mine] == \
               [(onray.dir / "stages" / stage / "model" / p.name).read_bytes() for p in mine], stage
