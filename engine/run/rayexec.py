"""The Ray executor: `recipe run --executor ray [--ray-address ADDR]` (or RECIPE_EXECUTOR=ray,
RAY_ADDRESS). Execution-only: no fingerprint changes, and the rows are those of a local run.

The driver is `recipe run`: it plans, checks the cache, locks and commits entries exactly as the
local executor does. What changes is where a stage's work happens:

- Row stages (generate, critique_revise, judge, rejection_sample, eval, preferences: modules with
  `ROW_STAGE = True`): k Ray tasks, one per worker (`[stages.X.resources] replicas`, default as
  many as the cluster's GPUs, else CPUs, fit at `gpus`/`cpus` each; `cpus` defaults to the torch
  threads a worker computes with on a cluster without GPUs). Each worker runs the stage
  with its model loaded once and does the shards whose index is its rank mod k, committing each
  atomically into the shared store's partial area (engine.store.shards), then stops. A worker lost
  mid-shard (node failure, OOM kill) is retried by Ray (max_retries); committed shards are skipped,
  and a shard committed twice keeps its first commit. When all are done, the driver runs the stage
  itself over the committed shards (models load lazily, so nothing is loaded unless a shard is
  missing) and commits the entry: the same assembly code as a local run, hence the same bytes.
- Training stages (sft, dpo): one Ray task holding `gpus` x `processes` GPUs on one node runs the
  stage (under `accelerate launch` when processes > 1) and writes the model into the entry being
  built; the driver commits it. With `nodes = M`, a placement group spreads M tasks over M nodes,
  each running accelerate's multi-node launch (its machine rank, the main node's address).
- Other stages (filter) run on the driver.

Workers compute with the driver's torch thread count: float sums (perplexity, losses) depend on
how a reduction is split, and with it the rows are byte-identical to a local run on the same
hardware (tested on the flagship, trained weights included). Across different hardware (another
CPU, a GPU) generated text stays the same only as far as the arithmetic does: seeds are per row,
never per worker.

Independent stages run side by side (engine.run.schedule.side_by_side): each stage starts as soon as
the stages it reads are committed, and Ray queues their tasks until resources allow (the
flagship's `revision_pairs` next to `clean_revised` -> `sft` -> `best_of_n`). The store must be one filesystem
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

from engine.core.errors import RecipeError
from engine.spec.stage import hook

INSTALL = "pip install 'recipe-engine[ray]'"
MAX_RETRIES = 3


def _ray():
    try:
        import ray
    except ImportError:
        raise RecipeError.single(
            "--executor ray needs the ray package, which is not installed.",
            hint=f"Install it with `{INSTALL}`, or run with --executor local.",
        ) from None
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at `address` (or RAY_ADDRESS), else the one `ray start` began on this machine (Ray's
    own lookup), else start a local one; idempotent."""
    ray = _ray()
    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parents[2])
        env = {"PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)}
        for name in ("RECIPE_BUILTIN_DIR", "HF_HOME", "HF_HUB_OFFLINE"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        try:
            ray.init(
                address=address or os.environ.get("RAY_ADDRESS") or None,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env},
            )
        except ConnectionError as exc:
            raise RecipeError.single(
                f"cannot connect to the Ray cluster at '{address}': {exc}.",
                hint="Check --ray-address (or RAY_ADDRESS), or leave it unset to start a local cluster.",
            ) from None
    return ray


def _probe(path: str, token: str) -> str:
    """Run on a worker: write `token` at `path` (the driver reads it back)."""
    target = Path(path)
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
            "with --executor local.",
        )


def _workers(ray, res, cpus: float) -> int:
    if res.replicas:
        return res.replicas
    total = ray.cluster_resources()
    if total.get("GPU", 0) >= 1:
        return max(1, int(total["GPU"] // res.gpus))
    return max(1, int(total.get("CPU", 1) // cpus))


def _cpus(ray, res, threads: int) -> float:
    """CPUs one worker holds: `cpus` when set; 1 beside a GPU; on a cluster without GPUs the torch
    threads it computes with (the driver's), capped at the largest node's CPUs, so that workers
    sharing a node do not oversubscribe its cores (two 2-thread workers on 2 cores ran 3x slower
    than one, bench/bench_ray.py)."""
    if res.cpus:
        return float(res.cpus)
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return 1.0
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return float(max(1, min(threads, int(largest))))


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
    import ray

    from engine.run.launch import open_payload
    from engine.store.record import close_logger, stage_logger
    from engine.store.shards import PartDone

    payload = pickle.loads(blob)
    _same_arithmetic(payload)
    log = stage_logger(payload["stage"], Path(f"{payload['log']}.ray{rank}"), f"ray worker {rank}/{k}")
    log.info("worker %d of %d on node %s", rank, k, ray.get_runtime_context().get_node_id())
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
    from engine.run.launch import launch_stage, open_payload
    from engine.store.record import close_logger, stage_logger

    payload = pickle.loads(blob)
    _same_arithmetic(payload)
    log = stage_logger(payload["stage"], Path(f"{payload['log']}.ray"), "ray")
    try:
        stage, config, inputs, ctx = open_payload(payload, log)
        if config.resources.processes > 1:
            launch_stage(stage, inputs, ctx, Path(payload["log"]))
        else:
            stage.module.run(config, inputs, ctx)
        return {"rows_out": ctx.rows_out, "warnings": ctx.warnings}
    finally:
        close_logger(log)


def _address() -> tuple[str, int]:
    """A Ray task on the main node of a multi-node launch: its address and a free port there."""
    import ray

    from engine.run.launch import free_port

    return ray.util.get_node_ip_address(), free_port("0.0.0.0")


def _node(work: str, rank: int, nodes: int, processes: int, config: str | None, ip: str, port: int) -> int:
    """A Ray task: one machine's `accelerate launch` of a multi-node training stage."""
    from engine.run.launch import PAYLOAD, STOP, command, execute

    cmd = command(processes, config, Path(work) / PAYLOAD, machines=nodes, machine_rank=rank, main_ip=ip, port=port)
    return execute(cmd, Path(work) / f"accelerate.node{rank}.log", stop=Path(work) / STOP, processes=processes // nodes)


def _multi_node(ray, stage, inputs: dict, ctx, log_path: Path, cpus: float) -> None:
    """A training stage on `nodes` machines: a placement group with one bundle per node (strictly
    spread), one task per bundle running accelerate's multi-node launch with its machine rank and
    the main node's address. Rank 0 writes the model into the entry being built (the shared store);
    when one node fails the others are stopped and the stage fails (checkpoints stay for resume)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.run.launch import STOP, collect, prepare

    res = stage.config.resources
    gpus = _gpus(ray, res) * res.processes
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    fit = [n for n in ray.nodes() if n.get("Alive") and all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())]
    if len(fit) < res.nodes:
        raise RecipeError.single(
            f"stage '{stage.name}' asks for {res.nodes} nodes with {bundle} each, and the Ray cluster has "
            f"{len(fit)} such nodes.",
            hint=f"Lower stages.{stage.name}.resources.nodes (or its gpus, cpus), or add nodes to the cluster.",
        )
    group = placement_group([bundle] * res.nodes, strategy="STRICT_SPREAD")
    try:
        ray.get(group.ready(), timeout=600)

        def on(i: int):
            return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i)

        ip, port = ray.get(ray.remote(_address).options(num_cpus=0, scheduling_strategy=on(0)).remote())
        work, config = prepare(stage, inputs, ctx, log_path)
        total = res.nodes * res.processes
        ctx.log.info(
            "on Ray: %d nodes x %d processes (%g GPUs, %g CPUs per node), main %s:%d",
            res.nodes,
            res.processes,
            gpus,
            cpus,
            ip,
            port,
        )
        if ctx.console is not None:
            ctx.console.print(f"{stage.name}: {res.nodes} nodes x {res.processes} processes (accelerate launch)")
        node = ray.remote(_node)
        tasks = {
            node.options(num_cpus=cpus, num_gpus=gpus, max_retries=0, scheduling_strategy=on(i)).remote(
                str(work), i, res.nodes, total, config, ip, port
            ): i
            for i in range(res.nodes)
        }
        codes, pending = {}, list(tasks)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            code = ray.get(ready[0])
            codes[work / f"accelerate.node{tasks[ready[0]]}.log"] = code
            if code != 0:
                (work / STOP).write_text(f"node {tasks[ready[0]]} exited with {code}\n")
        collect(work, ctx, f"{res.nodes}-node", codes)
    finally:
        remove_placement_group(group)


def _driver_threads() -> int:
    import torch  # a model stage is about to run: torch is needed anyway

    return torch.get_num_threads()


def run_stage(stage, inputs: dict, ctx, log_path: Path) -> bool:
    """Run `stage` on the cluster; False when it is a kind that runs on the driver."""
    from engine.run.launch import make_payload

    training, rows = hook(stage.module, "TRAINS"), hook(stage.module, "ROW_STAGE")
    if not (training or rows):
        return False
    ray = _ray()
    res = stage.config.resources
    payload = make_payload(stage, inputs, ctx, log_path)
    payload["threads"] = threads = _driver_threads()
    blob = pickle.dumps(payload)
    cpus = _cpus(ray, res, threads)
    if training and res.nodes > 1:
        _multi_node(ray, stage, inputs, ctx, log_path, cpus)
        return True
    if training:
        gpus = _gpus(ray, res) * res.processes
        ctx.log.info("on Ray: one task with %g GPUs, %g CPUs", gpus, cpus)
        task = ray.remote(_whole).options(num_gpus=gpus, num_cpus=cpus, max_retries=MAX_RETRIES)
        done = ray.get(task.remote(blob))
        ctx.rows_out = done["rows_out"]
        for warning in done.get("warnings", []):  # said in the task: into the driver's record and console
            ctx.warn(warning)
        return True
    k, gpus = _workers(ray, res, cpus), _gpus(ray, res)
    ctx.log.info("on Ray: %d workers (%g GPUs, %g CPUs each)", k, gpus, cpus)
    if ctx.console is not None:
        ctx.console.print(f"{stage.name}: {k} Ray workers")
    task = ray.remote(_part).options(num_gpus=gpus, num_cpus=cpus, max_retries=MAX_RETRIES)
    done = ray.get([task.remote(blob, rank, k) for rank in range(k)])
    ctx.log.info("Ray workers committed %s shards; assembling here", sum(d["committed"] for d in done))
    ctx.lazy_models = True  # every shard is committed: nothing to load unless one is missing
    ctx.shards.announce = None  # the driver assembling is not a resumed run
    stage.module.run(stage.config, inputs, ctx)
    return True
