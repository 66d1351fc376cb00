"""The training knobs users bring from TRL and axolotl, on every training stage (sft, dpo / kto /
orpo / cpo, grpo): the optimizer, the scheduler and warmup, weight decay, gradient clipping,
gradient checkpointing, NEFTune, evals during training with early stopping, QLoRA, and a
`[stages.X.trainer]` table for any further TRL argument.

- `knob_problems`: what `recipe validate` checks (names against engine/lib/trl_fields.py, TRL's
  own lists copied, so nothing heavy is imported; a name the copy lacks is looked up in the
  installed TRL and transformers before it is called unknown, so a newer release's arguments are
  accepted without a regenerated copy): an unknown optimizer or scheduler, a trainer
  key TRL's config lacks (did-you-mean) or one the stage already models (use that key), eval and
  early-stopping settings that do not fit together, 4-bit loading without LoRA, CUDA or
  bitsandbytes.
- `knob_args`: the TRL arguments they become.
- `eval_split`: the held-out rows (eval_input, or a seeded eval_fraction of the training rows).
- `knob_callbacks`: early stopping.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import random
from pathlib import Path

from engine.core.errors import Problem
from engine.lib.trl_fields import CONFIG_FIELDS, OPTIMIZERS, SCHEDULERS, TRAINING_ARGUMENTS

# TRL's names for settings the recipe names otherwise: accepted as aliases
TRL_ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "scheduler",
    "optim": "optimizer",
    "per_device_train_batch_size": "per_device_batch_size",
}
# TRL arguments a stage sets from its own keys or from the run: a [trainer] table may not set them
MODELED = {
    **TRL_ALIASES,
    "max_steps": "max_steps",
    "warmup_steps": "warmup_ratio",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "save_steps": "save_steps",
    "logging_steps": "logging_steps",
    "max_grad_norm": "max_grad_norm",
    "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",
    "neftune_noise_alpha": "neftune_noise_alpha",
    "gradient_accumulation_steps": "batch_size (the global batch; accumulation is derived)",
    "per_device_eval_batch_size": "per_device_batch_size",
    "eval_strategy": "eval_steps",
    "eval_steps": "eval_steps",
    "load_best_model_at_end": "early_stopping_patience",
    "metric_for_best_model": "early_stopping_patience",
    "seed": "[recipe] seed",
    "data_seed": "[recipe] seed",
    "output_dir": "nothing (the stage's checkpoints live in the runs dir)",
    "resume_from_checkpoint": "nothing (a stage resumes from its last checkpoint by itself)",
    "save_total_limit": "nothing (the stage keeps its last two checkpoints for resume)",
    "report_to": "[tracking] report_to",
    "use_cpu": "the model's device",
    "bf16": "nothing (bf16 autocast on CUDA is the engine's choice)",
    "max_length": "max_length",
    "beta": "beta",
    "loss_type": "loss_type",
    "label_smoothing": "label_smoothing",
    "packing": "packing",
    "num_generations": "num_generations",
    "max_completion_length": "max_completion_length",
    "temperature": "temperature",
    "top_p": "top_p",
    "epsilon": "epsilon",
    "epsilon_high": "epsilon_high",
    "mask_truncated_completions": "mask_truncated_completions",
    "scale_rewards": "scale_rewards",
    "reward_weights": "rewards (each one's weight)",
    "use_vllm": "backend",
    "steps_per_generation": "nothing (one generation batch per optimizer step)",
    "cpo_alpha": "cpo_alpha",
    "simpo_gamma": "simpo_gamma",
}


def _use(value: str) -> str:
    """'batch_size (the global batch; ...)' -> '`batch_size` (the global batch; ...)'."""
    key, _, note = value.partition(" (")
    return f"`{key}`" + (f" ({note}" if note else "")


UNKNOWN_KEY_HINTS = {
    k: f"In a recipe, TRL's {k} is {_use(v)}."
    for k, v in MODELED.items()
    if k not in TRL_ALIASES and not v.startswith(("nothing", "the model"))
} | {"output_dir": "The stage's checkpoints live in the runs dir; nothing to set."}


@functools.cache
def installed_lists() -> dict:
    """The installed transformers' and TRL's own lists, in engine/lib/trl_fields.py's shape (imports
    both: asked only when a name misses the copy, and by the test that keeps the copy true)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers import TrainingArguments
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import DPOConfig, GRPOConfig, KTOConfig, RLOOConfig, SFTConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    configs = dict(sft=SFTConfig, dpo=DPOConfig, kto=KTOConfig, orpo=ORPOConfig, cpo=CPOConfig, grpo=GRPOConfig)
    configs["rloo"] = RLOOConfig
    return dict(
        TRAINING_ARGUMENTS=sorted(base),
        CONFIG_FIELDS={k: sorted({f.name for f in dataclasses.fields(c)} - base) for k, c in configs.items()},
        OPTIMIZERS=sorted(o.value for o in OptimizerNames),
        SCHEDULERS=sorted(s.value for s in SchedulerType),
    )


def _known(name: str, copied: list[str], installed) -> bool:
    """`name` is in the copied list, or (a newer release) in the installed library's."""
    if name in copied:
        return True
    try:
        return name in installed(installed_lists())
    except Exception:  # validate where TRL is missing or will not import: the copy decides
        return False


def knob_problems(name: str, config, recipe, kind: str) -> list[Problem]:
    """Validate-time checks of the knobs; `kind` names the TRL config (sft, dpo, kto, orpo, cpo, grpo, rloo)."""
    where = lambda key: recipe.where(f"stages.{name}.{key}")  # noqa: E731
    problems = []
    for key, value, known in (("optimizer", config.optimizer, OPTIMIZERS), ("scheduler", config.scheduler, SCHEDULERS)):
        if value is not None and not _known(value, known, lambda lists, k=key: lists[f"{k.upper()}S"]):
            close = difflib.get_close_matches(value, known, n=1)
            problems.append(
                Problem(
                    f"unknown {key} '{value}'.",
                    hint=(f"Did you mean '{close[0]}'? " if close else "") + f"Known: {', '.join(known)}.",
                    **where(key),
                )
            )
    fields = set(TRAINING_ARGUMENTS) | set(CONFIG_FIELDS[kind])
    for key in config.trainer:
        ours = MODELED.get(key) or (key if key in type(config).model_fields else None)
        if ours is not None:
            problems.append(
                Problem(
                    f"trainer.{key}: the stage sets TRL's {key} itself.",
                    hint=f"Use {_use(ours)}."
                    if not ours.startswith("nothing")
                    else f"Remove it: {ours[len('nothing ') :]}.",
                    **where("trainer"),
                )
            )
        elif key not in fields and not _known(
            key, [], lambda lists: set(lists["TRAINING_ARGUMENTS"]) | set(lists["CONFIG_FIELDS"][kind])
        ):
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            problems.append(
                Problem(
                    f"trainer.{key}: TRL's {kind} config has no argument '{key}'.",
                    hint=f"Did you mean '{close[0]}'?" if close else "See the TRL documentation of its config.",
                    **where("trainer"),
                )
            )
    evals = getattr(config, "eval_input", None) is not None or config.eval_fraction is not None
    if getattr(config, "eval_input", None) is not None and config.eval_fraction is not None:
        problems.append(Problem("eval_input and eval_fraction both set.", hint="Keep one.", **where("eval_fraction")))
    for key in ("eval_steps", "early_stopping_patience"):
        if getattr(config, key) is not None and not evals:
            problems.append(
                Problem(f"{key} needs evals: set eval_input (held-out rows) or eval_fraction.", **where(key))
            )
    if config.quantization == "4bit":
        if config.lora is None:
            problems.append(
                Problem(
                    'quantization = "4bit" trains a LoRA adapter on a frozen 4-bit base (QLoRA): add [lora].',
                    **where("quantization"),
                )
            )
        missing = [
            what
            for what, ok in (
                ("a CUDA GPU", Path("/proc/driver/nvidia/version").exists()),
                ("the bitsandbytes package", importlib.util.find_spec("bitsandbytes") is not None),
            )
            if not ok
        ]
        if missing:
            problems.append(
                Problem(
                    f'quantization = "4bit" needs a CUDA machine with bitsandbytes; this one lacks {" and ".join(missing)}.',
                    hint="Run it on a CUDA machine (pip install bitsandbytes), or remove quantization.",
                    **where("quantization"),
                )
            )
    return problems


def _has_training_argument(name: str) -> bool:
    from transformers import TrainingArguments

    return name in {f.name for f in dataclasses.fields(TrainingArguments)}


def knob_args(config, has_eval: bool) -> dict:
    """The TRL config arguments the knobs become (only those set: TRL's defaults otherwise)."""
    out: dict = {}
    for ours, theirs in (
        ("optimizer", "optim"),
        ("max_grad_norm", "max_grad_norm"),
        # transformers 5 renamed it (the old name warns)
        (
            "gradient_checkpointing",
            "activation_checkpointing"
            if _has_training_argument("activation_checkpointing")
            else "gradient_checkpointing",
        ),
        ("neftune_noise_alpha", "neftune_noise_alpha"),
    ):
        if getattr(config, ours) is not None:
            out[theirs] = getattr(config, ours)
    if has_eval:
        every = config.eval_steps or config.save_steps
        # one held-out row per forward pass: the eval loss (a mean of batch means) and so the checkpoint
        # early stopping keeps never depend on per_device_batch_size or processes (execution-only)
        out |= dict(eval_strategy="steps", eval_steps=every, per_device_eval_batch_size=1)
        if config.early_stopping_patience is not None:  # the best checkpoint needs a save at every eval
            out |= dict(
                save_steps=every,
                load_best_model_at_end=True,
                metric_for_best_model="eval_loss",
                greater_is_better=False,
            )
    return out | dict(config.trainer)


def eval_split(config, rows: list[dict], inputs: dict, seed: int) -> tuple[list[dict], list[dict] | None]:
    """(training rows, held-out rows or None): eval_input's rows, or a seeded eval_fraction of `rows`
    (at least one row, and at least one left to train on)."""
    if inputs.get("eval_input") is not None:
        return rows, inputs["eval_input"].rows()
    if config.eval_fraction is None or len(rows) < 2:
        return rows, None
    n = min(len(rows) - 1, max(1, math.ceil(config.eval_fraction * len(rows))))
    held = set(random.Random(f"{seed}:eval_split").sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def knob_callbacks(config, has_eval: bool) -> list:
    if not has_eval or config.early_stopping_patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)]
