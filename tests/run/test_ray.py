"""The Ray executor on a local two-CPU cluster and a simulated two-node one: the rows of a local
run, independent stages side by side, retries of a killed worker, resuming a killed driver, the
shared-store check, and no Ray import at CLI start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.core.errors import RecipeError
from engine.load.loader import load_recipe
from engine.run.executor import run
from engine.store.record import read_record

from conftest import ROOT, fault_env, write_jsonl

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
resources.replicas = 2   # two workers share its shards (the default on 2 cores is one)

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
    write_jsonl(
        root / "prompts.jsonl",
        [{"id": f"p{i}", "prompt": f"Question {i}: how do tides work, part {i}?"} for i in range(10)],
    )
    write_jsonl(
        root / "chats.jsonl",
        [
            {
                "id": f"c{i}",
                "messages": [
                    {"role": "user", "content": f"hello number {i}"},
                    {"role": "assistant", "content": "hi there friend" if i % 3 else "ok"},
                ],
            }
            for i in range(9)
        ],
    )
    (root / "r.toml").write_text(textwrap.dedent(PIPELINE))
    return root / "r.toml"


def start(**env) -> None:
    if ray.is_initialized():
        ray.shutdown()
    ray.init(  # "local": a cluster of its own, never the latest one another test (xdist worker) started
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": fault_env(**env)},
    )  # workers load the fault seam (armed by `env`)


@pytest.fixture
def cluster():
    start()
    yield
    ray.shutdown()


def same_rows(a, b, stages) -> None:
    for stage in stages:
        assert a.data["stages"][stage]["fingerprint"] == b.data["stages"][stage]["fingerprint"]
        assert (a.dir / "stages" / stage / "rows.parquet").read_bytes() == (
            b.dir / "stages" / stage / "rows.parquet"
        ).read_bytes(), stage


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
    stages = onray.data["stages"]
    assert list(stages) == list(local.data["stages"])  # DAG order in the record, whichever finished first
    gen, talk = stages["gen"], stages["talk"]  # independent stages: they ran side by side
    import torch

    cpus = min(torch.get_num_threads(), 2)  # by default a CPU worker holds the cores its torch threads use
    assert f"on Ray: {2 // cpus} workers (0 GPUs, {cpus} CPUs each)" in (logs / "talk.log").read_text()
    assert (
        gen["start_s"] < talk["start_s"] + talk["duration_s"] and talk["start_s"] < gen["start_s"] + gen["duration_s"]
    )
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
    killed = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(path), "--runs-dir", str(runs), "--only", "gen"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **fault_env(RECIPE_CRASH_AFTER_SHARDS="2")},
    )
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


@pytest.fixture
def two_nodes():
    """A simulated two-node cluster on this machine (ray.cluster_utils.Cluster), one CPU each."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        nodes.add_node(num_cpus=1)
        ray.init(
            address=nodes.address,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
        nodes.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.mark.slow
def test_a_simulated_two_node_cluster_gives_the_rows_of_a_local_run(tmp_path, two_nodes):
    path = project(tmp_path / "proj")
    onray = run(load_recipe(path), tmp_path / "ray", executor="ray", only=["scored"])
    logs = onray.dir / "logs"
    workers = [(logs / f"gen.log.ray{rank}").read_text() for rank in range(2)]
    assert len({re.search(r"on node (\w+)", w).group(1) for w in workers}) == 2  # one worker per node
    local = run(load_recipe(path), tmp_path / "local", only=["scored"])
    same_rows(local, onray, ["gen", "scored"])


@pytest.mark.slow
def test_a_training_stage_on_two_simulated_nodes_equals_two_local_processes(tmp_path, two_nodes):
    """`nodes = 2`: accelerate's multi-node launch, one Ray task per node of a placement group;
    the weights are those of the same two processes on one machine."""
    from conftest import make_training_project as make

    two = run(load_recipe(make(tmp_path / "two", "[stages.train.resources]\nprocesses = 2")), tmp_path / "runs2")
    spread = run(
        load_recipe(make(tmp_path / "mn", "[stages.train.resources]\nnodes = 2")), tmp_path / "runsmn", executor="ray"
    )
    with pytest.raises(RecipeError, match="asks for 3 nodes") as err:  # more nodes than the cluster has
        run(
            load_recipe(make(tmp_path / "three", "[stages.train.resources]\nnodes = 3")),
            tmp_path / "runs3",
            executor="ray",
        )
    assert "stages.train.resources.nodes" in err.value.format()
    assert "on Ray: 2 nodes x 1 processes" in (spread.dir / "logs" / "train.log").read_text()
    assert spread.data["stages"]["train"]["fingerprint"] == two.data["stages"]["train"]["fingerprint"]
    mine = sorted((two.dir / "stages" / "train" / "model").glob("*.safetensors"))
    assert mine and [p.read_bytes() for p in mine] == [
        (spread.dir / "stages" / "train" / "model" / p.name).read_bytes() for p in mine
    ]


def test_nodes_need_a_training_stage_and_the_ray_executor(tmp_path):
    from conftest import make_training_project as make

    path = make(tmp_path / "p", "[stages.train.resources]\nnodes = 2")
    local = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(path), "--runs-dir", str(tmp_path / "r")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert local.returncode == 2 and "needs the Ray executor" in local.stderr and "Traceback" not in local.stderr
    assert "resources.nodes" in local.stderr
    text = path.read_text().replace("[stages.train.resources]\nnodes = 2", "")
    path.write_text(text + '\n[stages.clean]\nkind = "filter"\ninput = "chats"\n[stages.clean.resources]\nnodes = 2\n')
    check = subprocess.run(
        [sys.executable, "-m", "engine.cli", "validate", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 2 and "cannot run on 2 nodes" in check.stderr, check.stderr


def test_a_stop_file_ends_every_node_of_a_launch(tmp_path):
    """When one node of a multi-node stage fails, the driver writes the stop file and the other
    nodes kill their launch (not wait for a collective to time out)."""
    import threading
    import time

    from engine.run.launch import execute

    stop = tmp_path / "stop"
    threading.Timer(1.0, stop.write_text, args=("node 1 exited with 1\n",)).start()
    started = time.monotonic()
    code = execute([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "out.log", stop=stop)
    assert code == -9 and time.monotonic() - started < 30


def test_the_cli_does_not_import_ray_at_start_up():
    code = (
        "import sys, engine.cli, engine.run.executor, engine.run.rayexec, stages.generate; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_an_unknown_executor_is_exit_2(tmp_path):
    path = project(tmp_path / "proj")
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(path), "--runs-dir", str(tmp_path / "r")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "RECIPE_EXECUTOR": "slurm"},
    )
    assert out.returncode == 2 and "RECIPE_EXECUTOR is 'slurm'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_flagship_at_reduced_size_on_ray_equals_the_local_run(tmp_path, cluster, reduced_flagship):
    from conftest import FLAGSHIP, REDUCED_FLAGSHIP

    onray = run(load_recipe(FLAGSHIP, sets=list(REDUCED_FLAGSHIP)), tmp_path / "ray", executor="ray")
    local = SimpleNamespace(dir=reduced_flagship, data=read_record(reduced_flagship))  # a run() result's shape
    rows = [s for s in local.data["stages"] if (local.dir / "stages" / s / "rows.parquet").is_file()]
    assert {"best_single", "best_multi", "revised", "pairs_single", "eval"} <= set(rows)
    same_rows(local, onray, rows)
    for stage in ("sft", "dpo"):  # trained in a Ray task: the same weights
        assert local.data["stages"][stage]["fingerprint"] == onray.data["stages"][stage]["fingerprint"]
        mine = sorted((local.dir / "stages" / stage / "model").glob("*.safetensors"))
        assert mine and [p.read_bytes() for p in mine] == [
            (onray.dir / "stages" / stage / "model" / p.name).read_bytes() for p in mine
        ], stage
