"""Experiment tracking, `[tracking] report_to = [...]`: tensorboard, trackio, wandb, mlflow.

Training stages stream their curves through transformers' own integrations (`trainer_tracking`:
the TRL config's `report_to`, `run_name` and `project`; TensorBoard through a callback with its
own writer, so its event files land in the tracking folder, not in a checkpoint folder). Once per
run, `log_run` sends the recipe, its stages' fingerprints and every eval stage's headline metrics.
Execution-only: nothing here enters a fingerprint, and a tracker that fails is a warning, never a
failed run. TensorBoard and trackio (its local store, TRACKIO_DIR) are tested offline; wandb and
mlflow go through the same calls but were not run here."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from engine.core.errors import Problem

PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def tracking_problems(recipe) -> list[Problem]:
    """A tracker whose package is not installed."""
    return [
        Problem(
            f"report_to '{name}' needs the {PACKAGES[name]} package, which is not installed.",
            hint=f"pip install {PACKAGES[name]}, or remove '{name}' from [tracking] report_to.",
            **recipe.where("tracking.report_to"),
        )
        for name in recipe.tracking.report_to
        if importlib.util.find_spec(PACKAGES[name]) is None
    ]


def tracking_dir(recipe, runs_dir: Path) -> Path:
    return Path(recipe.tracking.dir) if recipe.tracking.dir else Path(runs_dir) / recipe.name / "tracking"


def tracking_args(ctx) -> dict:
    """The TRL config arguments that stream a training stage's curves to the trackers."""
    spec, names = ctx.recipe.tracking, ctx.recipe.tracking.report_to
    if not names:
        return {"report_to": []}
    project = spec.project or ctx.recipe.name
    os.environ.setdefault("WANDB_PROJECT", project)
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", project)
    return {
        "report_to": [n for n in names if n != "tensorboard"],
        "run_name": f"{ctx.recipe.name}/{ctx.stage}",
        "project": project,
    }


def tracking_callbacks(ctx) -> list:
    """TensorBoard's callback, with a writer into the tracking folder (one per stage and key)."""
    callbacks = []
    if "tensorboard" in ctx.recipe.tracking.report_to and ctx.is_main and ctx.cache_root is not None:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        folder = tracking_dir(ctx.recipe, Path(ctx.cache_root).parent) / f"{ctx.stage}-{ctx.fingerprint[:8]}"
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder))))
    return callbacks


def eval_metrics(record) -> dict[str, float]:
    """`stage/model/metric` -> rate, for every eval stage of the run (its headline rates)."""
    out = {}
    for name, stage in record.data.get("stages", {}).items():
        path = record.dir / "stages" / name / "metrics.json"
        if stage.get("kind") != "eval" or not path.is_file():
            continue
        for model, m in (json.loads(path.read_text()).get("per_model") or {}).items():
            for metric, h in (m.get("headline") or {}).items():
                if isinstance(h, dict) and isinstance(h.get("rate"), (int, float)):
                    out[f"{name}/{model}/{metric}"] = float(h["rate"])
    return out


def log_run(record, recipe, runs_dir: Path, warn) -> None:
    """The run, once: the recipe, the fingerprints and the eval metrics, to every tracker."""
    names = recipe.tracking.report_to
    if not names:
        return
    recipe_text = (record.dir / "recipe.toml").read_text()
    fps = {n: s.get("fingerprint") for n, s in record.data.get("stages", {}).items()}
    metrics = eval_metrics(record)
    project = recipe.tracking.project or recipe.name
    for name in names:
        try:
            _LOGGERS[name](record, recipe, runs_dir, project, recipe_text, fps, metrics)
        except Exception as exc:  # a tracker is a side channel: it never fails the run
            warn(f"tracking: {name} could not log the run ({type(exc).__name__}: {exc})")


def _tensorboard(record, recipe, runs_dir, project, recipe_text, fps, metrics) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tracking_dir(recipe, runs_dir) / f"run-{record.run_id}")) as w:
        w.add_text("recipe", "```toml\n" + recipe_text + "\n```")
        w.add_text("fingerprints", "\n".join(f"- {n}: `{fp}`" for n, fp in fps.items()))
        for key, value in metrics.items():
            w.add_scalar(f"eval/{key}", value, 0)


def _trackio(record, recipe, runs_dir, project, recipe_text, fps, metrics) -> None:
    import trackio

    trackio.init(
        project=project, name=f"{recipe.name}-{record.run_id}", config={"recipe": recipe_text, "fingerprints": fps}
    )
    trackio.log(metrics)
    trackio.finish()


def _wandb(record, recipe, runs_dir, project, recipe_text, fps, metrics) -> None:
    import wandb

    run = wandb.init(project=project, name=f"{recipe.name}-{record.run_id}", config={"fingerprints": fps})
    run.log(metrics)
    run.summary["recipe"] = recipe_text
    run.finish()


def _mlflow(record, recipe, runs_dir, project, recipe_text, fps, metrics) -> None:
    import mlflow

    mlflow.set_experiment(project)
    with mlflow.start_run(run_name=f"{recipe.name}-{record.run_id}"):
        mlflow.log_text(recipe_text, "recipe.toml")
        mlflow.log_dict(fps, "fingerprints.json")
        mlflow.log_metrics({k.replace("/", "."): v for k, v in metrics.items()})


_LOGGERS: dict[str, Any] = {"tensorboard": _tensorboard, "trackio": _trackio, "wandb": _wandb, "mlflow": _mlflow}
