"""The Ray executor: `recipe run --executor ray [--ray-address ADDR]` (or RECIPE_EXECUTOR=ray,
RAY_ADDRESS). Execution-only: no fingerprint changes, and the rows are those of a local run.

The driver is `recipe run`: it plans, checks the cache, locks and commits entries exactly as the
local executor does. What changes is where a stage's work happens:

- Row stages (generate, critique_revise, judge, rejection_sample, eval, preferences: modules with
  `ROW_STAGE = True`): k Ray tasks, one per worker (`[stages.X.resources] replicas`, default as
  many as the cluster's GPUs, else CPUs, fit at `gpus`/`cpus` each). Each worker runs the stage
  with its model loaded once and does the shards whose index is its rank mod k, committing each
  atomically into the shared store's partial area (engine.shards), then stops. A worker lost
  mid-shard (node failure, OOM kill) is retried by Ray (max_retries); committed shards are skipped,
  and a shard committed twice keeps its first commit. When all are done, the driver runs the stage
  itself over the committed shards (models load lazily, so nothing is loaded unless a shard is
  missing) and commits the entry: the same assembly code as a local run, hence the same bytes.
- Training stages (sft, dpo): one Ray task holding `gpus` x `processes` GPUs on one node runs the
  stage (under `accelerate launch` when processes > 1) and writes the model into the entry being
  built; the driver commits it. Multi-node training stays accelerate's own configuration.
- Other stages (filter) run on the driver.

Workers compute with the driver's torch thread count: float sums (perplexity, losses) depend on
how a reduction is split, and with it the rows are byte-identical to a local run on the same
hardware (tested on the flagship, trained weights included). Across different hardware (another
CPU, a GPU) generated text stays the same only as far as the arithmetic does: seeds are per row,
never per worker.

Stages run one after another in topological order, as locally. The store must be one filesystem
seen by every node: at start a worker writes a probe file under the runs dir and the driver must
see it, else the run stops (exit 2) naming --runs-dir.

Ray is an optional extra (`pip install recipe-engine[ray]`); it is imported here only.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .errors import RecipeError

INSTALL = "pip install 'recipe-engine[ray]'"
MAX_RETRIES = 3
PROBE_ENV = "RECIPE_RAY_PROBE_ROOT"  # test hook: a worker that sees another filesystem writes its probe there


def _ray():
    try:
        import ray
    except ImportError:
        raise RecipeError.single("--executor ray needs the ray package, which is not installed.",
                                 hint=f"Install it with `{INSTALL}`, or run with --executor local.") from None
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one; idempotent."""
    ray = _ray()
    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parents[1])
        env = {"PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)}
        for name in ("RECIPE_BUILTIN_DIR", "HF_HOME", "HF_HUB_OFFLINE"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        try:
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=False, runtime_env={"env_vars": env})
        except ConnectionError as exc:
            raise RecipeError.single(f"cannot connect to the Ray cluster at '{address}': {exc}.",
                                     hint="Check --ray-address (or RAY_ADDRESS), or leave it unset to start a "
                                          "local cluster.") from None
    return ray


def _probe(path: str, token: str) -> str:
    root = os.environ.get(PROBE_ENV)
    target = Path(root) / Path(path).name if root else Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(token)
    return str(target)


def check_shared_store(runs_dir: Path) -> None:
    """A worker writes a file under the runs dir; the driver must read it back."""
    ray = _ray()
    token = uuid.uuid4().hex
    path = Path(runs_dir).resolve() / "cache" / f".ray-probe-{token}"
    path.parent.mkdir(parents=True, exist_ok=True)
    ray.get(ray.remote(num_cpus=0)(_probe).remote(str(path), token))
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    finally:
        path.unlink(missing_ok=True)
    if not seen:
        raise RecipeError.single(
            f"the runs dir '{runs_dir}' is not shared with the Ray workers: a file a worker wrote there is not "
            "visible here, so shards they commit would be lost.",
            hint="Put --runs-dir on a filesystem every node mounts at the same path (NFS, Lustre, ...), or run "
                 "with --executor local.")


def _workers(ray, res) -> int:
    if res.replicas:
        return res.replicas
    total = ray.cluster_resources()
    if total.get("GPU", 0) >= 1:
        return max(1, int(total["GPU"] // res.gpus))
    return max(1, int(total.get("CPU", 1) // res.cpus))


def _gpus(ray, res) -> float:
    return float(res.gpus) if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _same_arithmetic(payload: dict) -> None:
    """Compute with the driver's intra-op thread count: float sums (perplexity, losses) depend on how
    a reduction is split, and Ray would give a 1-CPU worker one thread."""
    if payload.get("threads"):
        import torch

        torch.set_num_threads(payload["threads"])


def _part(blob: bytes, rank: int, k: int) -> dict:
    """A Ray task: this worker's share of a row stage's shards."""
    from .launch import open_payload
    from .record import close_logger, stage_logger
    from .shards import PartDone

    payload = pickle.loads(blob)
    _same_arithmetic(payload)
    log = stage_logger(payload["stage"], Path(f"{payload['log']}.ray{rank}"), f"ray worker {rank}/{k}")
    scratch = Path(tempfile.mkdtemp(prefix="recipe-ray-"))  # the stage never writes its entry here
    try:
        stage, config, inputs, ctx = open_payload(payload, log, out_dir=scratch)
        ctx.shards.part = (rank, k)
        try:
            stage.module.run(config, inputs, ctx)
        except PartDone as done:
            log.info("worker %d of %d: %s", rank, k, done)
            return {"rank": rank, "committed": done.committed, "shards": done.shards}
        return {"rank": rank, "committed": 0, "shards": 0}  # the stage had no shards to do
    finally:
        close_logger(log)
        shutil.rmtree(scratch, ignore_errors=True)


def _whole(blob: bytes) -> dict:
    """A Ray task: a whole (training) stage, on the GPUs this task holds."""
    from .launch import launch_stage, open_payload
    from .record import close_logger, stage_logger

    payload = pickle.loads(blob)
    _same_arithmetic(payload)
    log = stage_logger(payload["stage"], Path(f"{payload['log']}.ray"), "ray")
    try:
        stage, config, inputs, ctx = open_payload(payload, log)
        if config.resources.processes > 1:
            launch_stage(stage, inputs, ctx, Path(payload["log"]))
        else:
            stage.module.run(config, inputs, ctx)
        return {"rows_out": ctx.rows_out}
    finally:
        close_logger(log)


def _driver_threads() -> int:
    import torch  # a model stage is about to run: torch is needed anyway

    return torch.get_num_threads()


def run_stage(stage, inputs: dict, ctx, log_path: Path) -> bool:
    """Run `stage` on the cluster; False when it is a kind that runs on the driver."""
    from .launch import make_payload

    training, rows = getattr(stage.module, "MULTI_PROCESS", False), getattr(stage.module, "ROW_STAGE", False)
    if not (training or rows):
        return False
    ray = _ray()
    res = stage.config.resources
    payload = make_payload(stage, inputs, ctx, log_path)
    payload["threads"] = _driver_threads()
    blob = pickle.dumps(payload)
    if training:
        gpus = _gpus(ray, res) * res.processes
        ctx.log.info("on Ray: one task with %g GPUs, %g CPUs", gpus, res.cpus)
        task = ray.remote(_whole).options(num_gpus=gpus, num_cpus=res.cpus, max_retries=MAX_RETRIES)
        ctx.rows_out = ray.get(task.remote(blob))["rows_out"]
        return True
    k, gpus = _workers(ray, res), _gpus(ray, res)
    ctx.log.info("on Ray: %d workers (%g GPUs, %g CPUs each)", k, gpus, res.cpus)
    if ctx.console is not None:
        ctx.console.print(f"{stage.name}: {k} Ray workers")
    task = ray.remote(_part).options(num_gpus=gpus, num_cpus=res.cpus, max_retries=MAX_RETRIES)
    done = ray.get([task.remote(blob, rank, k) for rank in range(k)])
    ctx.log.info("Ray workers committed %s shards; assembling here", sum(d["committed"] for d in done))
    ctx.lazy_models = True  # every shard is committed: nothing to load unless one is missing
    stage.module.run(stage.config, inputs, ctx)
    return True
