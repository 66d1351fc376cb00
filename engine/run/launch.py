"""Run one stage on several processes with `accelerate launch`.

`[stages.X.resources] processes = N` (and optionally `accelerate_config = "fsdp.yaml"`) makes the
executor call `launch_stage` instead of the stage's `run`. It pickles what the stage needs (its
config, its resolved inputs, the recipe, the context's directories) into the stage's partial
area, builds the `accelerate launch` command and waits for it. Every process runs
`python -m engine.run.launch PAYLOAD`: it rebuilds the context and calls the stage's `run`; the
trainer inside finds its rank from the environment that accelerate set. Only rank 0 writes the
artifact (`ctx.is_main`). The parent then collects what rank 0 wrote: the artifact files are
already in the build directory, and `result.json` carries the row count.

Only kinds whose module says `TRAINS = True` (the training stages) accept processes > 1.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import pickle
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from engine.core.errors import RecipeError
from engine.core.io import atomic_write_bytes, atomic_write_text

PAYLOAD = "launch.pkl"
RESULT = "result.json"
USER_ERROR = "user_error.pkl"  # bad input a process found (a RecipeError's problems), for the parent to raise
STOP = "stop"  # written by a multi-node driver when one node failed: the others stop


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _portable(recipe):
    """A copy of the recipe whose stages name their module instead of holding it (picklable)."""
    stages = {n: dataclasses.replace(s, module=s.module.__name__) for n, s in recipe.stages.items()}
    return dataclasses.replace(recipe, stages=stages)


def _restore(recipe):
    for stage in recipe.stages.values():
        if isinstance(stage.module, str):
            stage.module = importlib.import_module(stage.module)
    return recipe


def command(
    processes: int,
    accelerate_config: str | None,
    payload: Path,
    *,
    machines: int = 1,
    machine_rank: int = 0,
    main_ip: str | None = None,
    port: int | None = None,
) -> list[str]:
    """The `accelerate launch` command line for a payload. Without a config file it asks for N
    local processes through torch.distributed (accelerate's `--cpu` flag would start just one):
    gloo on the CPU, nccl on GPUs, chosen by accelerate from what the machine has. `processes` is
    the total over `machines`; with several machines, this is the command of `machine_rank`, and
    the machine count, rank and main address override those of a config file."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    else:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--multi_gpu"]  # torch.distributed.run: N local processes (gloo on the CPU, nccl on GPUs)
    if machines > 1:
        cmd += ["--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", str(main_ip)]
    elif not accelerate_config:
        cmd += ["--num_machines", "1"]
    cmd += [
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(port or free_port()),
        "-m",
        "engine.run.launch",
        str(payload),
    ]
    return cmd


def environment(processes: int = 1) -> dict[str, str]:
    """The environment of a launched stage: this engine importable, and each of its `processes`
    this machine's share of the run's threads (engine.core.threads), at least one."""
    from engine.core.threads import available_cores

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p))
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS") or available_cores())
    except ValueError:
        threads = available_cores()
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, threads // max(1, processes)))
    return env


def make_payload(stage, inputs: dict, ctx, log_path: Path, result: Path | None = None) -> dict:
    """What another process needs to run `stage` (picklable): its config, its inputs without their
    rows (read again from the store), the recipe with module names, the context's directories."""
    recipe = _portable(ctx.recipe)
    portable_inputs = {}
    for field, arts in inputs.items():
        items = arts if isinstance(arts, list) else [arts]
        copies = [dataclasses.replace(a, recipe=recipe if a.recipe is not None else None, _rows=None) for a in items]
        portable_inputs[field] = copies if isinstance(arts, list) else copies[0]
    return {
        "stage": stage.name,
        "config": stage.config,
        "inputs": portable_inputs,
        "recipe": recipe,
        "context": {
            "stage": ctx.stage,
            "fingerprint": ctx.fingerprint,
            "seed": ctx.seed,
            "out_dir": str(ctx.out_dir),
            "partial_dir": str(ctx.partial_dir),
            "cache_root": str(ctx.cache_root) if ctx.cache_root else None,
            "definition": ctx.definition,
            "components": ctx.components,
        },
        "log": str(log_path),
        "result": str(result) if result else None,
    }


def open_payload(payload: dict, log: logging.Logger, out_dir: Path | None = None):
    """(stage, config, inputs, Context) rebuilt from `make_payload`'s dict in this process."""
    from engine.run.context import Context

    recipe = _restore(payload["recipe"])
    for arts in payload["inputs"].values():
        for art in arts if isinstance(arts, list) else [arts]:
            if art.recipe is not None:
                art.recipe = recipe
    c = payload["context"]
    ctx = Context(
        c["stage"],
        c["fingerprint"],
        c["seed"],
        Path(out_dir or c["out_dir"]),
        Path(c["partial_dir"]),
        log,
        recipe,
        None,
        None,
        Path(c["cache_root"]) if c["cache_root"] else None,
        definition=c.get("definition", ""),
        components=c.get("components", {}),
    )
    return recipe.stages[payload["stage"]], payload["config"], payload["inputs"], ctx


def prepare(stage, inputs: dict, ctx, log_path: Path) -> tuple[Path, str | None]:
    """Write the payload into the stage's partial area (the shared store); (work dir, the
    accelerate config file, copied there so that every node of a cluster reads the same one)."""
    res = stage.config.resources
    work = Path(ctx.partial_dir) / "launch"
    work.mkdir(parents=True, exist_ok=True)
    payload = make_payload(stage, inputs, ctx, log_path, work / RESULT)
    (work / RESULT).unlink(missing_ok=True)
    (work / USER_ERROR).unlink(missing_ok=True)
    (work / STOP).unlink(missing_ok=True)
    atomic_write_bytes(work / PAYLOAD, pickle.dumps(payload))
    if not res.accelerate_config:
        return work, None
    from engine.spec.paths import resolve_path

    source = resolve_path(
        res.accelerate_config, f"stages.{stage.name}.resources.accelerate_config", ctx.recipe.locations, ctx.recipe.path
    )
    atomic_write_bytes(work / "accelerate.yaml", Path(source).read_bytes())
    return work, str(work / "accelerate.yaml")


def execute(cmd: list[str], out_log: Path, stop: Path | None = None, processes: int = 1) -> int:
    """Run a launch command, its output to `out_log`; its exit code. When the file `stop` appears
    (another node failed), the whole process group is killed and -9 returned."""
    with open(out_log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=environment(processes), start_new_session=True
        )
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if stop is not None and stop.exists():
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    return -9
            except BaseException:
                os.killpg(proc.pid, 9)
                raise


def collect(work: Path, ctx, what: str, codes: dict[Path, int]) -> None:
    """Check what the launch(es) left: raise with the failing log's last lines, else set rows_out."""
    failed = {log: code for log, code in codes.items() if code not in (0, -9)} or (
        {} if (work / RESULT).is_file() else codes
    )
    for out_log, code in failed.items():
        if (work / USER_ERROR).is_file():  # a process stopped on bad input: the same exit 2 as in one process
            cls, problems = pickle.loads((work / USER_ERROR).read_bytes())
            raise cls(problems)
        tail = out_log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        ctx.log.error("accelerate launch exited with %s; last lines of %s:\n%s", code, out_log, "\n".join(tail))
        error = next((line for line in reversed(tail) if "Error" in line or "error" in line), None)
        raise RuntimeError(
            f"the {what} run failed (exit {code})" + (f": {error.strip()}" if error else "") + f"; see {out_log}"
        )
    result = json.loads((work / RESULT).read_text())
    ctx.rows_out = result.get("rows_out")
    for warning in result.get("warnings", []):  # said by rank 0: into this run's record, report and console
        ctx.warn(warning)


def launch_stage(stage, inputs: dict, ctx, log_path: Path) -> None:
    """Run `stage` under accelerate with `stage.config.resources`; raise on failure."""
    res = stage.config.resources
    work, config_file = prepare(stage, inputs, ctx, log_path)
    cmd = command(res.processes, config_file, work / PAYLOAD)
    ctx.log.info("running on %d processes: %s", res.processes, shlex.join(cmd))
    if ctx.console is not None:
        ctx.console.print(f"{stage.name}: {res.processes} processes (accelerate launch)")
    out_log = work / "accelerate.log"
    collect(work, ctx, f"{res.processes}-process", {out_log: execute(cmd, out_log, processes=res.processes)})


def worker(payload_path: str) -> int:
    """One process of a launched stage (run by accelerate)."""
    from engine.store.record import close_logger, stage_logger

    payload = pickle.loads(Path(payload_path).read_bytes())
    rank = int(os.environ.get("RANK", "0"))
    log_file = payload["log"] if rank == 0 else f"{payload['log']}.rank{rank}"
    log = stage_logger(payload["stage"], Path(log_file), f"rank {rank}")
    stage, config, inputs, ctx = open_payload(payload, log)
    try:
        stage.module.run(config, inputs, ctx)
    except RecipeError as e:  # handed to the parent whole (its class, every problem and where it is)
        atomic_write_bytes(Path(payload["result"]).with_name(USER_ERROR), pickle.dumps((type(e), e.problems)))
        raise
    except Exception:
        import traceback

        log.error("stage failed on rank %d:\n%s", rank, traceback.format_exc())
        raise
    finally:
        close_logger(log)
    _leave_process_group()
    if rank == 0:
        atomic_write_text(
            Path(payload["result"]),
            json.dumps(
                {
                    "rows_out": ctx.rows_out,
                    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                    "warnings": ctx.warnings,
                }
            ),
        )
    return 0


def _leave_process_group() -> None:
    """Destroy the process group once the stage has run on every rank: left to interpreter exit,
    gloo's worker threads can abort the process (SIGABRT, "terminate called without an active
    exception") after a stage that finished, which the launch then reports as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
